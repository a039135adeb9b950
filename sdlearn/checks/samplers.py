"""Checks for chapter 08's exercises: the steps of DDIM, Euler, Euler ancestral
and DPM-Solver++, and Karras' noise levels.

Every reference is sdlearn's own function in `sdlearn.schedulers`, which the
test suite holds to diffusers' schedulers sample for sample. A passing answer is
kept under the part of the package it stands for ("ddim:ddim_update",
"dpm_solver:dpm_solver_second_order"...), and `install` puts it into the
package's samplers, so that the rest of the chapter samples with it.

The cases are chosen so that the usual slips show: DDIM with and without sigma
(a forgotten sigma^2 under the square root passes only when sigma is 0), the
last step of each sampler (alpha_bar 1, sigma_next 0), and sigmas far from 1,
so that swapping sigma and sigma_next or dropping a square cannot pass. Each
check knows the typical mistakes: a mistake is a function that makes it, and a
wrong answer equal to one is named.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sdlearn.checks import Case, Verdict, answers, check, randn
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter

# the sigma view's two exercises, so that the chapter finds all its checks here
from sdlearn.checks.sigma_sampling import (  # noqa: F401
    check_sample_sigmas,
    check_sigma_original_sample,
    check_sigmas_from_alphas_cumprod,
)
from sdlearn.schedulers import ddim, dpm_solver, euler, euler_ancestral, sigmas
from sdlearn.schedulers.ddim import ddim_sigma, ddim_update
from sdlearn.schedulers.dpm_solver import (
    alpha_sigma,
    dpm_solver_first_order,
    dpm_solver_second_order,
    log_snr,
)
from sdlearn.schedulers.euler import euler_step
from sdlearn.schedulers.euler_ancestral import ancestral_sigmas, ancestral_step
from sdlearn.schedulers.sigmas import karras_sigmas

SHAPE = (2, 4, 8, 8)  # (B, C, h, w): the tiny model's latents
T = torch.tensor

# the package modules whose samplers call the exercises' functions
SAMPLER_MODULES = (ddim, euler, euler_ancestral, dpm_solver, sigmas)


def install(name: str, fn: Callable) -> None:
    """Make the package's samplers call `fn` for their function `name`
    ("euler_step"), in this Python session only: every scheduler module that
    uses `name` gets `fn`. Prints which modules, and whose code they now run."""
    modules = []
    for module in SAMPLER_MODULES:
        if name in vars(module):
            setattr(module, name, fn)
            modules.append(module.__name__.rsplit(".", 1)[-1])
    whose = "yours" if answers.is_learners(fn) else "the package's"
    print(f"{name}: the samplers of {', '.join(modules)} now run {whose}")


# --- Exercise 08.1: the DDIM update --------------------------------------------


def _ddim_no_sigma(pred_original_sample, pred_epsilon, alpha_bar_prev, sigma):
    return ddim_update(pred_original_sample, pred_epsilon, alpha_bar_prev, 0.0)


def _ddim_no_roots(pred_original_sample, pred_epsilon, alpha_bar_prev, sigma):
    direction = (1 - alpha_bar_prev - sigma**2) * pred_epsilon
    return alpha_bar_prev * pred_original_sample + direction


def _ddim_sigma_not_squared(pred_original_sample, pred_epsilon, alpha_bar_prev, sigma):
    direction = (1 - alpha_bar_prev - sigma) ** 0.5 * pred_epsilon
    return alpha_bar_prev**0.5 * pred_original_sample + direction


DDIM_UPDATE_MISTAKES: dict[str, Callable] = {
    "sigma is left out: the direction's variance is 1 - alpha_bar_prev - sigma^2, "
    "so that the noise the caller adds afterwards makes it up to "
    "1 - alpha_bar_prev": _ddim_no_sigma,
    "no square roots: alpha_bar is a share of the *variance*, so x_0 is scaled "
    "by sqrt(alpha_bar_prev) and eps by sqrt(1 - alpha_bar_prev - sigma^2)": (
        _ddim_no_roots
    ),
    "sigma where sigma^2 belongs: sigma is a standard deviation, and variances "
    "add": _ddim_sigma_not_squared,
}


def check_ddim_update(fn: Callable) -> Verdict:
    """Exercise 08.1: sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps."""
    cases = []
    runs = [(0.5, 0.2), (0.9, 0.0), (0.3, 0.4), (0.047, 0.5), (1.0, 0.0)]
    for seed, (alpha_bar_prev, sigma) in enumerate(runs):
        x_0, eps = randn(*SHAPE, seed=seed), randn(*SHAPE, seed=seed + 10)
        args = (x_0, eps, T(alpha_bar_prev), T(sigma))
        cases.append(Case(args, ddim_update(*args)))
    return check(
        "Exercise 08.1",
        fn,
        cases,
        hints=[
            "Two terms: the clean guess put at the new noise level, plus the "
            "predicted noise scaled so that, with the sigma z the caller adds, "
            "the variances add up to 1 - alpha_bar_prev.",
            "The clean guess gets sqrt(alpha_bar_prev); the noise direction gets "
            "sqrt(1 - alpha_bar_prev - sigma^2). With alpha_bar_prev = 1 and "
            "sigma = 0 the result is x_0 itself.",
            "return alpha_bar_prev ** 0.5 * pred_original_sample + "
            "(1 - alpha_bar_prev - sigma ** 2) ** 0.5 * pred_epsilon",
        ],
        mistakes=DDIM_UPDATE_MISTAKES,
        keep="ddim:ddim_update",
    )


# --- Exercise 08.2: DDIM's sigma -----------------------------------------------


def _sigma_variance(alpha_bar_t, alpha_bar_prev, eta):
    return ddim_sigma(alpha_bar_t, alpha_bar_prev, eta) ** 2 / eta


def _sigma_no_beta(alpha_bar_t, alpha_bar_prev, eta):
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t)) ** 0.5


def _sigma_fraction_inverted(alpha_bar_t, alpha_bar_prev, eta):
    variance = (
        (1 - alpha_bar_t) / (1 - alpha_bar_prev) * (1 - alpha_bar_t / alpha_bar_prev)
    )
    return eta * variance**0.5


def _sigma_eta_inside(alpha_bar_t, alpha_bar_prev, eta):
    return eta**0.5 * ddim_sigma(alpha_bar_t, alpha_bar_prev, 1.0)


DDIM_SIGMA_MISTAKES: dict[str, Callable] = {
    "no square root: eq. 16's product is DDPM's posterior *variance*; sigma is "
    "eta times its square root": _sigma_variance,
    "the jump's beta is left out: DDPM's posterior variance is the fraction "
    "(1 - alpha_bar_prev) / (1 - alpha_bar_t) *times* 1 - alpha_bar_t / "
    "alpha_bar_prev": _sigma_no_beta,
    "the fraction is upside down: (1 - alpha_bar_prev) / (1 - alpha_bar_t), the "
    "landing level's noise over the starting one's": _sigma_fraction_inverted,
    "eta under the square root: sigma = eta * sqrt(...), so that eta = 0.5 "
    "halves the standard deviation": _sigma_eta_inside,
}


def check_ddim_sigma(fn: Callable) -> Verdict:
    """Exercise 08.2: eta * sqrt((1 - a_prev)/(1 - a_t) * (1 - a_t/a_prev))."""
    runs = [(0.3, 0.6, 1.0), (0.047, 0.2, 0.5), (0.9, 0.99, 0.3), (0.001, 0.05, 1.0)]
    runs += [(0.5, 0.9, 0.0)]
    cases = []
    for alpha_bar_t, alpha_bar_prev, eta in runs:
        args = (T(alpha_bar_t), T(alpha_bar_prev), eta)
        cases.append(Case(args, ddim_sigma(*args)))
    return check(
        "Exercise 08.2",
        fn,
        cases,
        hints=[
            "sigma is eta times the standard deviation of DDPM's posterior for "
            "the jump from t to t': eta = 1 adds as much noise as DDPM does, "
            "eta = 0 none.",
            "The jump's beta is 1 - alpha_bar_t / alpha_bar_prev; DDPM's "
            "posterior variance is (1 - alpha_bar_prev) / (1 - alpha_bar_t) "
            "times it. Take its square root, then multiply by eta.",
            "variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - "
            "alpha_bar_t / alpha_bar_prev); return eta * variance ** 0.5",
        ],
        mistakes=DDIM_SIGMA_MISTAKES,
        keep="ddim:ddim_sigma",
    )


# --- Exercise 08.5: the Euler step ---------------------------------------------


def _euler_wrong_sign(sample, pred_original_sample, sigma, sigma_next):
    return sample + (sigma - sigma_next) * (sample - pred_original_sample) / sigma


def _euler_slope_at_next(sample, pred_original_sample, sigma, sigma_next):
    return sample + (sigma_next - sigma) * (sample - pred_original_sample) / sigma_next


def _euler_to_x0(sample, pred_original_sample, sigma, sigma_next):
    return pred_original_sample


EULER_MISTAKES: dict[str, Callable] = {
    "the step goes the wrong way: dt = sigma_next - sigma is negative, and the "
    "sample moves to *less* noise": _euler_wrong_sign,
    "the slope divides by sigma_next; Euler's method takes the slope where it "
    "stands, (sample - x_0) / sigma": _euler_slope_at_next,
    "the step jumps straight to x_0: only a step to sigma_next = 0 lands there; "
    "walk along the slope for sigma_next - sigma": _euler_to_x0,
}


def check_euler_step(fn: Callable) -> Verdict:
    """Exercise 08.5: x + (sigma_next - sigma) * (x - x_0) / sigma."""
    cases = []
    runs = [(14.6, 10.0), (3.0, 2.0), (0.5, 0.1), (0.03, 0.0), (7.0, 7.5)]
    for seed, (sigma, sigma_next) in enumerate(runs):
        x_0 = randn(*SHAPE, seed=seed)
        sample = x_0 + sigma * randn(*SHAPE, seed=seed + 10)
        args = (sample, x_0, T(sigma), T(sigma_next))
        cases.append(Case(args, euler_step(*args)))
    return check(
        "Exercise 08.5",
        fn,
        cases,
        hints=[
            "Euler's method: take the slope dx/dsigma where you stand, and walk "
            "along it for the change in sigma (a negative change).",
            "The slope is d = (sample - pred_original_sample) / sigma, the "
            "predicted noise; the change is sigma_next - sigma. Stepping to "
            "sigma_next = 0 lands on pred_original_sample.",
            "d = (sample - pred_original_sample) / sigma; return sample + "
            "(sigma_next - sigma) * d",
        ],
        mistakes=EULER_MISTAKES,
        atol=1e-4,  # sigmas up to 14.6 scale float32 rounding up with them
        keep="euler:euler_step",
    )


# --- Exercise 08.6: sigma_up and sigma_down ------------------------------------


def _ancestral_swapped(sigma, sigma_next):
    up, down = ancestral_sigmas(sigma, sigma_next)
    return down, up


def _ancestral_no_square(sigma, sigma_next):
    sigma_up = (sigma_next * (sigma - sigma_next) / sigma) ** 0.5
    return sigma_up, (sigma_next - sigma_up) ** 0.5


def _ancestral_up_squared(sigma, sigma_next):
    sigma_up_squared = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
    return sigma_up_squared, (sigma_next**2 - sigma_up_squared) ** 0.5


ANCESTRAL_SIGMAS_MISTAKES: dict[str, Callable] = {
    "the pair is swapped: return (sigma_up, sigma_down), the new noise first": (
        _ancestral_swapped
    ),
    "sigmas where their squares belong: variances add, so the formulas hold "
    "sigma^2 and sigma_next^2": _ancestral_no_square,
    "sigma_up is the variance sigma_up^2: take the square root": (
        _ancestral_up_squared
    ),
}


def check_ancestral_sigmas(fn: Callable) -> Verdict:
    """Exercise 08.6: sigma_up and sigma_down of an ancestral step."""
    runs = [(14.6, 10.0), (3.0, 2.0), (1.0, 0.5), (0.5, 0.0), (0.2, 0.19)]
    cases = []
    for sigma, sigma_next in runs:
        args = (T(sigma), T(sigma_next))
        cases.append(Case(args, tuple(ancestral_sigmas(*args))))
    return check(
        "Exercise 08.6",
        fn,
        cases,
        hints=[
            "sigma_up is the noise added back, sigma_down where the Euler step "
            "lands; their variances must add up to sigma_next^2.",
            "sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and "
            "sigma_down^2 = sigma_next^2 - sigma_up^2. The last step "
            "(sigma_next = 0) adds no noise: both are 0.",
            "sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) "
            "** 0.5; sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5; return "
            "sigma_up, sigma_down",
        ],
        mistakes=ANCESTRAL_SIGMAS_MISTAKES,
        keep="euler_ancestral:ancestral_sigmas",
    )


# --- Exercise 08.7: the ancestral step -----------------------------------------


def _ancestral_no_noise(sample, pred_original_sample, sigma, sigma_next, noise):
    _, sigma_down = ancestral_sigmas(sigma, sigma_next)
    return euler_step(sample, pred_original_sample, sigma, sigma_down)


def _ancestral_full_step(sample, pred_original_sample, sigma, sigma_next, noise):
    sigma_up, _ = ancestral_sigmas(sigma, sigma_next)
    return (
        euler_step(sample, pred_original_sample, sigma, sigma_next) + sigma_up * noise
    )


def _ancestral_noise_by_down(sample, pred_original_sample, sigma, sigma_next, noise):
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    stepped = euler_step(sample, pred_original_sample, sigma, sigma_up)
    return stepped + sigma_down * noise


def _ancestral_noise_by_next(sample, pred_original_sample, sigma, sigma_next, noise):
    _, sigma_down = ancestral_sigmas(sigma, sigma_next)
    stepped = euler_step(sample, pred_original_sample, sigma, sigma_down)
    return stepped + sigma_next * noise


ANCESTRAL_STEP_MISTAKES: dict[str, Callable] = {
    "no fresh noise: after the Euler step down to sigma_down, add sigma_up * "
    "noise, or the sample ends below sigma_next": _ancestral_no_noise,
    "the Euler step goes all the way to sigma_next, and the noise on top "
    "overshoots it; step to sigma_down": _ancestral_full_step,
    "sigma_up and sigma_down are swapped: Euler down to sigma_down, noise of "
    "standard deviation sigma_up": _ancestral_noise_by_down,
    "the noise is scaled by sigma_next; only sigma_up of new noise is added, on "
    "top of the sigma_down left in the sample": _ancestral_noise_by_next,
}


def check_ancestral_step(fn: Callable) -> Verdict:
    """Exercise 08.7: Euler down to sigma_down, then sigma_up * noise."""
    cases = []
    runs = [(14.6, 10.0), (3.0, 2.0), (1.0, 0.5), (0.5, 0.0)]
    for seed, (sigma, sigma_next) in enumerate(runs):
        x_0 = randn(*SHAPE, seed=seed)
        sample = x_0 + sigma * randn(*SHAPE, seed=seed + 10)
        noise = randn(*SHAPE, seed=seed + 20)
        args = (sample, x_0, T(sigma), T(sigma_next), noise)
        cases.append(Case(args, ancestral_step(*args)))
    return check(
        "Exercise 08.7",
        fn,
        cases,
        hints=[
            "Two moves: a deterministic Euler step to a level below the target, "
            "then new noise that brings the sample back up to sigma_next. Your "
            "two functions above do the work.",
            "sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next); the "
            "Euler step goes from sigma to sigma_down; the noise is scaled by "
            "sigma_up.",
            "sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next); return "
            "euler_step(sample, pred_original_sample, sigma, sigma_down) + "
            "sigma_up * noise",
        ],
        mistakes=ANCESTRAL_STEP_MISTAKES,
        atol=1e-4,
        keep="euler_ancestral:ancestral_step",
    )


# --- Exercise 08.8: Karras sigmas ----------------------------------------------


def _karras_linear(sigma_min, sigma_max, num_inference_steps, rho=7.0):
    return np.linspace(sigma_max, sigma_min, num_inference_steps)


def _karras_rho_inverted(sigma_min, sigma_max, num_inference_steps, rho=7.0):
    return karras_sigmas(sigma_min, sigma_max, num_inference_steps, 1 / rho)


def _karras_reversed(sigma_min, sigma_max, num_inference_steps, rho=7.0):
    return karras_sigmas(sigma_min, sigma_max, num_inference_steps, rho)[::-1].copy()


def _karras_ramp_by_n(sigma_min, sigma_max, num_inference_steps, rho=7.0):
    ramp = np.arange(num_inference_steps) / num_inference_steps
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (high + ramp * (low - high)) ** rho


KARRAS_MISTAKES: dict[str, Callable] = {
    "the sigmas are spaced evenly in sigma itself; Karras' are evenly spaced in "
    "sigma^(1/rho), then raised to the power rho": _karras_linear,
    "rho is in the wrong place: interpolate sigma ** (1 / rho), then raise the "
    "result to the power rho (not the other way round)": _karras_rho_inverted,
    "the levels run upwards: sampling starts at sigma_max and ends at "
    "sigma_min": _karras_reversed,
    "the ramp stops short of 1: the last level must be sigma_min itself, so "
    "the ramp is np.linspace(0, 1, num_inference_steps)": _karras_ramp_by_n,
}


def check_karras_sigmas(fn: Callable) -> Verdict:
    """Exercise 08.8: Karras et al.'s eq. 5, from sigma_max down to sigma_min."""
    runs = [(0.0292, 14.6146, 10, 7.0), (0.1, 80.0, 7, 7.0), (0.0292, 14.6, 25, 3.0)]
    runs += [(0.5, 2.0, 2, 7.0)]
    cases = [Case(run, karras_sigmas(*run)) for run in runs]
    return check(
        "Exercise 08.8",
        fn,
        cases,
        hints=[
            "Space the levels evenly not in sigma but in sigma^(1/rho), from "
            "sigma_max down to sigma_min, then undo the power.",
            "A ramp from 0 to 1 with num_inference_steps points "
            "(np.linspace); interpolate between sigma_max ** (1 / rho) and "
            "sigma_min ** (1 / rho) along it; raise to the power rho.",
            "ramp = np.linspace(0, 1, num_inference_steps); hi, lo = sigma_max "
            "** (1 / rho), sigma_min ** (1 / rho); return (hi + ramp * (lo - hi)) "
            "** rho",
        ],
        mistakes=KARRAS_MISTAKES,
        rtol=1e-6,
        keep="sigmas:karras_sigmas",
    )


