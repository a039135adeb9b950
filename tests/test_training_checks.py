"""Chapter 07's exercise checks: right answers pass, typical slips fail, none raise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import training as checks
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


def ema_update(shadow, weights, max_decay, updates):
    decay = min(max_decay, (1 + updates) / (10 + updates))
    new = {}
    for name, value in weights.items():
        if value.dtype.is_floating_point:
            new[name] = decay * shadow[name] + (1 - decay) * value
        else:
            new[name] = value.clone()
    return new


def ema_update_in_place(shadow, weights, max_decay, updates):
    decay = min(max_decay, (1 + updates) / (10 + updates))
    for name, value in weights.items():
        if value.dtype.is_floating_point:
            shadow[name].lerp_(value, 1 - decay)
        else:
            shadow[name].copy_(value)
    return shadow


def test_right_answers_pass(capsys):
    assert checks.check_diffusion_loss(diffusion_loss)
    assert checks.check_lr_factor(lr_factor)
    assert checks.check_ema_update(ema_update)
    assert checks.check_ema_update(ema_update_in_place)
    assert capsys.readouterr().out.count("✅") == 4


def test_checks_leave_the_global_seed_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checks.check_diffusion_loss(diffusion_loss)
    checks.check_ema_update(ema_update)
    torch.testing.assert_close(torch.rand(3), expected)


def test_loss_cases_drop_some_captions_and_noise_to_varied_timesteps():
    # a case that drops nothing, one that drops everything, one in between
    dropped = []
    for case in checks._loss_cases():
        text_tokens, context = case.args[0].args[3], case.expected["context"]
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


def ema_without_warmup(shadow, weights, max_decay, updates):
    return ema_update(shadow, weights, max_decay, 10**9)


def ema_warmup_off_by_one(shadow, weights, max_decay, updates):
    # counts the updates before this one
    return ema_update(shadow, weights, max_decay, updates - 1)


def ema_swapped(shadow, weights, max_decay, updates):
    decay = min(max_decay, (1 + updates) / (10 + updates))
    return {
        name: (1 - decay) * shadow[name] + decay * value
        if value.dtype.is_floating_point
        else value.clone()
        for name, value in weights.items()
    }


def ema_averages_counters(shadow, weights, max_decay, updates):
    decay = min(max_decay, (1 + updates) / (10 + updates))
    return {
        name: (decay * shadow[name] + (1 - decay) * value).to(value.dtype)
        for name, value in weights.items()
    }


def ema_max_instead_of_min(shadow, weights, max_decay, updates):
    decay = max(max_decay, (1 + updates) / (10 + updates))
    return {
        name: decay * shadow[name] + (1 - decay) * value
        if value.dtype.is_floating_point
        else value.clone()
        for name, value in weights.items()
    }


def ema_returns_nothing(shadow, weights, max_decay, updates):
    ema_update_in_place(shadow, weights, max_decay, updates)


@pytest.mark.parametrize(
    ("check", "wrong", "says"),
    [
        ("check_diffusion_loss", loss_unscaled, "noisy latents"),
        ("check_diffusion_loss", loss_posterior_mean, "timesteps differ"),
        ("check_diffusion_loss", loss_timesteps_from_one, "timesteps differ"),
        ("check_diffusion_loss", loss_zero_context, "became zeros"),
        ("check_diffusion_loss", loss_drops_the_kept, "text tokens differ"),
        ("check_diffusion_loss", loss_predicts_z0, "target is the noise"),
        ("check_diffusion_loss", loss_per_image, "shape"),
        ("check_diffusion_loss", loss_two_unet_calls, "called the UNet 2 times"),
        ("check_lr_factor", lr_warmup_from_zero, "at step 0 "),
        (
            "check_lr_factor",
            lr_cosine_to_zero,
            "factor is 0.000000, expected 0.100000",
        ),
        ("check_lr_factor", lr_cosine_over_the_whole_run, "at step"),
        ("check_lr_factor", lr_not_capped, "after the last step"),
        ("check_lr_factor", lr_linear_decay, "at step"),
        ("check_ema_update", ema_without_warmup, "warming up"),
        ("check_ema_update", ema_warmup_off_by_one, "differs from the reference"),
        ("check_ema_update", ema_swapped, "swapped"),
        ("check_ema_update", ema_averages_counters, "integer counter"),
        ("check_ema_update", ema_max_instead_of_min, "warming up"),
        ("check_ema_update", ema_returns_nothing, "returned NoneType"),
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_typical_slips_fail_with_a_hint(capsys, check, wrong, says):
    out = assert_refused(getattr(checks, check), wrong, capsys)
    assert says in out, out


def test_unsolved_exercises_never_raise(capsys):
    assert_unsolved_never_raise(
        [checks.check_diffusion_loss, checks.check_lr_factor, checks.check_ema_update],
        capsys,
    )


def loss_that_crashes(unet, scheduler, batch, *rest):
    return batch.pixel_values


def test_a_crash_names_the_learners_line(capsys):
    assert not checks.check_diffusion_loss(loss_that_crashes)
    out = capsys.readouterr().out
    assert "raised AttributeError" in out and "return batch.pixel_values" in out
