"""Checks for chapter 05's DDPM exercises: noising, the posterior, one reverse step.

Every reference comes from sdlearn's DDPMScheduler, which the test suite holds to
diffusers' number for number, through its public interface only: `add_noise`, and
`step` with settings that make it return exactly the quantity an exercise asks for.
The cases use the three beta schedules of the chapter and timesteps from the first
(0), where off-by-one mistakes show, to the last (999). They skip timesteps 1 to
49: there beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} loses most of its digits in
float32, and a formula rearranged from the scheduler's (Algorithm 2 of Ho et al.
2020, say) differs from it by up to 2e-4 though both are right.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdlearn.checks import Case, Verdict, check, randn
from sdlearn.schedulers.ddpm import DDPMScheduler

# The chapter's three schedules, with the linear one's DDPM-paper ends.
SCHEDULES: dict[str, dict] = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear"},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}

SHAPE = (2, 3, 4, 4)  # (B, C, H, W)


def scheduler(name: str, **settings) -> DDPMScheduler:
    """A 1000-timestep DDPMScheduler with schedule `name`, no clipping, eps-prediction.

    Without `set_timesteps` it walks every training timestep, so a step from t
    lands on t - 1, as in the exercises.
    """
    settings = {
        "clip_sample": False,
        "prediction_type": "epsilon",
        "variance_type": "fixed_small",
        **SCHEDULES[name],
        **settings,
    }
    return DDPMScheduler(**settings)


def posterior_mean(
    name: str, x0: torch.Tensor, x_t: torch.Tensor, t: int
) -> torch.Tensor:
    """The mean of q(x_{t-1} | x_t, x_0), from DDPMScheduler.step.

    With prediction_type="sample" the model's output is x_0 itself; with the
    "learned" variance type and a predicted variance of 0, the step adds no noise,
    so its prev_sample is the posterior mean.
    """
    sched = scheduler(name, prediction_type="sample", variance_type="learned")
    model_output = torch.cat([x0, torch.zeros_like(x0)], dim=1)  # (B, 2C, H, W)
    return sched.step(model_output, t, x_t).prev_sample


def posterior_variance(name: str, t: int) -> torch.Tensor:
    """The variance of q(x_{t-1} | x_t, x_0) ("fixed_small"), from DDPMScheduler.step.

    A step from a zero sample with a zero prediction has mean 0, so it returns
    std * noise alone; dividing by the same noise, drawn from the same seed, leaves
    the std. At t = 0 the step adds no noise: the posterior there is exact.
    """
    if t == 0:
        return torch.tensor(0.0)
    zeros = torch.zeros(1, 1, 1, 1)
    sched = scheduler(name, prediction_type="sample")
    noise = torch.randn(zeros.shape, generator=torch.Generator().manual_seed(t))
    prev = sched.step(zeros, t, zeros, torch.Generator().manual_seed(t)).prev_sample
    return (prev / noise).reshape(()) ** 2


def check_add_noise(fn: Callable) -> Verdict:
    """Exercise 05.1: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    cases = []
    timesteps = [[0, 999], [1, 500], [10, 250]]
    for seed, (name, ts) in enumerate(zip(SCHEDULES, timesteps, strict=True)):
        sched = scheduler(name)
        x0, noise = randn(*SHAPE, seed=seed), randn(*SHAPE, seed=seed + 10)
        t = torch.tensor(ts)
        expected = sched.add_noise(x0, noise, t)
        cases.append(Case((x0, noise, t, sched.alphas_cumprod), expected))
    return check(
        "Exercise 05.1",
        fn,
        cases,
        hint="pick alpha_bar_t = alphas_cumprod[t] (one per sample, at index t, not "
        "t - 1), shape it (B, 1, 1, 1) to broadcast, and take square roots: "
        "sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise.",
    )


def check_posterior(fn: Callable) -> Verdict:
    """Exercise 05.2: the mean and variance of q(x_{t-1} | x_t, x_0), eq. 6-7."""
    cases = []
    runs = [("linear", 50), ("linear", 500), ("scaled_linear", 999)]
    runs += [("squaredcos_cap_v2", 250), ("scaled_linear", 0)]
    for seed, (name, t) in enumerate(runs):
        alphas_cumprod = scheduler(name).alphas_cumprod
        x0, x_t = randn(*SHAPE, seed=seed), randn(*SHAPE, seed=seed + 10)
        expected = (posterior_mean(name, x0, x_t, t), posterior_variance(name, t))
        cases.append(Case((x0, x_t, t, alphas_cumprod), expected))
    return check(
        "Exercise 05.2",
        fn,
        cases,
        hint="alpha_bar_prev = alphas_cumprod[t - 1], or 1 when t = 0; then "
        "alpha_t = alpha_bar_t / alpha_bar_prev and beta_t = 1 - alpha_t (the "
        "step's own alpha, not alpha_bar). Mean: sqrt(alpha_bar_prev) beta_t / "
        "(1 - alpha_bar_t) x0 + sqrt(alpha_t) (1 - alpha_bar_prev) / "
        "(1 - alpha_bar_t) x_t; variance: (1 - alpha_bar_prev) / (1 - alpha_bar_t) "
        "beta_t, a 0-dim tensor.",
    )


def check_reverse_step(fn: Callable) -> Verdict:
    """Exercise 05.3: one DDPM step from t to t - 1, eps-prediction, fixed_small."""
    cases = []
    runs = [("linear", 999), ("linear", 50), ("scaled_linear", 400)]
    runs += [("squaredcos_cap_v2", 600), ("linear", 0)]
    for seed, (name, t) in enumerate(runs):
        sched = scheduler(name)
        eps, x_t = randn(*SHAPE, seed=seed), randn(*SHAPE, seed=seed + 10)
        # step draws its noise from the generator; the same seed gives the learner
        # the same noise
        noise = randn(*SHAPE, seed=seed + 20)
        generator = torch.Generator().manual_seed(seed + 20)
        expected = sched.step(eps, t, x_t, generator).prev_sample
        cases.append(Case((eps, t, x_t, sched.alphas_cumprod, noise), expected))
    return check(
        "Exercise 05.3",
        fn,
        cases,
        hint="predict x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) "
        "(eq. 15), take the posterior's mean and variance at that x0 (your "
        "`posterior`), and return mean + sqrt(variance) * noise; no clipping.",
    )