# --- Exercise 08.9: DPM-Solver++'s first-order step ----------------------------


def _first_order_sigma_space(sample, pred_original_sample, sigma_s, sigma_t):
    # x_t's sigma_t / sigma_s taken in sigma space, not as sqrt(1 - alpha_bar)
    alpha_t, _ = alpha_sigma(sigma_t)
    h = log_snr(sigma_t) - log_snr(sigma_s)
    return (sigma_t / sigma_s) * sample - alpha_t * (torch.exp(-h) - 1) * (
        pred_original_sample
    )


def _first_order_h_inverted(sample, pred_original_sample, sigma_s, sigma_t):
    alpha_t, sigma_t_ = alpha_sigma(sigma_t)
    _, sigma_s_ = alpha_sigma(sigma_s)
    h = log_snr(sigma_s) - log_snr(sigma_t)
    return (sigma_t_ / sigma_s_) * sample - alpha_t * (torch.exp(-h) - 1) * (
        pred_original_sample
    )


def _first_order_alpha_s(sample, pred_original_sample, sigma_s, sigma_t):
    alpha_s, sigma_s_ = alpha_sigma(sigma_s)
    _, sigma_t_ = alpha_sigma(sigma_t)
    h = log_snr(sigma_t) - log_snr(sigma_s)
    return (sigma_t_ / sigma_s_) * sample - alpha_s * (torch.exp(-h) - 1) * (
        pred_original_sample
    )


