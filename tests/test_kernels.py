"""Tests for sdlearn/kernels: the AMX attention kernel gives torch's numbers in
every shape it takes (head widths with and without a tail of columns, a last
block of fewer keys, strided inputs), refuses the rest by name, traces under
torch.compile, and the "amx" backend falls back to torch's kernel wherever it
cannot run. The kernel's tests skip on machines without AMX; the fallback's run
everywhere."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from sdlearn import kernels
from sdlearn.attention import Attention, set_attention_backend
from sdlearn.fast import FastRecipe
from tests.helpers import random_pipeline, randomize_

needs_amx = pytest.mark.skipif(
    not kernels.amx_attention_available(),
    reason=f"sdlearn's AMX kernel does not run here: {kernels.why_not()}",
)


def qkv(batch, heads, queries, keys, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, width, generator=g)
    k = torch.randn(batch, heads, keys, width, generator=g)
    v = torch.randn(batch, heads, keys, width, generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def assert_like_torch(out, q, k, v):
    """out is as close to float32 attention as torch's own bfloat16 kernel is."""
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    theirs = F.scaled_dot_product_attention(q, k, v).float()
    their_error = (theirs - exact).abs().max().item()
    # both round p and the output to bfloat16 (3 significant digits): the kernel
    # may differ from float32 by what torch's does, and a little more
    torch.testing.assert_close(out.float(), exact, atol=2 * their_error, rtol=0)


@needs_amx
@pytest.mark.parametrize(
    "heads, queries, keys, width",
    [
        (8, 64, 64, 40),  # SD 1.5's outermost heads: 2 groups of 16 and 8 columns
        (2, 32, 1056, 80),  # 3 blocks of keys, the last of 32
        (3, 16, 96, 8),  # only a tail of columns
        (2, 48, 160, 56),  # an odd number of 16-column groups, and a tail
        (1, 16, 32, 256),  # the widest head it takes
        (2, 32, 77 + 19, 160),  # SD 1.5's innermost heads
    ],
)
def test_amx_attention_gives_torchs_numbers(heads, queries, keys, width):
    q, k, v = qkv(2, heads, queries, keys, width)
    assert_like_torch(kernels.amx_attention(q, k, v), q, k, v)


@needs_amx
def test_amx_attention_reads_strided_heads_and_writes_tokens_first():
    # the layout Attention gives it: (B, T, nh*hd) viewed as (B, nh, T, hd)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 4 * 40, generator=g).bfloat16()
    q = x.view(2, 64, 4, 40).transpose(1, 2)
    k, v = (t.contiguous() for t in (q * 0.5, q.flip(2)))
    out = kernels.amx_attention(q, k, v)
    assert out.shape == (2, 4, 64, 40)
    assert out.transpose(1, 2).is_contiguous()  # merging heads is free
    assert_like_torch(out, q, k, v)
    # k's rows starting on an odd column: its pairs are not aligned words
    odd = torch.cat([torch.zeros_like(k[..., :1]), k], dim=-1)[..., 1:]
    assert odd.storage_offset() == 1
    assert_like_torch(kernels.amx_attention(q, odd, v), q, k, v)
    scaled = kernels.amx_attention(q, k, v, scale=0.05)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.05)
    torch.testing.assert_close(scaled.float(), exact, atol=2e-2, rtol=0)


@needs_amx
@pytest.mark.parametrize(
    "change, named",
    [
        (lambda q, k, v: (q.float(), k.float(), v.float()), "float32"),
        (lambda q, k, v: (q[..., :7], k[..., :7], v[..., :7]), r"q \(1, 2, 32, 7\)"),
        (lambda q, k, v: (q[:, :, :20], k, v), r"q \(1, 2, 20, 8\)"),
        (lambda q, k, v: (q, k[:, :, :40], v[:, :, :40]), r"k \(1, 2, 40, 8\)"),
        (lambda q, k, v: (q, k[:, :1], v[:, :1]), "differ in batch, heads or width"),
    ],
)
def test_amx_attention_refuses_what_it_does_not_take(change, named):
    q, k, v = change(*qkv(1, 2, 32, 64, 8))
    with pytest.raises(ValueError, match=named):
        kernels.amx_attention(q, k, v)


@needs_amx
def test_amx_attention_traces_under_torch_compile():
    q, k, v = qkv(1, 2, 32, 64, 40)
    compiled = torch.compile(kernels.amx_attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), kernels.amx_attention(q, k, v))


