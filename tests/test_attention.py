"""Tests for sdlearn/attention.py: the attention function, heads, and the layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.attention import (
    Attention,
    causal_mask,
    merge_heads,
    scaled_dot_product_attention,
    set_attention_backend,
    split_heads,
)
from tests.helpers import (
    load_reference,
    needs_diffusers,
    needs_transformers,
    randomize_,
)

# CLIP's names for the projections -> diffusers' (and sdlearn's)
CLIP_TO_SDLEARN = {
    "q_proj": "to_q",
    "k_proj": "to_k",
    "v_proj": "to_v",
    "out_proj": "to_out.0",
}


def qkv(seed: int, Tq: int = 7, Tk: int = 9, dtype=torch.float32):
    """Random q (2, 3, Tq, 8), k and v (2, 3, Tk, 8)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g) for T in (Tq, Tk, Tk))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def masks(seed: int, Tq: int = 7, Tk: int = 9) -> dict[str, dict | None]:
    """Keyword arguments for ours and for torch's: (ours, torch's) per case."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 1, Tq, Tk, generator=g) > 0.3  # broadcast over heads
    keep[..., 0] = True  # every row keeps a key; fully masked rows are tested apart
    bias = torch.randn(2, 3, Tq, Tk, generator=g)
    keep_causal = keep & torch.ones(Tq, Tk, dtype=torch.bool).tril()
    return {
        "no mask": ({}, {}),
        "bool mask": ({"mask": keep}, {"attn_mask": keep}),
        "additive mask": ({"mask": bias}, {"attn_mask": bias}),
        "causal": ({"causal": True}, {"is_causal": True}),
        "causal and bool mask": (
            {"mask": keep, "causal": True},
            {"attn_mask": keep_causal},
        ),
    }


CASES = list(masks(0))


def state_dict(reference: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under `prefix.`, with the prefix taken off."""
    start = f"{prefix}."
    return {k[len(start) :]: v for k, v in reference.items() if k.startswith(start)}


def clip_to_sdlearn(clip_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in clip_state.items():
        module, param = name.rsplit(".", 1)
        out[f"{CLIP_TO_SDLEARN[module]}.{param}"] = tensor
    return out


# --- the attention function -------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("lengths", [(7, 9), (9, 9)], ids=["Tq<Tk", "Tq=Tk"])
def test_readable_matches_torch_float32(case, lengths):
    q, k, v = qkv(1, *lengths)
    ours, theirs = masks(2, *lengths)[case]
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, **ours),
        F.scaled_dot_product_attention(q, k, v, **theirs),
    )


@pytest.mark.parametrize("case", CASES)
def test_readable_matches_torch_bfloat16(case):
    q, k, v = qkv(3, dtype=torch.bfloat16)
    ours, theirs = masks(4)[case]
    actual = scaled_dot_product_attention(q, k, v, **ours)
    expected = F.scaled_dot_product_attention(q, k, v, **theirs)
    assert actual.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits. The two round the scores and the weights
    # at different points, so they differ by a unit or two in the last place,
    # and one unit is 2^-6 = 0.016 for outputs between 2 and 4.
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize("kind", ["bool", "additive -inf"])
def test_fully_masked_row_gives_zeros_and_no_nan(kind):
    q, k, v = qkv(5)
    q.requires_grad_()
    k.requires_grad_()
    keep = torch.ones(7, 9, dtype=torch.bool)
    keep[2] = False  # query 2 may attend to nothing
    mask = keep if kind == "bool" else torch.zeros(7, 9).masked_fill(~keep, -torch.inf)

    out = scaled_dot_product_attention(q, k, v, mask=mask)

    torch.testing.assert_close(out[:, :, 2], torch.zeros(2, 3, 8))
    rows = [i for i in range(7) if i != 2]
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[:, :, rows], expected[:, :, rows])
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    # torch 2.13's kernel gives zeros too, as the docstring says
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, mask))