FIRST_ORDER_MISTAKES: dict[str, Callable] = {
    "sigma_t / sigma_s taken from the arguments: those are sigma-space levels; "
    "the update needs the x_t-space sigma_t = sigma * alpha_t (alpha_sigma)": (
        _first_order_sigma_space
    ),
    "h is the wrong way round: h = lambda_t - lambda_s, positive, since the "
    "signal-to-noise ratio grows as noise is removed": _first_order_h_inverted,
    "alpha_s where alpha_t belongs: the clean guess is put at the *landing* "
    "level's signal scale": _first_order_alpha_s,
}

DPM_HINT_IDEA = (
    "Work in x_t coordinates: each sigma-space level gives alpha = 1 / sqrt("
    "sigma^2 + 1) and sigma_x = sigma * alpha (the package's alpha_sigma), and "
    "lambda = log(alpha) - log(sigma_x) (log_snr). h = lambda_t - lambda_s."
)


def check_dpm_solver_first_order(fn: Callable) -> Verdict:
    """Exercise 08.9: (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x_0."""
    cases = []
    runs = [(14.6, 8.0), (3.0, 1.5), (0.5, 0.2), (0.8, 0.0)]
    for seed, (sigma_s, sigma_t) in enumerate(runs):
        x_0 = randn(*SHAPE, seed=seed)
        sample = (x_0 + sigma_s * randn(*SHAPE, seed=seed + 10)) / (
            sigma_s**2 + 1
        ) ** 0.5  # x_t, what DPM-Solver steps
        args = (sample, x_0, T(sigma_s), T(sigma_t))
        cases.append(Case(args, dpm_solver_first_order(*args)))
    return check(
        "Exercise 08.9",
        fn,
        cases,
        hints=[
            DPM_HINT_IDEA,
            "x_t = (sigma_t / sigma_s) * sample - alpha_t * (exp(-h) - 1) * x_0, "
            "with sigma_t, sigma_s, alpha_t the x_t-space ones. At sigma_t = 0, "
            "lambda_t is +inf and exp(-h) is 0: the step lands on x_0.",
            "alpha_t, s_t = alpha_sigma(sigma_t); _, s_s = alpha_sigma(sigma_s); "
            "h = log_snr(sigma_t) - log_snr(sigma_s); return (s_t / s_s) * "
            "sample - alpha_t * (torch.exp(-h) - 1) * pred_original_sample",
        ],
        mistakes=FIRST_ORDER_MISTAKES,
        atol=1e-5,
        rtol=1e-4,
        keep="dpm_solver:dpm_solver_first_order",
    )


