"""Checks for chapter 08's sigma-view exercises: the clean guess x_0 from a
model's output, and a whole sampler written as one loop over the noise levels.

The references are the package's `sigma_original_sample` (held to diffusers'
Euler schedulers by the tests) and `sample_sigmas` (held to the package's
schedulers sample for sample). The loop's cases run a fixed stand-in for the
model on the noise levels of the package's own schedulers, with a fresh
generator for every run, so that the learner's loop, the reference and each
typical mistake see the same inputs and draw the same noise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from sdlearn.checks import Case, Verdict, check, randn
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.checks.ddpm import alphas_cumprod
from sdlearn.schedulers.dpm_solver import (
    DPMSolverMultistepScheduler,
    alpha_sigma,
    dpm_solver_first_order,
    dpm_solver_second_order,
)
from sdlearn.schedulers.euler import EulerDiscreteScheduler, euler_step
from sdlearn.schedulers.euler_ancestral import (
    EulerAncestralDiscreteScheduler,
    ancestral_step,
)
from sdlearn.schedulers.sigma_sampling import sample_sigmas
from sdlearn.schedulers.sigmas import (
    karras_sigmas,
    sigma_original_sample,
    sigmas_from_alphas_cumprod,
)

SHAPE = (2, 4, 8, 8)  # (B, C, h, w): the tiny model's latents
T = torch.tensor

# --- Exercise 08.3: the noise levels of the sigma view -------------------------


def _sigmas_no_root(alphas_cumprod):
    return (1 - alphas_cumprod) / alphas_cumprod


def _sigmas_inverted(alphas_cumprod):
    return (alphas_cumprod / (1 - alphas_cumprod)) ** 0.5


def _sigmas_of_x_t(alphas_cumprod):
    return (1 - alphas_cumprod) ** 0.5


SIGMAS_MISTAKES: dict[str, Callable] = {
    "no square root: (1 - alpha_bar) / alpha_bar is sigma's *variance*": (
        _sigmas_no_root
    ),
    "the ratio is upside down: sigma is the noise's share over the signal's, "
    "sqrt((1 - alpha_bar) / alpha_bar), and grows with t": _sigmas_inverted,
    "sqrt(1 - alpha_bar) is the noise's scale in x_t; in x = x_t / "
    "sqrt(alpha_bar) it is divided by sqrt(alpha_bar) too": _sigmas_of_x_t,
}


def check_sigmas_from_alphas_cumprod(fn: Callable) -> Verdict:
    """Exercise 08.3: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    cases = [
        Case((alphas_cumprod(name),), sigmas_from_alphas_cumprod(alphas_cumprod(name)))
        for name in ("scaled_linear", "linear", "squaredcos_cap_v2")
    ]
    cases.append(Case((T([0.5, 0.9]),), sigmas_from_alphas_cumprod(T([0.5, 0.9]))))
    return check(
        "Exercise 08.3",
        fn,
        cases,
        hints=[
            "Divide x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps by "
            "sqrt(alpha_bar): what multiplies eps now is sigma.",
            "sigma_t = sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t), for every "
            "timestep at once (a (T,) tensor in, a (T,) tensor out).",
            "return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5",
        ],
        mistakes=SIGMAS_MISTAKES,
        rtol=1e-5,
        keep="sigmas:sigmas_from_alphas_cumprod",
    )


# --- Exercise 08.4: x_0 from the model's output, in the sigma view ------------


def _eps_sign(model_output, sample, sigma, prediction_type):
    if prediction_type == "epsilon":
        return sample + sigma * model_output
    return sigma_original_sample(model_output, sample, sigma, prediction_type)


def _eps_scaled(model_output, sample, sigma, prediction_type):
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / (sigma**2 + 1) ** 0.5
    return sigma_original_sample(model_output, sample, sigma, prediction_type)


def _v_unscaled(model_output, sample, sigma, prediction_type):
    if prediction_type == "v_prediction":
        x_t = sample / (sigma**2 + 1) ** 0.5
        return x_t - sigma * model_output  # x_t's formula used on x
    return sigma_original_sample(model_output, sample, sigma, prediction_type)