def test_causal_mask_is_top_left_aligned():
    expected = torch.tensor(
        [[True, False, False, False], [True, True, False, False]], dtype=torch.bool
    )
    torch.testing.assert_close(causal_mask(2, 4), expected)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 3, 7, 8), (2, 3, 9, 8), (3, 9, 8)), r"rank 4.*v \(3, 9, 8\)"),
        (((2, 3, 7, 8), (1, 3, 9, 8), (1, 3, 9, 8)), r"same batch size B.*k \(1, 3"),
        (((2, 3, 7, 8), (2, 4, 9, 8), (2, 4, 9, 8)), r"same number of heads nh"),
        (
            ((2, 3, 7, 8), (2, 3, 9, 6), (2, 3, 9, 8)),
            r"same head dim hd.*k \(2, 3, 9, 6",
        ),
        (((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 5, 8)), r"same number of tokens Tk"),
    ],
)
def test_function_rejects_mismatched_shapes(shapes, message):
    q, k, v = (torch.zeros(shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        scaled_dot_product_attention(q, k, v)


def test_function_rejects_bad_masks():
    q, k, v = qkv(6)
    with pytest.raises(
        ValueError, match=r"\(B, nh, Tq, Tk\) = \(2, 3, 7, 9\), got \(7, 7\)"
    ):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(7, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool .* or floating .*got torch.int64"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(7, 9, dtype=torch.long))


# --- heads ------------------------------------------------------------------


def test_split_and_merge_heads():
    x = torch.arange(2 * 5 * 12.0).reshape(2, 5, 12)
    heads = split_heads(x, num_heads=3)
    assert heads.shape == (2, 3, 5, 4)
    torch.testing.assert_close(heads[:, 1], x[..., 4:8])  # head 1: features 4..7
    torch.testing.assert_close(merge_heads(heads), x)


def test_heads_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"divisible by num_heads=5, got \(2, 5, 12\)"):
        split_heads(torch.zeros(2, 5, 12), num_heads=5)
    with pytest.raises(ValueError, match=r"\(B, nh, T, hd\), got \(2, 5, 12\)"):
        merge_heads(torch.zeros(2, 5, 12))


# --- the layer against reference tensors -----------------------------------


@pytest.fixture(scope="module")
def reference():
    return load_reference("attention")


@pytest.mark.parametrize("backend", ["fused", "readable"])
def test_self_attention_matches_diffusers_reference(reference, backend):
    layer = Attention(12, heads=2, dim_head=4)
    layer.load_state_dict(state_dict(reference, "self_attn.weights"))
    set_attention_backend(layer, backend)
    with torch.no_grad():
        out = layer(reference["self_attn.hidden_states"])
    torch.testing.assert_close(out, reference["self_attn.output"])


@pytest.mark.parametrize("backend", ["fused", "readable"])
def test_cross_attention_matches_diffusers_reference(reference, backend):
    layer = Attention(12, cross_attention_dim=10, heads=2, dim_head=4)
    layer.load_state_dict(state_dict(reference, "cross_attn.weights"))
    set_attention_backend(layer, backend)
    with torch.no_grad():
        out = layer(
            reference["cross_attn.hidden_states"],
            encoder_hidden_states=reference["cross_attn.encoder_hidden_states"],
            attention_mask=reference["cross_attn.attention_mask"],  # (B, 1, S)
        )
    torch.testing.assert_close(out, reference["cross_attn.output"])


@pytest.mark.parametrize("backend", ["fused", "readable"])
def test_causal_attention_matches_clip_reference(reference, backend):
    layer = Attention(12, heads=2, dim_head=6, bias=True)
    layer.load_state_dict(clip_to_sdlearn(state_dict(reference, "clip.weights")))
    set_attention_backend(layer, backend)
    x = reference["clip.hidden_states"]
    padding = reference["clip.padding_mask"].bool()  # (B, T), True = a real token
    with torch.no_grad():
        out = layer(x, causal=True)
        out_padded = layer(x, attention_mask=padding, causal=True)
    torch.testing.assert_close(out, reference["clip.output"])
    torch.testing.assert_close(out_padded, reference["clip.output_padded"])


# --- the layer against the live libraries -----------------------------------


@needs_diffusers
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attention_matches_live_diffusers(cross):
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    context_dim = 24 if cross else None
    theirs = randomize_(
        DiffusersAttention(16, cross_attention_dim=context_dim, heads=4, dim_head=8),
        seed=11,
        scale=0.3,
    )
    ours = Attention(16, cross_attention_dim=context_dim, heads=4, dim_head=8)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()

    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 6, 16, generator=g)
    context = torch.randn(3, 5, 24, generator=g) if cross else None
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=context)
        for backend in ("fused", "readable"):
            out = set_attention_backend(ours, backend)(x, encoder_hidden_states=context)
            torch.testing.assert_close(out, expected)


@needs_transformers
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_causal_attention_matches_live_clip(implementation):
    from transformers import CLIPTextConfig
    from transformers.masking_utils import create_causal_mask
    from transformers.models.clip.modeling_clip import CLIPAttention

    config = CLIPTextConfig(
        hidden_size=16,
        num_attention_heads=4,
        intermediate_size=64,
        attn_implementation=implementation,
    )
    theirs = randomize_(CLIPAttention(config), seed=13, scale=0.3)
    ours = Attention(16, heads=4, dim_head=4, bias=True)
    ours.load_state_dict(clip_to_sdlearn(theirs.state_dict()))

    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        # What CLIPTextTransformer passes: eager gets a (B, 1, T, T) additive
        # mask, sdpa gets None and is_causal=True (CLIPAttention.is_causal is
        # False, so calling it with neither would not be causal)
        mask = create_causal_mask(config, x, None, past_key_values=None)
        assert (mask is None) == (implementation == "sdpa")
        expected = theirs(x, attention_mask=mask, is_causal=True)[0]
        for backend in ("fused", "readable"):
            out = set_attention_backend(ours, backend)(x, causal=True)
            torch.testing.assert_close(out, expected)


