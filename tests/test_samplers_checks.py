"""Chapter 08's exercise checks: right answers pass, typical slips fail, none raise."""

from __future__ import annotations

import math

import pytest
import torch

from sdlearn.checks import samplers as checks
from tests.helpers import assert_refused, assert_unsolved_never_raise

# --- right answers, written as a learner would ---


def ddim(pred_original_sample, pred_epsilon, alpha_bar_prev, sigma):
    direction = torch.sqrt(1 - alpha_bar_prev - sigma**2) * pred_epsilon
    return torch.sqrt(alpha_bar_prev) * pred_original_sample + direction


def euler(sample, pred_original_sample, sigma, sigma_next):
    d = (sample - pred_original_sample) / sigma
    dt = sigma_next - sigma
    return sample + d * dt


def euler_mix(sample, pred_original_sample, sigma, sigma_next):
    # the same step as a mix of the sample and the clean guess
    ratio = sigma_next / sigma
    return ratio * sample + (1 - ratio) * pred_original_sample


def ancestral(sigma, sigma_next):
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return sigma_up, (sigma_next**2 - sigma_up**2) ** 0.5


def ancestral_sqrt(sigma, sigma_next):
    # sigma_up^2 simplifies; sigma_down = sigma_next^2 / sigma
    sigma_up = sigma_next * torch.sqrt(1 - sigma_next**2 / sigma**2)
    return sigma_up, sigma_next**2 / sigma


def test_right_answers_pass(capsys):
    assert checks.check_ddim_update(ddim)
    for fn in (euler, euler_mix):
        assert checks.check_euler_step(fn)
    for fn in (ancestral, ancestral_sqrt):
        assert checks.check_ancestral_sigmas(fn)
    assert capsys.readouterr().out.count("✅") == 5


# --- typical slips ---


def ddim_no_sigma(pred_original_sample, pred_epsilon, alpha_bar_prev, sigma):
    return (
        alpha_bar_prev**0.5 * pred_original_sample
        + (1 - alpha_bar_prev) ** 0.5 * pred_epsilon
    )


def ddim_without_roots(pred_original_sample, pred_epsilon, alpha_bar_prev, sigma):
    return alpha_bar_prev * pred_original_sample + (1 - alpha_bar_prev) * pred_epsilon


def ddim_sigma_not_squared(pred_original_sample, pred_epsilon, alpha_bar_prev, sigma):
    direction = (1 - alpha_bar_prev - sigma) ** 0.5 * pred_epsilon
    return alpha_bar_prev**0.5 * pred_original_sample + direction


def euler_wrong_sign(sample, pred_original_sample, sigma, sigma_next):
    return sample + (sigma - sigma_next) * (sample - pred_original_sample) / sigma


def euler_slope_at_next(sample, pred_original_sample, sigma, sigma_next):
    return sample + (sigma_next - sigma) * (sample - pred_original_sample) / sigma_next


def euler_to_x0(sample, pred_original_sample, sigma, sigma_next):
    return pred_original_sample


def ancestral_swapped(sigma, sigma_next):
    up, down = ancestral(sigma, sigma_next)
    return down, up


def ancestral_no_square(sigma, sigma_next):
    sigma_up = (sigma_next * (sigma - sigma_next) / sigma) ** 0.5
    return sigma_up, (sigma_next - sigma_up) ** 0.5


def ancestral_floats(sigma, sigma_next):
    s, n = float(sigma), float(sigma_next)
    up = math.sqrt(n**2 * (s**2 - n**2) / s**2)
    return up, math.sqrt(n**2 - up**2)


@pytest.mark.parametrize(
    ("check", "wrong"),
    [
        ("check_ddim_update", ddim_no_sigma),
        ("check_ddim_update", ddim_without_roots),
        ("check_ddim_update", ddim_sigma_not_squared),
        ("check_euler_step", euler_wrong_sign),
        ("check_euler_step", euler_slope_at_next),
        ("check_euler_step", euler_to_x0),
        ("check_ancestral_sigmas", ancestral_swapped),
        ("check_ancestral_sigmas", ancestral_no_square),
        ("check_ancestral_sigmas", ancestral_floats),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_typical_slips_fail_with_a_hint(capsys, check, wrong):
    assert_refused(getattr(checks, check), wrong, capsys)


def test_unsolved_exercises_never_raise(capsys):
    assert_unsolved_never_raise(
        [
            checks.check_ddim_update,
            checks.check_euler_step,
            checks.check_ancestral_sigmas,
        ],
        capsys,
    )
