"""Chapter 02's exercise checks: right answers pass and are kept, every named
mistake is recognised by name, an untouched exercise gets no hint, a wrong answer
is not kept, and no check raises."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlearn import blocks, vae
from sdlearn.checks import answers
from sdlearn.checks import vae as checks
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


def resnet_forward(self, x, temb=None):
    h = self.conv1(F.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
    h = self.conv2(self.dropout(F.silu(self.norm2(h))))
    if self.conv_shortcut is not None:
        x = self.conv_shortcut(x)
    return x + h


def encoder_forward(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
        for resnet in block.resnets:
            x = resnet(x)
        if block.downsamplers is not None:
            x = block.downsamplers[0](x)
    x = self.mid_block.resnets[0](x)
    x = self.mid_block.attentions[0](x)
    x = self.mid_block.resnets[1](x)
    return self.conv_out(F.silu(self.conv_norm_out(x)))


def decoder_forward(self, z):
    x = self.conv_in(z)
    x = self.mid_block(x)
    for block in self.up_blocks:
        for resnet in block.resnets:
            x = resnet(x)
        if block.upsamplers is not None:
            x = block.upsamplers[0](x)
    return self.conv_out(F.silu(self.conv_norm_out(x)))


def sample(self, generator=None):
    device = self.mean.device if generator is None else generator.device
    eps = torch.randn(
        self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
    ).to(self.mean.device)
    return self.mean + self.std * eps


def kl(self):
    return 0.5 * (self.mean**2 + self.var - 1 - self.logvar).sum(dim=(1, 2, 3))


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (
        checks.check_resnet_forward,
        resnet_forward,
        blocks.ResnetBlock.forward,
        checks.RESNET_PART,
    ),
    (
        checks.check_encoder_forward,
        encoder_forward,
        vae.Encoder.forward,
        checks.ENCODER_PART,
    ),
    (
        checks.check_decoder_forward,
        decoder_forward,
        vae.Decoder.forward,
        checks.DECODER_PART,
    ),
    (checks.check_sample, sample, vae.DiagonalGaussian.sample, checks.SAMPLE_PART),
    (checks.check_kl, kl, vae.DiagonalGaussian.kl, checks.KL_PART),
]
IDS = ["resnet", "encoder", "decoder", "sample", "kl"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    assert_passes_and_is_kept(check, right, package, part, capsys)


def test_kept_answers_run_the_real_tiny_vae(capsys):
    for check, right, _, _ in EXERCISES:
        assert check(right)
    model = vae.AutoencoderKL.pretrained_tiny()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = model(x).reconstruction
        kept = answers.kept("blocks") | answers.kept("vae")
        assert (
            answers.install_forward(
                model, blocks.ResnetBlock, kept["ResnetBlock.forward"]
            )
            > 0
        )
        answers.install_forward(model, vae.Encoder, kept["Encoder.forward"])
        answers.install_forward(model, vae.Decoder, kept["Decoder.forward"])
        torch.testing.assert_close(model(x).reconstruction, expected)
        posterior = model.encode(x)
        torch.testing.assert_close(
            kept["DiagonalGaussian.sample"](
                posterior, torch.Generator().manual_seed(3)
            ),
            posterior.sample(torch.Generator().manual_seed(3)),
        )
        torch.testing.assert_close(
            kept["DiagonalGaussian.kl"](posterior), posterior.kl()
        )


# --- every named mistake is recognised by name --------------------------------------

MISTAKES = [
    (checks.check_resnet_forward, "Exercise 02.1", checks.RESNET_MISTAKES),
    (checks.check_encoder_forward, "Exercise 02.6", checks.ENCODER_MISTAKES),
    (checks.check_decoder_forward, "Exercise 02.7", checks.DECODER_MISTAKES),
    (checks.check_sample, "Exercise 02.8", checks.SAMPLE_MISTAKES),
    (checks.check_kl, "Exercise 02.9", checks.KL_MISTAKES),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


# --- a learner's slips, written as a learner would ----------------------------------


def test_a_resnet_forward_with_relu_is_named_and_not_kept(answers_home, capsys):
    def relu_forward(self, x, temb=None):
        h = self.conv1(F.relu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.relu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.relu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h

    assert not checks.check_resnet_forward(relu_forward)
    assert "ReLU where the block uses SiLU" in capsys.readouterr().out
    assert "ResnetBlock.forward" not in answers.kept("blocks")


def test_a_resnet_forward_without_the_shortcut_conv_names_the_line(capsys):
    def no_shortcut(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h

    # right when the channels stay the same, an error when they change
    assert not checks.check_resnet_forward(no_shortcut)
    out = capsys.readouterr().out
    assert "raised RuntimeError" in out and "return x + h" in out


def test_the_resnet_failure_message_describes_the_block_briefly(capsys):
    checks.check_resnet_forward(lambda self, x, temb=None: x)
    out = capsys.readouterr().out
    assert "ResnetBlock with 8 -> 8 channels" in out
    assert "GroupNorm" not in out  # not the module's many-line repr


def test_an_encoder_that_forgets_the_mid_block_is_named(capsys):
    def encoder_without_mid(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    assert not checks.check_encoder_forward(encoder_without_mid)
    assert "the mid block is left out" in capsys.readouterr().out


def test_a_sample_with_randn_like_is_named(capsys):
    def sample_ignoring_generator(self, generator=None):
        return self.mean + self.std * torch.randn_like(self.mean)

    assert not checks.check_sample(sample_ignoring_generator)
    assert "draw it with `generator`" in capsys.readouterr().out


def test_a_kl_summed_over_everything_is_named(capsys):
    assert not checks.check_kl(lambda self: kl(self).sum())
    out = capsys.readouterr().out
    assert "summed over the batch too" in out


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(
    check, right, package, part, capsys
):
    wrong = off_by_half(package)
    assert_wrong_is_not_kept(check, right, wrong, package, part, capsys)


# --- untouched exercises ---------------------------------------------------------

ALL_CHECKS = [
    checks.check_resnet_forward,
    checks.check_encoder_forward,
    checks.check_decoder_forward,
    checks.check_sample,
    checks.check_kl,
]


@pytest.mark.parametrize("check", ALL_CHECKS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys):
    assert_untouched_gets_no_hint(check, capsys)


@pytest.mark.parametrize("check", ALL_CHECKS)
def test_hints_come_in_three_tiers_and_the_first_gives_no_code(check):
    exercise = check.__doc__.split(":")[0]  # "Exercise 02.1"
    assert_three_hint_tiers(check, exercise, ("self.", "F.", "("))


def test_checks_leave_the_global_random_state_alone():
    assert_random_state_untouched(
        [
            (checks.check_resnet_forward, resnet_forward),
            (checks.check_sample, sample),
            (checks.check_kl, kl),
        ]
    )