def _v_sample_unscaled(model_output, sample, sigma, prediction_type):
    if prediction_type == "v_prediction":
        alpha_bar = 1 / (sigma**2 + 1)
        return alpha_bar**0.5 * sample - (1 - alpha_bar) ** 0.5 * model_output
    return sigma_original_sample(model_output, sample, sigma, prediction_type)


ORIGINAL_SAMPLE_MISTAKES: dict[str, Callable] = {
    "x_0 = x + sigma eps: the noise was *added* to x_0, so take it away: "
    "x_0 = x - sigma eps": _eps_sign,
    "x_0 from eps is divided by sqrt(sigma^2 + 1): in the sigma view the signal "
    "is never shrunk, x = x_0 + sigma eps": _eps_scaled,
    "the v formula is applied to x in the sigma view: it holds for x_t = x / "
    "sqrt(sigma^2 + 1), with sqrt(alpha_bar) = 1 / sqrt(sigma^2 + 1) and "
    "sqrt(1 - alpha_bar) = sigma / sqrt(sigma^2 + 1)": _v_sample_unscaled,
    "v was treated like eps: x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v, "
    "with x_t = x / sqrt(sigma^2 + 1)": _v_unscaled,
}


def check_sigma_original_sample(fn: Callable) -> Verdict:
    """Exercise 08.4: x_0 from eps, x_0 or v, at x = x_0 + sigma eps."""
    cases = []
    runs = [("epsilon", 14.6), ("epsilon", 0.5), ("v_prediction", 3.0)]
    runs += [("v_prediction", 0.2), ("sample", 2.0)]
    for seed, (prediction_type, sigma) in enumerate(runs):
        x_0 = randn(*SHAPE, seed=seed)
        sample = x_0 + sigma * randn(*SHAPE, seed=seed + 10)
        args = (randn(*SHAPE, seed=seed + 20), sample, T(sigma), prediction_type)
        cases.append(Case(args, sigma_original_sample(*args)))
    return check(
        "Exercise 08.4",
        fn,
        cases,
        hints=[
            "In the sigma view x = x_0 + sigma eps: solve for x_0. For v, go "
            "through x_t = x / sqrt(sigma^2 + 1), where chapter 05's formula "
            "x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v holds.",
            "epsilon: x_0 = sample - sigma * model_output. sample: the output "
            "is x_0. v_prediction: sqrt(alpha_bar) = 1 / sqrt(sigma^2 + 1) and "
            "sqrt(1 - alpha_bar) = sigma / sqrt(sigma^2 + 1).",
            "v_prediction: return sample / (sigma**2 + 1) - model_output * "
            "sigma / (sigma**2 + 1) ** 0.5",
        ],
        mistakes=ORIGINAL_SAMPLE_MISTAKES,
        atol=1e-4,
        keep="sigmas:sigma_original_sample",
    )


# --- Exercise 08.11: a sampler as one loop over the noise levels --------------


