"""Chapter 02's resampling and attention checks: right answers pass and are kept,
every named mistake is recognised by name, an untouched exercise gets no hint, a
wrong answer is not kept and forgets a kept one, and kept answers run the real
tiny VAE and a UNet."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn import blocks, vae
from sdlearn.checks import answers
from sdlearn.checks import vae_blocks as checks
from tests.check_contract import (
    assert_mistake_named,
    assert_passes_and_is_kept,
    assert_random_state_untouched,
    assert_three_hint_tiers,
    assert_untouched_gets_no_hint,
    assert_wrong_is_not_kept,
    named_mistakes,
    off_by_half,
)

# --- right answers, written as a learner would -------------------------------------


def group_norm_forward(self, x):
    B, C, H, W = x.shape
    g = x.reshape(B, self.num_groups, -1)
    mean = g.mean(dim=-1, keepdim=True)
    var = g.var(dim=-1, correction=0, keepdim=True)
    x = ((g - mean) / torch.sqrt(var + self.eps)).reshape(B, C, H, W)
    if self.affine:
        x = x * self.weight[:, None, None] + self.bias[:, None, None]
    return x


def downsample_forward(self, x):
    if self.padding == 0:
        x = F.pad(x, (0, 1, 0, 1))
    return self.conv(x)


def upsample_forward(self, x, output_size=None):
    if output_size is None:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    else:
        x = F.interpolate(x, size=output_size, mode="nearest")
    return self.conv(x)


def attention_block_forward(self, x):
    B, C, H, W = x.shape
    h = rearrange(self.group_norm(x), "B C H W -> B (H W) C")
    q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
    weights = (q @ k.transpose(1, 2) / math.sqrt(C)).softmax(dim=-1)
    h = self.to_out[0](weights @ v)
    return x + rearrange(h, "B (H W) C -> B C H W", H=H, W=W)


def attention_with_torch(self, x):
    # permute and reshape, and torch's fused attention
    B, C, H, W = x.shape
    h = self.group_norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
    h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
    h = self.to_out[0](h).reshape(B, H, W, C).permute(0, 3, 1, 2)
    return x + h


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (
        checks.check_group_norm_forward,
        group_norm_forward,
        nn.GroupNorm.forward,
        checks.GROUP_NORM_PART,
    ),
    (
        checks.check_downsample_forward,
        downsample_forward,
        blocks.Downsample.forward,
        checks.DOWNSAMPLE_PART,
    ),
    (
        checks.check_upsample_forward,
        upsample_forward,
        blocks.Upsample.forward,
        checks.UPSAMPLE_PART,
    ),
    (
        checks.check_attention_block_forward,
        attention_block_forward,
        vae.AttentionBlock.forward,
        checks.ATTENTION_PART,
    ),
]
IDS = ["group_norm", "downsample", "upsample", "attention"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    assert_passes_and_is_kept(check, right, package, part, capsys)


def test_attention_through_torchs_kernel_and_permute_passes():
    assert checks.check_attention_block_forward(attention_with_torch)


def test_kept_answers_run_the_real_tiny_vae_and_a_unet(capsys):
    for check, right, _, _ in EXERCISES:
        assert check(right)
    kept = answers.kept("blocks") | answers.kept("vae")
    model = vae.AutoencoderKL.pretrained_tiny()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = model(x).reconstruction
        for cls, part in (
            (nn.GroupNorm, "GroupNorm.forward"),
            (blocks.Downsample, "Downsample.forward"),
            (blocks.Upsample, "Upsample.forward"),
            (vae.AttentionBlock, "AttentionBlock.forward"),
        ):
            assert answers.install_forward(model, cls, kept[part]) > 0
        torch.testing.assert_close(
            model(x).reconstruction, expected, atol=1e-4, rtol=1e-4
        )
    # the UNet pads every side: the kept Downsample serves it too
    from sdlearn.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    config = unet.config
    sample = torch.randn(1, config.in_channels, 8, 8)
    context = torch.randn(1, 4, config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(sample, torch.tensor([10]), context)
        for cls in (blocks.Downsample, blocks.Upsample):
            assert answers.install_forward(unet, cls, kept[f"{cls.__name__}.forward"])
        torch.testing.assert_close(unet(sample, torch.tensor([10]), context), expected)


# --- every named mistake is recognised by name --------------------------------------

MISTAKES = [
    (checks.check_group_norm_forward, "Exercise 02.2", checks.GROUP_NORM_MISTAKES),
    (checks.check_downsample_forward, "Exercise 02.3", checks.DOWNSAMPLE_MISTAKES),
    (checks.check_upsample_forward, "Exercise 02.4", checks.UPSAMPLE_MISTAKES),
    (checks.check_attention_block_forward, "Exercise 02.5", checks.ATTENTION_MISTAKES),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


# --- a learner's slips, written as a learner would ----------------------------------


def test_a_downsample_that_always_pads_symmetrically_is_named(capsys):
    def symmetric(self, x):
        return self.conv(F.pad(x, (1, 1, 1, 1)) if self.padding == 0 else x)

    assert not checks.check_downsample_forward(symmetric)
    assert "SD's VAE pads only the right and the bottom" in capsys.readouterr().out


def test_an_attention_that_reshapes_without_permuting_is_named(capsys):
    def reshaped(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, H * W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        h = (q @ k.transpose(1, 2) / C**0.5).softmax(dim=-1) @ v
        return x + self.to_out[0](h).reshape(B, C, H, W)

    assert not checks.check_attention_block_forward(reshaped)
    assert "reshape without permute" in capsys.readouterr().out


def test_the_failure_message_describes_the_block_briefly(capsys):
    checks.check_attention_block_forward(lambda self, x: x)
    out = capsys.readouterr().out
    assert "AttentionBlock over 8 channels" in out
    assert "GroupNorm" not in out  # not the module's many-line repr


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(
    check, right, package, part, capsys
):
    wrong = off_by_half(package)
    assert_wrong_is_not_kept(check, right, wrong, package, part, capsys)


# --- untouched exercises ---------------------------------------------------------

ALL_CHECKS = [check for check, _, _, _ in EXERCISES]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys):
    assert_untouched_gets_no_hint(check, capsys)


@pytest.mark.parametrize("check", ALL_CHECKS, ids=IDS)
def test_hints_come_in_three_tiers_and_the_first_gives_no_code(check):
    exercise = check.__doc__.split(":")[0]  # "Exercise 02.3"
    assert_three_hint_tiers(check, exercise, ("self.", "F.", "("))


def test_checks_leave_the_global_random_state_alone():
    assert_random_state_untouched([(check, right) for check, right, _, _ in EXERCISES])