# --- backends ---------------------------------------------------------------


def test_set_attention_backend_reaches_nested_layers():
    model = nn.Sequential(
        Attention(8, heads=2, dim_head=4), nn.Sequential(Attention(8))
    )
    assert set_attention_backend(model, "readable") is model
    assert [m.backend for m in model.modules() if isinstance(m, Attention)] == [
        "readable",
        "readable",
    ]
    with pytest.raises(
        ValueError, match=r"unknown backend 'flash'.*'fused', 'readable'"
    ):
        set_attention_backend(model, "flash")


def test_forward_rejects_unknown_backend():
    layer = Attention(8, heads=2, dim_head=4)
    layer.backend = "flash"
    with pytest.raises(ValueError, match=r"unknown backend 'flash'"):
        layer(torch.zeros(1, 3, 8))


def layer_masks(seed: int) -> dict[str, tuple[torch.Tensor | None, bool]]:
    """(attention_mask, causal) for a layer with B=2, nh=2, T=5, S=5."""
    g = torch.Generator().manual_seed(seed)
    padding = torch.ones(2, 5, dtype=torch.bool)
    padding[1, 3:] = False
    not_first = torch.ones(2, 5, dtype=torch.bool)
    not_first[:, 0] = False  # with causal, query 0 may attend to nothing
    return {
        "none": (None, False),
        "causal": (None, True),
        "(B, S) bool": (padding, False),
        "(B, S) bool, causal": (padding, True),
        "(B, 1, S) additive": ((~padding).float()[:, None] * -10000.0, False),
        "(B, T, S) additive, causal": (torch.randn(2, 5, 5, generator=g), True),
        "(B, nh, T, S) bool": (torch.rand(2, 2, 5, 5, generator=g) > 0.5, False),
        "fully masked row, causal": (not_first, True),
    }


@pytest.mark.parametrize("case", list(layer_masks(0)))
def test_fused_and_readable_agree(case):
    layer = randomize_(Attention(8, heads=2, dim_head=4, bias=True), seed=21, scale=0.3)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(22))
    mask, causal = layer_masks(23)[case]
    with torch.no_grad():
        fused = set_attention_backend(layer, "fused")(x, None, mask, causal)
        readable = set_attention_backend(layer, "readable")(x, None, mask, causal)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(readable, fused)


def test_layer_rejects_bad_inputs():
    self_attn = Attention(8, heads=2, dim_head=4)
    cross_attn = Attention(8, cross_attention_dim=6, heads=2, dim_head=4)
    x = torch.zeros(2, 5, 8)
    with pytest.raises(
        ValueError, match=r"hidden_states of shape \(B, T, 8\), got \(2, 5, 6\)"
    ):
        self_attn(torch.zeros(2, 5, 6))
    with pytest.raises(
        ValueError, match=r"hidden_states of shape \(B, T, 8\), got \(5, 8\)"
    ):
        self_attn(torch.zeros(5, 8))
    with pytest.raises(
        ValueError, match=r"encoder_hidden_states of shape \(2, S, 6\), got \(2, 4, 8\)"
    ):
        cross_attn(x, torch.zeros(2, 4, 8))
    with pytest.raises(
        ValueError, match=r"encoder_hidden_states of shape \(2, S, 6\), got \(3, 4, 6\)"
    ):
        cross_attn(x, torch.zeros(3, 4, 6))
    with pytest.raises(
        ValueError, match=r"context tokens of width 6; pass encoder_hidden_states"
    ):
        cross_attn(x)
    with pytest.raises(ValueError, match=r"\(B, S\) = \(2, 4\).*got \(2, 5\)"):
        cross_attn(x, torch.zeros(2, 4, 6), attention_mask=torch.ones(2, 5).bool())
    with pytest.raises(ValueError, match=r"attention_mask .*got \(1, 2, 2, 5, 5\)"):
        self_attn(x, attention_mask=torch.ones(1, 2, 2, 5, 5).bool())
    with pytest.raises(ValueError, match=r"got torch.int64; .* pass mask.bool\(\)"):
        self_attn(x, attention_mask=torch.ones(2, 5, dtype=torch.long))
