"""Chapter 04's exercise checks: right answers pass, usual mistakes fail, none raise."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdlearn import unet as sd
from sdlearn.checks import Verdict
from sdlearn.checks import unet as checks


def unsolved(*args):
    raise NotImplementedError


# --- right answers, written the way a learner would ---------------------------


def timestep_embedding(timesteps, dim, cos_first=True):
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half) / half)
    angles = timesteps.float()[:, None] * frequencies[None, :]
    parts = [angles.cos(), angles.sin()] if cos_first else [angles.sin(), angles.cos()]
    return F.pad(torch.cat(parts, dim=-1), (0, dim % 2))


def resnet_forward(block, x, temb, temb_after_conv2=False, residual=True):
    h = block.conv1(F.silu(block.norm1(x)))
    t = block.time_emb_proj(F.silu(temb))[:, :, None, None]
    if not temb_after_conv2:
        h = h + t
    h = block.conv2(F.silu(block.norm2(h)))
    if temb_after_conv2:
        h = h + t
    if not residual:
        return h
    if block.conv_shortcut is not None:
        x = block.conv_shortcut(x)
    return x + h


def transformer_block_forward(block, x, context, skip=None, attn2_context=True):
    r = [0 if skip == i else 1 for i in range(3)]
    x = r[0] * x + block.attn1(block.norm1(x))
    if attn2_context:
        x = r[1] * x + block.attn2(block.norm2(x), context)
    else:  # cross-attention to the pixels themselves
        x = r[1] * x + block.attn2(block.norm2(x), block.norm2(x))
    return r[2] * x + block.ff(block.norm3(x))


def test_right_answers_pass(capsys):
    assert checks.check_timestep_embedding(timestep_embedding)
    assert checks.check_timestep_embedding(sd.timestep_embedding)
    assert checks.check_resnet_forward(resnet_forward)
    assert checks.check_resnet_forward(lambda block, x, temb: block(x, temb))
    assert checks.check_transformer_block_forward(transformer_block_forward)
    assert checks.check_transformer_block_forward(lambda block, x, c: block(x, c))
    assert capsys.readouterr().out.count("✅") == 6


# --- typical mistakes ------------------------------------------------------------


def test_sin_and_cos_swapped_fails(capsys):
    def swapped(t, dim):
        return timestep_embedding(t, dim, cos_first=False)

    assert not checks.check_timestep_embedding(swapped)
    out = capsys.readouterr().out
    assert "❌ Exercise 04.1" in out and "wrong values" in out and "Hint:" in out


def test_embedding_without_the_odd_pad_names_the_shape(capsys):
    def no_pad(t, dim):
        return timestep_embedding(t, dim)[:, : 2 * (dim // 2)]

    assert not checks.check_timestep_embedding(no_pad)
    assert "expected shape" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong",
    [
        lambda b, x, t: resnet_forward(b, x, t, temb_after_conv2=True),
        lambda b, x, t: resnet_forward(b, x, t, residual=False),
        lambda b, x, t: b(x),  # no time embedding at all
    ],
    ids=["temb after conv2", "no residual", "no temb"],
)
def test_wrong_resnet_fails(wrong, capsys):
    verdict = checks.check_resnet_forward(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "❌ Exercise 04.2" in out and "Hint:" in out


@pytest.mark.parametrize(
    "wrong",
    [
        lambda b, x, c: transformer_block_forward(b, x, c, skip=0),
        lambda b, x, c: transformer_block_forward(b, x, c, skip=1),
        lambda b, x, c: transformer_block_forward(b, x, c, skip=2),
        lambda b, x, c: transformer_block_forward(b, x, c, attn2_context=False),
    ],
    ids=["no attn1 residual", "no attn2 residual", "no ff residual", "attn2 on x"],
)
def test_wrong_transformer_block_fails(wrong, capsys):
    verdict = checks.check_transformer_block_forward(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "❌ Exercise 04.3" in out and "Hint:" in out


@pytest.mark.parametrize(
    "check",
    [
        checks.check_timestep_embedding,
        checks.check_resnet_forward,
        checks.check_transformer_block_forward,
    ],
)
def test_unsolved_exercises_print_a_reminder(check, capsys):
    verdict = check(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "raise NotImplementedError" in out
    assert "Hint" not in out  # no hint before a first try