# --- Exercise 08.10: DPM-Solver++(2M) -------------------------------------------


def _second_order(mistake, sample, pred_original_samples, sigmas, solver_type):
    """The 2M update written out, with one typical mistake in it."""
    (m1, m0), (s1, s0, t) = pred_original_samples, sigmas
    if mistake == "swapped":
        m1, m0 = m0, m1
    alpha_t, sigma_t_ = alpha_sigma(t)
    _, sigma_s0_ = alpha_sigma(s0)
    h, h_0 = log_snr(t) - log_snr(s0), log_snr(s0) - log_snr(s1)
    r0 = h / h_0 if mistake == "r inverted" else h_0 / h
    D1 = (m1 - m0 if mistake == "D1 sign" else m0 - m1) / r0
    x_t = (sigma_t_ / sigma_s0_) * sample - alpha_t * (torch.exp(-h) - 1) * m0
    if mistake == "first order":
        return x_t
    if solver_type == "midpoint":
        factor = 1.0 if mistake == "no half" else 0.5
        return x_t - factor * alpha_t * (torch.exp(-h) - 1) * D1
    return x_t + alpha_t * ((torch.exp(-h) - 1) / h + 1) * D1


def _mistake(name: str) -> Callable:
    def wrong(sample, pred_original_samples, sigmas, solver_type="midpoint"):
        return _second_order(name, sample, pred_original_samples, sigmas, solver_type)

    return wrong


