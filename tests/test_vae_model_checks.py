"""Chapter 02's whole-autoencoder checks (encode, decode, forward, the training
loss, PSNR): right answers pass and are kept, every named mistake is recognised
by name, an untouched exercise gets no hint, a wrong answer is not kept and
forgets a kept one, and kept answers run the real tiny VAE."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from sdlearn import vae
from sdlearn.checks import answers
from sdlearn.checks import vae_model as checks
from sdlearn.vae import AutoencoderOutput, DiagonalGaussian
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


def encode(self, x):
    return DiagonalGaussian(self.quant_conv(self.encoder(x)))


def decode(self, z):
    return self.decoder(self.post_quant_conv(z))


def forward(self, x, sample_posterior=False, generator=None):
    posterior = self.encode(x)
    z = posterior.sample(generator) if sample_posterior else posterior.mode()
    return AutoencoderOutput(self.decode(z), posterior)


def loss_forward(self, batch, generator=None):
    x = batch["pixel_values"]
    out = self.vae(x, sample_posterior=True, generator=generator)
    mse = F.mse_loss(out.reconstruction, x)
    kl = out.posterior.kl().mean() / out.posterior.mean[0].numel()
    return mse + self.kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}


def psnr(images, references):
    a = (images.clamp(-1, 1) + 1) / 2
    b = (references + 1) / 2
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (checks.check_encode, encode, vae.AutoencoderKL.encode, checks.ENCODE_PART),
    (checks.check_decode, decode, vae.AutoencoderKL.decode, checks.DECODE_PART),
    (checks.check_forward, forward, vae.AutoencoderKL.forward, checks.FORWARD_PART),
    (checks.check_vae_loss, loss_forward, vae.VAELoss.forward, checks.LOSS_PART),
    (checks.check_psnr, psnr, vae.psnr, checks.PSNR_PART),
]
IDS = ["encode", "decode", "forward", "loss", "psnr"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    assert_passes_and_is_kept(check, right, package, part, capsys)


def test_kept_answers_run_the_real_tiny_vae_and_its_loss(capsys):
    for check, right, _, _ in EXERCISES:
        assert check(right)
    kept = answers.kept("vae")
    model = vae.AutoencoderKL.pretrained_tiny()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = vae.VAELoss(model, kl_weight=0.5)
    with torch.no_grad():
        expected = model(x, True, torch.Generator().manual_seed(1)).reconstruction
        expected_loss, _ = loss({"pixel_values": x}, torch.Generator().manual_seed(2))
        model.encode = types.MethodType(kept["AutoencoderKL.encode"], model)
        model.decode = types.MethodType(kept["AutoencoderKL.decode"], model)
        answers.install_forward(model, vae.AutoencoderKL, kept["AutoencoderKL.forward"])
        answers.install_forward(loss, vae.VAELoss, kept["VAELoss.forward"])
        ours = model(x, True, torch.Generator().manual_seed(1)).reconstruction
        torch.testing.assert_close(ours, expected)
        ours_loss, _ = loss({"pixel_values": x}, torch.Generator().manual_seed(2))
        torch.testing.assert_close(ours_loss, expected_loss)
        torch.testing.assert_close(kept["psnr"](ours, x), vae.psnr(ours, x))


# --- every named mistake is recognised by name --------------------------------------

MISTAKES = [
    (checks.check_encode, "Exercise 02.10", checks.ENCODE_MISTAKES),
    (checks.check_decode, "Exercise 02.11", checks.DECODE_MISTAKES),
    (checks.check_forward, "Exercise 02.12", checks.FORWARD_MISTAKES),
    (checks.check_vae_loss, "Exercise 02.13", checks.LOSS_MISTAKES),
    (checks.check_psnr, "Exercise 02.14", checks.PSNR_MISTAKES),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


# --- a learner's slips, written as a learner would ----------------------------------


def test_a_decode_that_unscales_is_named(capsys):
    def unscaling(self, z):
        return self.decoder(self.post_quant_conv(z / self.config.scaling_factor))

    assert not checks.check_decode(unscaling)
    assert "the pipeline unscales them" in capsys.readouterr().out


def test_a_forward_that_returns_a_plain_tuple_is_refused(capsys):
    # later cells read vae(x).reconstruction: a plain tuple would crash there
    def plain(self, x, sample_posterior=False, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mean
        return self.decode(z), posterior

    assert not checks.check_forward(plain)
    assert "return AutoencoderOutput(" in capsys.readouterr().out


def test_a_psnr_on_the_whole_batch_is_named(capsys):
    def whole_batch(images, references):
        a, b = (images.clamp(-1, 1) + 1) / 2, (references + 1) / 2
        return 10 * torch.log10(1 / ((a - b) ** 2).mean().clamp_min(1e-10))

    assert not checks.check_psnr(whole_batch)
    assert "one PSNR for the whole batch" in capsys.readouterr().out


def test_the_failure_message_describes_the_model_briefly(capsys):
    checks.check_decode(lambda self, z: z)
    out = capsys.readouterr().out
    assert "AutoencoderKL with levels (8, 8, 16), scaling factor 0.5" in out
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
