"""Chapter 05's exercise checks: right answers pass, typical slips fail, none raise."""

from __future__ import annotations

import pytest
import torch

from sdlearn.checks import ddpm as checks
from tests.helpers import assert_refused, assert_unsolved_never_raise

# --- right answers, written as a learner would ---


def add_noise(x0, noise, t, alphas_cumprod):
    alpha_bar_t = alphas_cumprod[t].view(-1, 1, 1, 1)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise


def alpha_bars(t, alphas_cumprod):
    alpha_bar_prev = alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0)
    return alphas_cumprod[t], alpha_bar_prev


def posterior(x0, x_t, t, alphas_cumprod):
    alpha_bar_t, alpha_bar_prev = alpha_bars(t, alphas_cumprod)
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    mean = (
        alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t) * x0
        + alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t
    )
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    return mean, variance


def reverse_step(eps, t, x_t, alphas_cumprod, noise):
    alpha_bar_t = alphas_cumprod[t]
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    mean, variance = posterior(x0, x_t, t, alphas_cumprod)
    return mean + variance.sqrt() * noise


def reverse_step_eq11(eps, t, x_t, alphas_cumprod, noise):
    # Algorithm 2 of Ho et al. 2020: the same step without x0 in between
    alpha_bar_t, alpha_bar_prev = alpha_bars(t, alphas_cumprod)
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    mean = (x_t - beta_t / (1 - alpha_bar_t).sqrt() * eps) / alpha_t.sqrt()
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    return mean + variance.sqrt() * noise


def test_right_answers_pass(capsys):
    assert checks.check_add_noise(add_noise)
    assert checks.check_posterior(posterior)
    assert checks.check_reverse_step(reverse_step)
    assert checks.check_reverse_step(reverse_step_eq11)
    assert capsys.readouterr().out.count("✅") == 4


def test_references_are_the_papers_formulas():
    # the check's references, read off DDPMScheduler.step, against eq. 7 in float64
    for name in checks.SCHEDULES:
        alphas_cumprod = checks.scheduler(name).alphas_cumprod
        # not t = 1...49, where float32 rounding alone reaches 2e-4 (see the module)
        for t in (0, 50, 500, 999):
            x0, x_t = torch.randn(2, *checks.SHAPE, dtype=torch.float64)
            mean, variance = posterior(x0, x_t, t, alphas_cumprod.double())
            torch.testing.assert_close(
                checks.posterior_mean(name, x0.float(), x_t.float(), t),
                mean.float(),
                atol=1e-5,
                rtol=1e-5,
            )
            torch.testing.assert_close(
                checks.posterior_variance(name, t), variance.float()
            )


# --- typical slips ---


def add_noise_without_sqrt(x0, noise, t, alphas_cumprod):
    alpha_bar_t = alphas_cumprod[t].view(-1, 1, 1, 1)
    return alpha_bar_t * x0 + (1 - alpha_bar_t) * noise


def add_noise_off_by_one(x0, noise, t, alphas_cumprod):
    return add_noise(x0, noise, t - 1, alphas_cumprod)


def add_noise_with_alpha(x0, noise, t, alphas_cumprod):
    # alpha_t = 1 - beta_t, the one step's keep rate, instead of alpha_bar_t
    previous = torch.cat([torch.ones(1), alphas_cumprod[:-1]])
    alpha_t = (alphas_cumprod / previous)[t].view(-1, 1, 1, 1)
    return alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * noise


def posterior_with_alpha_bar(x0, x_t, t, alphas_cumprod):
    # sqrt(alpha_bar_t) where eq. 7 has sqrt(alpha_t)
    alpha_bar_t, alpha_bar_prev = alpha_bars(t, alphas_cumprod)
    beta_t = 1 - alpha_bar_t / alpha_bar_prev
    mean = (
        alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t) * x0
        + alpha_bar_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t
    )
    return mean, (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t


def posterior_off_by_one(x0, x_t, t, alphas_cumprod):
    # reads alpha_bar_{t-1} at index t and alpha_bar_t at index t + 1
    padded = torch.cat([alphas_cumprod, alphas_cumprod[-1:]])
    return posterior(x0, x_t, t + 1, padded)


def posterior_wrapping_at_zero(x0, x_t, t, alphas_cumprod):
    # alphas_cumprod[t - 1] at t = 0 is the last entry, not 1
    alpha_bar_t, alpha_bar_prev = alphas_cumprod[t], alphas_cumprod[t - 1]
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    mean = (
        alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t) * x0
        + alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t
    )
    return mean, (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t


def reverse_step_fixed_large(eps, t, x_t, alphas_cumprod, noise):
    alpha_bar_t, alpha_bar_prev = alpha_bars(t, alphas_cumprod)
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    mean, _ = posterior(x0, x_t, t, alphas_cumprod)
    return mean + (1 - alpha_bar_t / alpha_bar_prev).sqrt() * noise


def reverse_step_clipped(eps, t, x_t, alphas_cumprod, noise):
    alpha_bar_t = alphas_cumprod[t]
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    mean, variance = posterior(x0.clamp(-1, 1), x_t, t, alphas_cumprod)
    return mean + variance.sqrt() * noise


def reverse_step_without_noise(eps, t, x_t, alphas_cumprod, noise):
    return reverse_step(eps, t, x_t, alphas_cumprod, torch.zeros_like(noise))


@pytest.mark.parametrize(
    ("check", "wrong"),
    [
        ("check_add_noise", add_noise_without_sqrt),
        ("check_add_noise", add_noise_off_by_one),
        ("check_add_noise", add_noise_with_alpha),
        ("check_posterior", posterior_with_alpha_bar),
        ("check_posterior", posterior_off_by_one),
        ("check_posterior", posterior_wrapping_at_zero),
        ("check_reverse_step", reverse_step_fixed_large),
        ("check_reverse_step", reverse_step_clipped),
        ("check_reverse_step", reverse_step_without_noise),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_typical_slips_fail_with_a_hint(capsys, check, wrong):
    assert_refused(getattr(checks, check), wrong, capsys)


def test_posterior_wants_a_tuple():
    assert not checks.check_posterior(lambda x0, x_t, t, ac: x0)


def test_unsolved_exercises_never_raise(capsys):
    assert_unsolved_never_raise(
        [checks.check_add_noise, checks.check_posterior, checks.check_reverse_step],
        capsys,
    )