def stand_in_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A fixed (B, C, H, W) guess of x_0 at (x, sigma), standing in for the
    model: a nonlinear function of x_t = x / sqrt(sigma^2 + 1)."""
    x_t = x / (sigma**2 + 1) ** 0.5
    eps = torch.tanh(0.7 * x_t + 0.05 * sigma) - 0.1 * x_t.roll(1, dims=-1)
    return x - sigma * eps


class LoopInputs:
    """One case of the loop: a sampler, its noise levels, a seed. Each call of
    `build` makes the starting sample and a generator afresh, so that every
    function run on it draws the same noise."""

    def __init__(self, description: str, sampler: str, sigmas: torch.Tensor, seed: int):
        self.description = description
        self.sampler = sampler
        self.sigmas = sigmas
        self.seed = seed

    def build(self) -> tuple:
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(*SHAPE, generator=generator)
        scale = self.sigmas[0] if self.sampler != "dpmpp_2m" else None
        if scale is None:  # DPM-Solver starts from x_t = noise
            scale = (self.sigmas[0] ** 2 + 1) ** 0.5
        sigmas = self.sigmas.clone()  # a loop that writes into it changes nothing
        return stand_in_denoiser, noise * scale, sigmas, self.sampler, generator

    def __repr__(self) -> str:
        return self.description


def _run(loop: Callable) -> Callable:
    @functools.wraps(loop)
    def run(inputs: LoopInputs):
        # the global random state seeded apart from `generator`, and given back
        # after: a loop that draws its noise from it (a mistake) draws the same
        # noise on every run, and the notebook's own draws are left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + inputs.seed)
            return loop(*inputs.build())

    return run


def _levels(cls: type, steps: int, **settings) -> torch.Tensor:
    scheduler = cls(**settings)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas


def _loop_cases() -> list[Case]:
    karras = torch.from_numpy(karras_sigmas(0.0292, 14.6146, 10)).float()
    runs = [
        ("Euler, 10 steps", "euler", _levels(EulerDiscreteScheduler, 10)),
        ("Euler, Karras levels", "euler", torch.cat([karras, torch.zeros(1)])),
        ("Heun, 6 steps", "heun", _levels(EulerDiscreteScheduler, 6)),
        ("Heun, Karras levels", "heun", torch.cat([karras, torch.zeros(1)])),
        ("Euler ancestral, 8 steps", "euler_ancestral", _levels(
            EulerAncestralDiscreteScheduler, 8)),
        ("DPM-Solver++ 2M, 20 steps", "dpmpp_2m", _levels(
            DPMSolverMultistepScheduler, 20)),
        ("DPM-Solver++ 2M, 6 steps to sigma_min", "dpmpp_2m", _levels(
            DPMSolverMultistepScheduler, 6, final_sigmas_type="sigma_min")),
    ]  # fmt: skip
    cases = []
    for seed, (description, sampler, sigmas) in enumerate(runs):
        inputs = LoopInputs(description, sampler, sigmas, seed)
        cases.append(Case((inputs,), _run(sample_sigmas)(inputs)))
    return cases


def reference_loop(denoise, sample, sigmas, sampler, generator, mistake=""):
    """`sample_sigmas` written out, with one typical mistake in it."""
    x, previous = sample, None
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_0 = denoise(x, sigma_next if mistake == "asked at sigma_next" else sigma)
        if sampler == "euler" or (sampler == "euler_ancestral" and mistake == "ode"):
            x = euler_step(x, x_0, sigma, sigma_next)
        elif sampler == "heun":
            x_next = euler_step(x, x_0, sigma, sigma_next)
            if sigma_next > 0 or mistake == "heun: onto zero":
                slope = (x - x_0) / sigma
                slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
                if mistake == "heun: end slope only":
                    slope = slope_next
                start = x_next if mistake == "heun: from x_next" else x
                x_next = start + (sigma_next - sigma) * (slope + slope_next) / 2
            x = x_next
        elif sampler == "euler_ancestral":
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            if mistake == "randn_like":
                noise = torch.randn_like(x)
            x = ancestral_step(x, x_0, sigma, sigma_next, noise)
        else:
            alpha = 1.0 if mistake == "no alpha" else alpha_sigma(sigma)[0]
            x_t = alpha * x
            short = n < 15 and mistake != "last at zero only"
            last = i == n - 1 and (short or sigma_next == 0)
            if mistake == "second order last":
                last = False
            if previous is None or last or mistake == "first order":
                x_t = dpm_solver_first_order(x_t, x_0, sigma, sigma_next)
            else:
                levels = (sigmas[i - 1], sigma, sigma_next)
                x_t = dpm_solver_second_order(x_t, (previous, x_0), levels, "midpoint")
            kept = mistake in ("x_t kept", "no alpha")
            x = x_t if kept else x_t / alpha_sigma(sigma_next)[0]
            if previous is None or mistake != "previous once":
                previous = x_0
    return x


def _loop_mistake(name: str) -> Callable:
    return _run(functools.partial(reference_loop, mistake=name))


LOOP_MISTAKES: dict[str, Callable] = {
    "the model is asked at sigma_next: each step asks for x_0 at the level it "
    "starts from, sigmas[i]": _loop_mistake("asked at sigma_next"),
    "the ancestral sampler steps like Euler: take your ancestral_step, with "
    "fresh noise from `generator` on every step": _loop_mistake("ode"),
    "Heun's step takes the slope at the landing point alone: average it with "
    "the slope where the step starts, (slope + slope_next) / 2": _loop_mistake(
        "heun: end slope only"
    ),
    "Heun's corrected step starts from the Euler step's landing point; it "
    "starts again from x, with the average slope": _loop_mistake("heun: from x_next"),
    "Heun's second model call on the last step, at sigma_next = 0, divides by "
    "zero (NaN): onto sigma 0 keep the Euler step, which lands on x_0": (
        _loop_mistake("heun: onto zero")
    ),
    "the ancestral noise comes from the global random state (torch.randn_like "
    "or torch.randn without `generator`): draw it with torch.randn(x.shape, "
    "generator=generator), so that a seed gives the same image": _loop_mistake(
        "randn_like"
    ),
    "DPM-Solver++ stepped x itself: its updates work on x_t = alpha x; multiply "
    "by alpha_sigma(sigma)[0] before the update and divide by "
    "alpha_sigma(sigma_next)[0] after": _loop_mistake("no alpha"),
    "the last step of a short run (n < 15) is first order too, even when it "
    "stops at sigma_min above 0 (as diffusers' lower_order_final does)": (
        _loop_mistake("last at zero only")
    ),
    "second order on the last step: onto sigma 0, h is infinite (inf); the last "
    "step is first order when it goes to sigma 0 or the run is short (n < 15)": (
        _loop_mistake("second order last")
    ),
    "DPM-Solver++ stays first order: from the second step on, use the previous "
    "step's x_0 and dpm_solver_second_order (but for a short run's last step "
    "or one to sigma 0)": _loop_mistake("first order"),
    "the DPM-Solver++ update returns x_t = alpha x; divide by alpha at "
    "sigma_next to get back to the sigma view": _loop_mistake("x_t kept"),
    "the previous x_0 is set once: after every step it must be this step's "
    "x_0": _loop_mistake("previous once"),
}


def check_sample_sigmas(fn: Callable) -> Verdict:
    """Exercise 08.11: `sample_sigmas(denoise, sample, sigmas, sampler,
    generator)`, Euler, Heun, Euler ancestral and DPM-Solver++(2M) in one loop."""
    return check(
        "Exercise 08.11",
        _run(fn),
        _loop_cases(),
        hints=[
            "One model call per step: x_0 = denoise(x, sigmas[i]); then the "
            "sampler's step from sigmas[i] to sigmas[i + 1] with your functions "
            "above. Only DPM-Solver++ needs a memory: the previous step's x_0.",
            "Euler: euler_step. Heun: an Euler step to x_next, then, unless "
            "sigma_next is 0, x + (sigma_next - sigma) * (slope + slope_next) / 2 "
            "with slope_next = (x_next - denoise(x_next, sigma_next)) / "
            "sigma_next. Euler ancestral: noise = torch.randn(x.shape, "
            "generator=generator), then ancestral_step. DPM-Solver++: x_t = "
            "alpha_sigma(sigma)[0] * x, a first-order step on the first step "
            "and on the last when n < 15 or sigma_next == 0, else second order "
            "with (previous, x_0) and (sigmas[i - 1], sigma, sigma_next); then "
            "x = x_t / alpha_sigma(sigma_next)[0] and previous = x_0.",
            "last = i == n - 1 and (n < 15 or sigma_next == 0); if previous is "
            "None or last: x_t = dpm_solver_first_order(x_t, x_0, sigma, "
            "sigma_next); else: x_t = dpm_solver_second_order(x_t, (previous, "
            "x_0), (sigmas[i - 1], sigma, sigma_next), 'midpoint')",
        ],
        mistakes=LOOP_MISTAKES,
        atol=1e-4,
        rtol=1e-4,
        keep="sigma_sampling:sample_sigmas",
    )
