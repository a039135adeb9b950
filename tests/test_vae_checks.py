"""Chapter 02's exercise checks: right answers pass, typical slips fail, none raise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import Verdict
from sdlearn.checks import vae as checks
from sdlearn.vae import DiagonalGaussian


def unsolved(*args):
    raise NotImplementedError


# --- right answers, written as a learner would ---


def resnet_forward(block, x, act=F.silu, shortcut=True, order="norm-act-conv"):
    def layer(norm, conv, h):
        if order == "act-norm-conv":
            return conv(norm(act(h)))
        if order == "no-affine":  # GroupNorm without its learned scale and shift
            return conv(act(F.group_norm(h, norm.num_groups, eps=norm.eps)))
        return conv(act(norm(h)))

    h = layer(block.norm1, block.conv1, x)
    h = layer(block.norm2, block.conv2, h)
    if shortcut and block.conv_shortcut is not None:
        x = block.conv_shortcut(x)
    return x + h


def downsample(conv, x, pad=(0, 1, 0, 1)):
    return conv(F.pad(x, pad))


def sample_and_kl(mean, logvar, noise):
    std = torch.exp(0.5 * logvar)
    z = mean + std * noise
    kl = 0.5 * (mean**2 + std**2 - 1 - logvar).sum(dim=(1, 2, 3))
    return z, kl


def sample_and_kl_with_package(mean, logvar, noise):
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    return posterior.mean + posterior.std * noise, posterior.kl()


def test_right_answers_pass(capsys):
    assert checks.check_resnet_forward(resnet_forward)
    assert checks.check_resnet_forward(lambda block, x: block(x))
    assert checks.check_downsample(downsample)
    # the conv's own padding set to 0 explicitly, through the functional form
    assert checks.check_downsample(
        lambda conv, x: F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, 2)
    )
    assert checks.check_sample_and_kl(sample_and_kl)
    assert checks.check_sample_and_kl(sample_and_kl_with_package)
    assert capsys.readouterr().out.count("✅") == 6


# --- typical slips ---


@pytest.mark.parametrize(
    "wrong",
    [
        lambda block, x: resnet_forward(block, x, act=F.relu),
        lambda block, x: resnet_forward(block, x, order="act-norm-conv"),
        lambda block, x: resnet_forward(block, x) - x,  # no residual at all
        lambda block, x: resnet_forward(block, x, order="no-affine"),
    ],
    ids=["relu", "norm after activation", "no residual", "norm without affine"],
)
def test_wrong_resnet_forward_fails_with_the_reason(wrong, capsys):
    verdict = checks.check_resnet_forward(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "❌ Exercise 02.1" in out and "Hint:" in out


def test_resnet_forward_without_the_shortcut_conv_names_the_line(capsys):
    # right when the channels stay the same, an error when they change
    assert not checks.check_resnet_forward(
        lambda block, x: resnet_forward(block, x, shortcut=False)
    )
    out = capsys.readouterr().out
    assert "raised RuntimeError" in out and "return x + h" in out
    assert "conv_shortcut" in out


def test_resnet_failure_message_describes_the_block_briefly(capsys):
    checks.check_resnet_forward(lambda block, x: x)
    out = capsys.readouterr().out
    assert "ResnetBlock with 8 -> 8 channels" in out
    assert "GroupNorm" not in out  # not the module's many-line repr


@pytest.mark.parametrize(
    "pad, why",
    [
        ((1, 1, 1, 1), "wrong values"),  # symmetric padding: same shape, shifted
        ((1, 0, 1, 0), "wrong values"),  # left and top instead of right and bottom
        ((0, 0, 0, 0), "expected shape"),  # no padding: one pixel short
        ((0, 1, 0, 0), "expected shape"),  # only the right column
    ],
)
def test_wrong_downsample_fails_with_the_reason(pad, why, capsys):
    assert not checks.check_downsample(lambda conv, x: downsample(conv, x, pad))
    out = capsys.readouterr().out
    assert "❌ Exercise 02.2" in out and why in out and "Hint:" in out


def test_downsample_with_the_unets_padding_fails(capsys):
    # padding=1 inside the convolution: what the UNet's Downsample does
    assert not checks.check_downsample(
        lambda conv, x: F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
    )
    assert "wrong values" in capsys.readouterr().out


def std_is_variance(mean, logvar, noise):
    z = mean + torch.exp(logvar) * noise
    return z, sample_and_kl(mean, logvar, noise)[1]


def std_is_logvar(mean, logvar, noise):
    return mean + logvar * noise, sample_and_kl(mean, logvar, noise)[1]


def kl_without_half(mean, logvar, noise):
    z, kl = sample_and_kl(mean, logvar, noise)
    return z, 2 * kl


def kl_mean_over_values(mean, logvar, noise):
    z, _ = sample_and_kl(mean, logvar, noise)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean(dim=(1, 2, 3))
    return z, kl


def kl_with_std_for_var(mean, logvar, noise):
    z, _ = sample_and_kl(mean, logvar, noise)
    kl = 0.5 * (mean**2 + torch.exp(0.5 * logvar) - 1 - logvar).sum(dim=(1, 2, 3))
    return z, kl


@pytest.mark.parametrize(
    "wrong",
    [
        std_is_variance,
        std_is_logvar,
        kl_without_half,
        kl_mean_over_values,
        kl_with_std_for_var,
    ],
)
def test_wrong_sample_and_kl_fails_with_the_reason(wrong, capsys):
    assert not checks.check_sample_and_kl(wrong)
    out = capsys.readouterr().out
    assert "❌ Exercise 02.3" in out and "wrong values" in out and "Hint:" in out


def test_kl_summed_over_the_batch_too_names_the_shape(capsys):
    def kl_over_everything(mean, logvar, noise):
        z, kl = sample_and_kl(mean, logvar, noise)
        return z, kl.sum()

    assert not checks.check_sample_and_kl(kl_over_everything)
    out = capsys.readouterr().out
    assert "value 1: returned shape (), expected shape (2,)" in out


def test_sample_and_kl_must_return_two_values(capsys):
    assert not checks.check_sample_and_kl(lambda mean, logvar, noise: mean)
    assert "expected 2 values" in capsys.readouterr().out


@pytest.mark.parametrize(
    "check",
    [checks.check_resnet_forward, checks.check_downsample, checks.check_sample_and_kl],
)
def test_unsolved_exercises_print_a_reminder(check, capsys):
    verdict = check(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "raise NotImplementedError" in out
    assert "Hint" not in out  # no hint before a first try


def test_checks_leave_the_global_random_state_alone():
    state = torch.get_rng_state()
    checks.check_resnet_forward(resnet_forward)
    checks.check_downsample(downsample)
    checks.check_sample_and_kl(sample_and_kl)
    assert torch.equal(torch.get_rng_state(), state)
