"""Checks for chapter 08's exercises: the DDIM update, the Euler step, the
ancestral step's sigma_up and sigma_down.

Every reference is sdlearn's own function in `sdlearn.schedulers`, which the
test suite holds to diffusers' schedulers sample for sample. The cases are
chosen so that the usual slips show: DDIM with and without sigma (a forgotten
sigma^2 under the square root passes only when sigma is 0), the last step of
each sampler (alpha_bar 1, sigma_next 0), and sigmas far from 1, so that
swapping sigma and sigma_next or dropping a square cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdlearn.checks import Case, Verdict, check, randn
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.schedulers.ddim import ddim_update
from sdlearn.schedulers.euler import euler_step
from sdlearn.schedulers.euler_ancestral import ancestral_sigmas

SHAPE = (2, 4, 8, 8)  # (B, C, h, w): the tiny model's latents


def check_ddim_update(fn: Callable) -> Verdict:
    """Exercise 08.1: sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps."""
    cases = []
    runs = [(0.5, 0.0), (0.9, 0.0), (0.3, 0.2), (0.047, 0.5), (1.0, 0.0)]
    for seed, (alpha_bar_prev, sigma) in enumerate(runs):
        x_0, eps = randn(*SHAPE, seed=seed), randn(*SHAPE, seed=seed + 10)
        alpha_bar_prev, sigma = torch.tensor(alpha_bar_prev), torch.tensor(sigma)
        expected = ddim_update(x_0, eps, alpha_bar_prev, sigma)
        cases.append(Case((x_0, eps, alpha_bar_prev, sigma), expected))
    return check(
        "Exercise 08.1",
        fn,
        cases,
        hint="rescale the clean guess to the new noise level and point back "
        "along the predicted noise: alpha_bar_prev ** 0.5 * pred_original_sample "
        "+ (1 - alpha_bar_prev - sigma ** 2) ** 0.5 * pred_epsilon (eq. 12 of "
        "Song et al.; the caller adds sigma * z afterwards). With alpha_bar_prev "
        "= 1 it returns x_0.",
    )


def check_euler_step(fn: Callable) -> Verdict:
    """Exercise 08.2: x + (sigma_next - sigma) * (x - x_0) / sigma."""
    cases = []
    runs = [(14.6, 10.0), (3.0, 2.0), (0.5, 0.1), (0.03, 0.0), (7.0, 7.5)]
    for seed, (sigma, sigma_next) in enumerate(runs):
        x_0 = randn(*SHAPE, seed=seed)
        sample = x_0 + sigma * randn(*SHAPE, seed=seed + 10)
        sigma, sigma_next = torch.tensor(sigma), torch.tensor(sigma_next)
        expected = euler_step(sample, x_0, sigma, sigma_next)
        cases.append(Case((sample, x_0, sigma, sigma_next), expected))
    return check(
        "Exercise 08.2",
        fn,
        cases,
        hint="the slope is d = (sample - pred_original_sample) / sigma (the "
        "predicted noise); walk along it for (sigma_next - sigma), a negative "
        "step: sample + (sigma_next - sigma) * d. Stepping to sigma_next = 0 "
        "lands on pred_original_sample.",
        atol=1e-4,  # sigmas up to 14.6 scale float32 rounding up with them
    )


def check_ancestral_sigmas(fn: Callable) -> Verdict:
    """Exercise 08.3: sigma_up and sigma_down of an ancestral step."""
    runs = [(14.6, 10.0), (3.0, 2.0), (1.0, 0.5), (0.5, 0.0), (0.2, 0.19)]
    cases = []
    for sigma, sigma_next in runs:
        sigma, sigma_next = torch.tensor(sigma), torch.tensor(sigma_next)
        cases.append(
            Case((sigma, sigma_next), tuple(ancestral_sigmas(sigma, sigma_next)))
        )
    return check(
        "Exercise 08.3",
        fn,
        cases,
        hint="sigma_up = sqrt(sigma_next^2 * (sigma^2 - sigma_next^2) / sigma^2), "
        "then sigma_down = sqrt(sigma_next^2 - sigma_up^2); return "
        "(sigma_up, sigma_down) in that order. The last step (sigma_next = 0) "
        "adds no noise: both are 0.",
    )
