"""Chapter 07's exercise checks on the loss: right answers pass and are kept,
typical slips fail and are named, none raise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdlearn import stages, training
from sdlearn.checks import answers
from sdlearn.checks import training as checks
from sdlearn.diffusion_loss import DiffusionLoss
from tests.helpers import assert_refused, assert_unsolved_never_raise

# --- right answers, written as a learner would ---


def diffusion_loss(
    unet, scheduler, batch, text_tokens, scaling_factor, caption_dropout, generator
):
    mean, std = batch["mean"], batch["std"]
    B = mean.shape[0]
    eps = torch.randn(mean.shape, generator=generator)
    z0 = (mean + std * eps) * scaling_factor
    t = torch.randint(
        0, scheduler.config.num_train_timesteps, (B,), generator=generator
    )
    noise = torch.randn(z0.shape, generator=generator)
    z_t = scheduler.add_noise(z0, noise, t)
    keep = torch.rand(B, generator=generator) >= caption_dropout
    rows = torch.where(keep, batch["caption"], 0)
    return F.mse_loss(unet(z_t, t, text_tokens[rows]), noise)


def lr_factor(step, config):
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    progress = min(progress, 1.0)
    cosine = (1 + math.cos(math.pi * progress)) / 2
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def as_method(loss):
    """A loss written as a function of the parts, as `DiffusionLoss.forward`."""

    def forward(self, batch, generator):
        parts = (self.unet, self.scheduler, batch, self.text_tokens)
        return loss(*parts, self.scaling_factor, self.caption_dropout, generator), {}

    forward.__name__ = loss.__name__
    return forward


def diffusion_loss_forward(self, batch, generator=None):
    mean, std = batch["mean"], batch["std"]
    B, device = mean.shape[0], mean.device
    z0 = (
        mean + std * torch.randn(mean.shape, generator=generator)
    ) * self.scaling_factor
    t = self.timesteps(B, generator, device)
    noise = torch.randn(z0.shape, generator=generator)
    z_t = self.scheduler.add_noise(z0, noise, t)
    keep = torch.rand(B, generator=generator) >= self.caption_dropout
    rows = torch.where(keep, batch["caption"], 0)
    return F.mse_loss(self.unet(z_t, t, self.context(rows)), noise), {}


def timesteps(self, B, generator, device):
    T = self.scheduler.config.num_train_timesteps
    if self.timestep_bias == 1:
        return torch.randint(0, T, (B,), generator=generator, device=device)
    weights = torch.where(torch.arange(T) < T // 2, 1.0, self.timestep_bias)
    return torch.multinomial(weights, B, replacement=True, generator=generator)


def timesteps_to_T_minus_one(self, B, generator, device):
    T = self.scheduler.config.num_train_timesteps
    if self.timestep_bias == 1:  # as if randint's upper bound were included
        return torch.randint(0, T - 1, (B,), generator=generator, device=device)
    weights = torch.where(torch.arange(T) < T // 2, 1.0, self.timestep_bias)
    return torch.multinomial(weights, B, replacement=True, generator=generator)


def timesteps_without_bias(self, B, generator, device):
    T = self.scheduler.config.num_train_timesteps
    return torch.randint(0, T, (B,), generator=generator, device=device)


def encode_shapes(vae, text_encoder, tokenizer, dataset, batch_size=256, progress=True):
    captions, items = [""], []
    for start in range(0, len(dataset), batch_size):
        batch = [
            dataset[i] for i in range(start, min(start + batch_size, len(dataset)))
        ]
        posterior = vae.encode(torch.stack([b["pixel_values"] for b in batch]))
        for i, item in enumerate(batch):
            if item["caption"] not in captions:
                captions.append(item["caption"])
            row = captions.index(item["caption"])
            items.append(
                {"mean": posterior.mean[i], "std": posterior.std[i], "caption": row}
            )
    return items, text_encoder(tokenizer(captions)), captions


@pytest.mark.parametrize(
    ("check", "right", "part"),
    [
        ("check_encode_shapes", encode_shapes, "stages:encode_shapes"),
        (
            "check_diffusion_loss",
            diffusion_loss_forward,
            "diffusion_loss:DiffusionLoss.forward",
        ),
        ("check_lr_factor", lr_factor, "training:lr_factor"),
        ("check_timesteps", timesteps, "diffusion_loss:DiffusionLoss.timesteps"),
    ],
    ids=lambda v: v if isinstance(v, str) and ":" in v else None,
)
def test_right_answers_pass_and_are_kept(check, right, part, answers_home, capsys):
    assert getattr(checks, check)(right)
    out = capsys.readouterr().out
    assert "✅" in out and "Kept in" in out
    module, name = part.split(":")
    assert name in answers.kept(module)
    assert answers.is_learners(answers.use(part, None, getattr(checks, check)))
    # a wrong try later forgets it: the package's stands in again
    assert not getattr(checks, check)(lambda *args, **kwargs: None)
    assert name not in answers.kept(module)


def test_the_package_passes_its_own_checks(answers_home, capsys):
    assert checks.check_encode_shapes(stages.encode_shapes)
    assert checks.check_diffusion_loss(DiffusionLoss.forward)
    assert checks.check_lr_factor(training.lr_factor)
    assert checks.check_timesteps(DiffusionLoss.timesteps)


def test_checks_leave_the_global_seed_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checks.check_diffusion_loss(diffusion_loss_forward)
    torch.testing.assert_close(torch.rand(3), expected)


def test_loss_cases_drop_some_captions_and_noise_to_varied_timesteps():
    # a case that drops nothing, one that drops everything, one in between
    dropped = []
    for case in checks._loss_cases()[:3]:
        text_tokens = case.args[0].args[0].text_tokens
        context = case.expected["context"]
        dropped.append(int((context == text_tokens[0]).all(dim=(1, 2)).sum()))
        assert len(set(case.expected["timestep"].tolist())) == checks.B
    assert dropped[1] == 0 and dropped[2] == checks.B and 0 < dropped[0] < checks.B


# --- typical slips ---


def right_draws(batch, text_tokens, scale, p, generator):
    """The right answer's random draws, in its order: z0, t, noise, context."""
    mean, std = batch["mean"], batch["std"]
    B = mean.shape[0]
    z0 = (mean + std * torch.randn(mean.shape, generator=generator)) * scale
    t = torch.randint(0, 1000, (B,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    keep = torch.rand(B, generator=generator) >= p
    context = text_tokens[torch.where(keep, batch["caption"], 0)]
    return z0, t, noise, context


def loss_unscaled(unet, scheduler, batch, text_tokens, scaling_factor, p, generator):
    return diffusion_loss(unet, scheduler, batch, text_tokens, 1.0, p, generator)


def loss_posterior_mean(unet, scheduler, batch, text_tokens, scale, p, generator):
    # the mean instead of a sample: one draw fewer, so every later draw shifts
    no_spread = {**batch, "std": torch.zeros_like(batch["std"])}
    t = torch.randint(0, 1000, (batch["mean"].shape[0],), generator=generator)
    del t
    return diffusion_loss(unet, scheduler, no_spread, text_tokens, scale, p, generator)


def loss_timesteps_from_one(unet, scheduler, batch, text_tokens, scale, p, generator):
    mean, std = batch["mean"], batch["std"]
    B = mean.shape[0]
    z0 = (mean + std * torch.randn(mean.shape, generator=generator)) * scale
    t = torch.randint(1, 1001, (B,), generator=generator)  # the paper's 1..T
    noise = torch.randn(z0.shape, generator=generator)
    keep = torch.rand(B, generator=generator) >= p
    context = text_tokens[torch.where(keep, batch["caption"], 0)]
    return F.mse_loss(unet(scheduler.add_noise(z0, noise, t - 1), t, context), noise)


def loss_zero_context(unet, scheduler, batch, text_tokens, scale, p, generator):
    mean, std = batch["mean"], batch["std"]
    B = mean.shape[0]
    z0 = (mean + std * torch.randn(mean.shape, generator=generator)) * scale
    t = torch.randint(0, 1000, (B,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    keep = torch.rand(B, generator=generator) >= p
    context = text_tokens[batch["caption"]] * keep[:, None, None]  # zeros, not ""
    return F.mse_loss(unet(scheduler.add_noise(z0, noise, t), t, context), noise)


def loss_drops_the_kept(unet, scheduler, batch, text_tokens, scale, p, generator):
    # `rand > p` drops 1 - p of the captions
    return diffusion_loss(unet, scheduler, batch, text_tokens, scale, 1 - p, generator)


def loss_predicts_z0(unet, scheduler, batch, text_tokens, scale, p, generator):
    z0, t, noise, context = right_draws(batch, text_tokens, scale, p, generator)
    return F.mse_loss(unet(scheduler.add_noise(z0, noise, t), t, context), z0)


def loss_per_image(unet, scheduler, batch, text_tokens, scale, p, generator):
    z0, t, noise, context = right_draws(batch, text_tokens, scale, p, generator)
    prediction = unet(scheduler.add_noise(z0, noise, t), t, context)
    return (prediction - noise).pow(2).mean(dim=(1, 2, 3))  # (B,), not one number


def loss_two_unet_calls(unet, scheduler, batch, text_tokens, scale, p, generator):
    half = batch["mean"].shape[0] // 2
    first = {k: v[:half] for k, v in batch.items()}
    second = {k: v[half:] for k, v in batch.items()}
    a = diffusion_loss(unet, scheduler, first, text_tokens, scale, p, generator)
    b = diffusion_loss(unet, scheduler, second, text_tokens, scale, p, generator)
    return (a + b) / 2


def lr_warmup_from_zero(step, config):
    if step < config.warmup_steps:
        return step / config.warmup_steps
    return lr_factor(step, config)


def lr_cosine_to_zero(step, config):
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(
        1.0, (step - config.warmup_steps) / (config.steps - config.warmup_steps)
    )
    return (1 + math.cos(math.pi * progress)) / 2


def lr_cosine_over_the_whole_run(step, config):
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    cosine = (1 + math.cos(math.pi * min(1.0, step / config.steps))) / 2
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def lr_not_capped(step, config):
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / (config.steps - config.warmup_steps)
    cosine = (1 + math.cos(math.pi * progress)) / 2  # rises again after the end
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def lr_linear_decay(step, config):
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(
        1.0, (step - config.warmup_steps) / (config.steps - config.warmup_steps)
    )
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * (1 - progress)


def loss_without_timestep_bias(self, batch, generator=None):
    # torch.randint where self.timesteps draws the biased timesteps
    parts = (self.unet, self.scheduler, batch, self.text_tokens, self.scaling_factor)
    return diffusion_loss(*parts, self.caption_dropout, generator), {}


def forward_without_metrics(self, batch, generator=None):
    return diffusion_loss_forward(self, batch, generator)[0]


def encode_slip(slip):
    return checks._encode_slip(slip).__wrapped__


ENCODE_SLIPS = {
    "variance": encode_slip("variance"),
    "a row of its own": encode_slip("a row per image"),
    "row 0 of the table": encode_slip("no empty prompt"),
    "last, shorter batch": encode_slip("last"),
}


@pytest.mark.parametrize(
    ("check", "wrong", "says"),
    [
        ("check_diffusion_loss", as_method(loss_unscaled), "noisy latents"),
        ("check_diffusion_loss", as_method(loss_posterior_mean), "timesteps differ"),
        (
            "check_diffusion_loss",
            as_method(loss_timesteps_from_one),
            "timesteps differ",
        ),
        ("check_diffusion_loss", as_method(loss_zero_context), "became zeros"),
        ("check_diffusion_loss", as_method(loss_drops_the_kept), "tokens differ"),
        ("check_diffusion_loss", as_method(loss_predicts_z0), "target is the noise"),
        ("check_diffusion_loss", as_method(loss_per_image), "shape"),
        ("check_diffusion_loss", as_method(loss_two_unet_calls), "UNet 2 times"),
        ("check_diffusion_loss", loss_without_timestep_bias, "ignore timestep_bias"),
        ("check_diffusion_loss", forward_without_metrics, "a pair (loss, metrics)"),
        ("check_timesteps", timesteps_to_T_minus_one, "upper bound is excluded"),
        ("check_timesteps", timesteps_without_bias, "the bias was ignored"),
        ("check_lr_factor", lr_warmup_from_zero, "warm-up starts at 0"),
        ("check_lr_factor", lr_cosine_to_zero, "cosine ends at 0"),
        ("check_lr_factor", lr_cosine_over_the_whole_run, "counts from step 0"),
        ("check_lr_factor", lr_not_capped, "cap the progress"),
        ("check_lr_factor", lr_linear_decay, "straight line"),
    ]
    + [("check_encode_shapes", wrong, says) for says, wrong in ENCODE_SLIPS.items()]
    + [
        ("check_timesteps", wrong.__wrapped__, says[:40])
        for says, wrong in checks.TIMESTEP_MISTAKES.items()
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_typical_slips_fail_with_a_hint(capsys, check, wrong, says):
    out = assert_refused(getattr(checks, check), wrong, capsys)
    assert says in out, out


def test_unsolved_exercises_never_raise(capsys):
    assert_unsolved_never_raise(
        [
            checks.check_encode_shapes,
            checks.check_diffusion_loss,
            checks.check_lr_factor,
        ],
        capsys,
    )


def loss_that_crashes(self, batch, generator=None):
    return batch.pixel_values


def test_a_crash_names_the_learners_line(capsys):
    assert not checks.check_diffusion_loss(loss_that_crashes)
    out = capsys.readouterr().out
    assert "raised AttributeError" in out and "return batch.pixel_values" in out