SECOND_ORDER_MISTAKES: dict[str, Callable] = {
    "r is inverted: r = h_prev / h, the previous step's length in lambda over "
    "this one's": _mistake("r inverted"),
    "D1 has the wrong sign: it estimates how x_0 changes, (m0 - m1) / r, the "
    "newer guess minus the older": _mistake("D1 sign"),
    "this is the first-order update: add the second-order term built from D1, "
    "the change between the last two x_0 guesses": _mistake("first order"),
    "(m1, m0) swapped: pred_original_samples is (previous x_0, this step's "
    "x_0), so m0, the newest guess, comes second": _mistake("swapped"),
    "the midpoint term lacks its factor 1/2: x_t - 0.5 * alpha_t * (exp(-h) - 1) "
    "* D1": _mistake("no half"),
}


def check_dpm_solver_second_order(fn: Callable) -> Verdict:
    """Exercise 08.10: DPM-Solver++(2M)'s update, midpoint and Heun forms."""
    cases = []
    runs = [
        ((14.6, 8.0, 4.0), "midpoint"),
        ((3.0, 1.5, 0.6), "midpoint"),
        ((1.0, 0.5, 0.3), "heun"),
        ((8.0, 4.0, 1.0), "heun"),
    ]
    for seed, (levels, solver_type) in enumerate(runs):
        m1, m0 = randn(*SHAPE, seed=seed), randn(*SHAPE, seed=seed + 10)
        sample = (m0 + levels[1] * randn(*SHAPE, seed=seed + 20)) / (
            levels[1] ** 2 + 1
        ) ** 0.5
        args = (sample, (m1, m0), tuple(T(s) for s in levels), solver_type)
        cases.append(Case(args, dpm_solver_second_order(*args)))
    return check(
        "Exercise 08.10",
        fn,
        cases,
        hints=[
            "The first-order update with x_0 replaced by a better estimate of x_0 "
            "over the step: the newest guess m0 corrected by how the guesses "
            "changed since the previous step, m0 - m1, rescaled to this step's "
            "length in lambda. " + DPM_HINT_IDEA,
            "h = lambda_t - lambda_s0, h_0 = lambda_s0 - lambda_s1, r0 = h_0 / h, "
            "D1 = (m0 - m1) / r0. First the first-order x_t with m0; then "
            "midpoint subtracts 0.5 * alpha_t * (exp(-h) - 1) * D1, and heun "
            "adds alpha_t * ((exp(-h) - 1) / h + 1) * D1.",
            "x_t = (s_t / s_s0) * sample - alpha_t * (torch.exp(-h) - 1) * m0; "
            "if solver_type == 'midpoint': return x_t - 0.5 * alpha_t * "
            "(torch.exp(-h) - 1) * D1; else: return x_t + alpha_t * "
            "((torch.exp(-h) - 1) / h + 1) * D1",
        ],
        mistakes=SECOND_ORDER_MISTAKES,
        atol=1e-5,
        rtol=1e-4,
        keep="dpm_solver:dpm_solver_second_order",
    )