def attention_and_input(dtype=torch.bfloat16):
    torch.manual_seed(0)
    layer = randomize_(Attention(64, heads=2, dim_head=32), 1, 0.1).to(dtype)
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1))
    return layer, x.to(dtype)


def test_amx_backend_uses_torchs_kernel_where_it_cannot_run():
    layer, x = attention_and_input()
    layer32, x32 = attention_and_input(torch.float32)
    mask = torch.rand(2, 64, generator=torch.Generator().manual_seed(2)) > 0.3
    with torch.no_grad():
        before = {
            "mask": layer(x, attention_mask=mask),
            "causal": layer(x, causal=True),
            "7 queries": layer(x[:, :7]),
            "float32": layer32(x32),
        }
        set_attention_backend(layer, "amx")
        set_attention_backend(layer32, "amx")
        assert layer.backend == layer32.backend == "amx"
        after = {
            "mask": layer(x, attention_mask=mask),
            "causal": layer(x, causal=True),
            "7 queries": layer(x[:, :7]),
            "float32": layer32(x32),
        }
    for case, out in after.items():
        torch.testing.assert_close(out, before[case], rtol=0, atol=0, msg=case)


@needs_amx
def test_amx_backend_gives_the_fused_layers_numbers(monkeypatch):
    calls = []
    kernel = kernels.amx_attention
    monkeypatch.setattr(
        kernels, "amx_attention", lambda *args: calls.append(1) or kernel(*args)
    )
    layer, x = attention_and_input()
    with torch.no_grad():
        fused = layer(x)
        set_attention_backend(layer, "amx")
        ours = layer(x)
    assert calls == [1]  # the kernel ran, not torch's in its place
    # one rounding of p and of the output to bfloat16 apart
    torch.testing.assert_close(ours.float(), fused.float(), atol=2e-2, rtol=0)


def test_why_not_names_what_a_laptop_lacks(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not kernels.amx_attention_available()
    assert kernels.why_not() == "torch runs this CPU at AVX2, not AVX512"
    assert not kernels.loaded()
    q, k, v = qkv(1, 2, 32, 64, 8)
    with pytest.raises(RuntimeError, match="does not run here: torch runs this CPU"):
        kernels.amx_attention(q, k, v)


def test_recipe_turns_the_kernel_on_only_where_it_runs():
    pipe = random_pipeline()
    done = FastRecipe(dtype="bfloat16", merge_ratio=0).apply(pipe)
    backends = {m.backend for m in pipe.unet.modules() if isinstance(m, Attention)}
    if kernels.amx_attention_available():
        assert "attention by sdlearn's AMX kernel" in done and backends == {"amx"}
        images = pipe("a red circle", num_inference_steps=2, output_type="np").images
        assert images.shape == (1, 16, 16, 3)
    else:
        assert backends == {"fused"}
    for recipe in (
        FastRecipe(dtype="float32"),
        FastRecipe(dtype="bfloat16", amx_attention=False),
    ):
        pipe = random_pipeline()
        assert not any("AMX" in line for line in recipe.apply(pipe))
        assert {m.backend for m in pipe.unet.modules() if isinstance(m, Attention)} == {
            "fused"
        }


def test_fits_takes_only_what_the_kernel_reads():
    q, k, v = qkv(1, 2, 32, 64, 8)
    assert kernels.fits(q, k, v)
    assert not kernels.fits(q.float(), k.float(), v.float())
    assert not kernels.fits(q[:, :, :20], k, v)  # queries not in 16s
    assert not kernels.fits(q, k[:, :, :40], v[:, :, :40])  # keys not in 32s
    q16, k16, v16 = qkv(1, 2, 32, 64, 16)
    assert kernels.fits(q16, k16, v16)
    strided = q16.transpose(2, 3).contiguous().transpose(2, 3)  # same values
    assert not kernels.fits(strided, k16, v16)  # a head's vector not contiguous


def test_the_kernel_and_the_exercise_share_one_cubic():
    source = kernels.SOURCE.read_text()
    body = source[source.index("inline __m512 exp2_16") :].split("\n}\n")[0]
    numbers = tuple(float(n) for n in re.findall(r"_mm512_set1_ps\(([0-9.]+)f\)", body))
    assert numbers == kernels.EXP2_CUBIC
    f = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    c0, c1, c2, c3 = kernels.EXP2_CUBIC
    cubic = c0 + f * (c1 + f * (c2 + f * c3))
    assert (cubic / 2**f - 1).abs().max() < 7.5e-5
