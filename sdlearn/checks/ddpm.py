"""Checks for chapter 05's DDPM exercises: noising in one jump, where a step
lands, and one reverse step.

Every reference is sdlearn's own code, which tests/test_ddpm.py holds to diffusers'
`DDPMScheduler` number for number: `sdlearn.schedulers.common.add_noise` for
exercise 05.4, `DDPMScheduler.previous_timestep` for 05.7 and `DDPMScheduler.step`
for 05.8. A passing answer is kept under the part of the package it stands for
("ddpm:add_noise", "ddpm:DDPMScheduler.previous_timestep",
"ddpm:DDPMScheduler.step"), so that the chapter's demo, and chapter 06's pipeline,
run it.

Each check also knows the typical mistakes: a mistake is a function that computes
what it gives, and a wrong answer equal to one is named. The step's cases avoid
timesteps 2 to 49 (but for the last step): there beta_t = 1 - alpha_bar_t /
alpha_bar_{t-1} loses most of its digits in float32, and a formula rearranged
from the scheduler's differs from it by up to 2e-4 though both are right.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from sdlearn.checks import Case, Verdict, check, randn, tensor_form_problem
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.schedulers.common import add_noise as package_add_noise
from sdlearn.schedulers.common import make_alphas_cumprod, make_betas
from sdlearn.schedulers.ddpm import DDPMScheduler, DDPMSchedulerOutput

ADD_NOISE_PART = "ddpm:add_noise"
STEP_PART = "ddpm:DDPMScheduler.step"

# The chapter's three schedules, with the linear one's DDPM-paper ends.
SCHEDULES: dict[str, dict] = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear"},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}


def alphas_cumprod(name: str) -> torch.Tensor:
    """alpha_bar_t of schedule `name`, 1000 training timesteps (a fresh copy, so
    that an answer that writes into it changes no other case)."""
    return _alphas_cumprod(name).clone()


@functools.cache
def _alphas_cumprod(name: str) -> torch.Tensor:
    settings = {"beta_start": 0.00085, "beta_end": 0.012, **SCHEDULES[name]}
    betas = make_betas(
        1000, settings["beta_start"], settings["beta_end"], settings["beta_schedule"]
    )
    return make_alphas_cumprod(betas)


# --- Exercise 05.4: add_noise --------------------------------------------------

ADD_NOISE_HINTS = (
    "Each image has its own timestep, so each needs its own alpha_bar_t: pick "
    "them out of alphas_cumprod, then give them a shape that multiplies every "
    "pixel of their own image.",
    "alphas_cumprod[timesteps] has shape (B,) (or () for one int timestep); "
    "reshape it to (B, 1, 1, 1) so that it broadcasts over (B, C, H, W). The "
    "image is scaled by the square root of alpha_bar_t, the noise by the square "
    "root of 1 - alpha_bar_t.",
    "alpha_bar_t = alphas_cumprod[timesteps].view(-1, 1, 1, 1), then return "
    "alpha_bar_t.sqrt() * original_samples + (1 - alpha_bar_t).sqrt() * noise.",
)


def _alpha_bar(alphas_cumprod: torch.Tensor, timesteps: Any) -> torch.Tensor:
    return alphas_cumprod[torch.as_tensor(timesteps)].view(-1, 1, 1, 1)


def _without_square_roots(alphas_cumprod, original_samples, noise, timesteps):
    alpha_bar_t = _alpha_bar(alphas_cumprod, timesteps)
    return alpha_bar_t * original_samples + (1 - alpha_bar_t) * noise


def _one_minus_sqrt(alphas_cumprod, original_samples, noise, timesteps):
    alpha_bar_t = _alpha_bar(alphas_cumprod, timesteps)
    return alpha_bar_t.sqrt() * original_samples + (1 - alpha_bar_t.sqrt()) * noise


def _swapped(alphas_cumprod, original_samples, noise, timesteps):
    alpha_bar_t = _alpha_bar(alphas_cumprod, timesteps)
    return (1 - alpha_bar_t).sqrt() * original_samples + alpha_bar_t.sqrt() * noise


def _one_earlier(alphas_cumprod, original_samples, noise, timesteps):
    alpha_bar_t = _alpha_bar(alphas_cumprod, torch.as_tensor(timesteps) - 1)
    return alpha_bar_t.sqrt() * original_samples + (1 - alpha_bar_t).sqrt() * noise


ADD_NOISE_MISTAKES: dict[str, Callable] = {
    "no square roots: alpha_bar_t is the share of the image's *variance* that is "
    "left, so the image is scaled by sqrt(alpha_bar_t) and the noise by "
    "sqrt(1 - alpha_bar_t)": _without_square_roots,
    "the noise is scaled by 1 - sqrt(alpha_bar_t); it is sqrt(1 - alpha_bar_t), "
    "so that the two variances add up to 1": _one_minus_sqrt,
    "the two factors are swapped: the image keeps sqrt(alpha_bar_t), the noise "
    "gets sqrt(1 - alpha_bar_t)": _swapped,
    "alpha_bar at timestep t - 1: code's timestep t reads alphas_cumprod[t] "
    "itself": _one_earlier,
}


def check_add_noise(fn: Callable) -> Verdict:
    """Exercise 05.4: `add_noise(alphas_cumprod, original_samples, noise,
    timesteps)`, a drop-in for `sdlearn.schedulers.common.add_noise`."""
    cases = []
    # (schedule, timesteps): one per image, a single int for all, a (1,) tensor
    runs: list[tuple[str, Any]] = [
        ("linear", torch.tensor([10, 500, 999])),
        ("scaled_linear", torch.tensor([0, 250, 750])),
        ("squaredcos_cap_v2", 400),
        ("scaled_linear", torch.tensor([901])),
    ]
    for seed, (name, timesteps) in enumerate(runs):
        x0, noise = randn(3, 3, 4, 4, seed=seed), randn(3, 3, 4, 4, seed=seed + 10)
        args = (alphas_cumprod(name), x0, noise, timesteps)
        cases.append(Case(args, package_add_noise(*args)))
    return check(
        "Exercise 05.4",
        fn,
        cases,
        hints=ADD_NOISE_HINTS,
        mistakes=ADD_NOISE_MISTAKES,
        keep=ADD_NOISE_PART,
    )


# --- Exercise 05.8: one DDPM step ----------------------------------------------

# Stable Diffusion 1.x's settings (DDPMScheduler's defaults), and the chapter's
# pixel model's: the linear schedule, clipping, "trailing" spacing
SD_SETTINGS: dict[str, Any] = {}
PIXEL_SETTINGS: dict[str, Any] = {
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "clip_sample": True,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}

STEP_HINTS = (
    "Follow the step's story: (1) alpha_bar at t and at the timestep the step "
    "lands on, self.previous_timestep(t) (1 before timestep 0), and the jump's "
    "alpha_t and beta_t from them; (2) the model's guess x0_hat; (3) clip it if "
    "the config says so; (4) the posterior mean of eq. 7 at x0_hat; (5) noise of "
    "the posterior's standard deviation, except on the last step.",
    "alpha_t = alpha_bar_t / alpha_bar_prev and beta_t = 1 - alpha_t (not "
    "self.betas[t]: a step may jump over many training timesteps). x0_hat = "
    "(x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t). The noise's variance "
    "is beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t: scale the "
    "noise by its square root.",
    "noise = torch.randn(model_output.shape, generator=generator, "
    "dtype=model_output.dtype) when t > 0; prev_sample = "
    "sqrt(alpha_bar_prev) * beta_t / (1 - alpha_bar_t) * x0_hat + sqrt(alpha_t) "
    "* (1 - alpha_bar_prev) / (1 - alpha_bar_t) * sample + beta_tilde.sqrt() * "
    "noise; return DDPMSchedulerOutput(prev_sample=..., "
    "pred_original_sample=x0_hat).",
)


def reference_step(
    self: DDPMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    generator: torch.Generator | None = None,
    mistake: str = "",
) -> DDPMSchedulerOutput:
    """DDPMScheduler.step for epsilon prediction and fixed_small, written out,
    or with one typical mistake in it: one of MISTAKES' keys."""
    if mistake and mistake not in MISTAKES:
        raise ValueError(f"unknown mistake {mistake!r}; expected one of {MISTAKES}")
    t = int(timestep)
    # 1. the noise levels at t and where the step lands
    prev_t = t - 1 if mistake == "t - 1" else self.previous_timestep(t)
    alpha_bar_t = self.alphas_cumprod[t]
    if prev_t >= 0 or mistake == "alphas_cumprod[-1]":
        alpha_bar_prev = self.alphas_cumprod[prev_t]
    else:
        alpha_bar_prev = torch.tensor(1.0)
    if mistake == "betas[t]":
        alpha_t = 1 - self.betas[t]
    else:
        alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    # 2. x0_hat, eq. 15
    guess = (sample - (1 - alpha_bar_t) ** 0.5 * model_output) / alpha_bar_t**0.5
    # 3. clipping
    clipped = guess
    clip = self.config.clip_sample and mistake != "no clipping"
    if clip or mistake == "clipping":
        bound = self.config.clip_sample_range
        clipped = guess.clamp(-bound, bound)
    # 4. the posterior mean, eq. 7
    x_t_factor = alpha_bar_t if mistake == "alpha_bar_t in eq. 7" else alpha_t
    x_0_coeff = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)
    x_t_coeff = x_t_factor**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    prev_sample = x_0_coeff * clipped + x_t_coeff * sample
    # 5. noise
    if t > 0:
        noise = torch.randn(
            model_output.shape, generator=generator, dtype=model_output.dtype
        )
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
        scale = {
            "variance for std": variance,
            "fixed_large": beta_t**0.5,
            "no noise": 0.0,
        }.get(mistake, variance.clamp(min=1e-20) ** 0.5)
        prev_sample = prev_sample + scale * noise
    guess = guess if mistake == "unclipped guess" else clipped
    return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=guess)


# what `reference_step(..., mistake=...)` can get wrong
MISTAKES = (
    "t - 1",
    "betas[t]",
    "alpha_bar_t in eq. 7",
    "variance for std",
    "fixed_large",
    "no clipping",
    "clipping",
    "alphas_cumprod[-1]",
    "unclipped guess",
    "no noise",
)


class StepInputs:
    """One case of the step: a scheduler's settings, its number of sampling
    steps (None: every training timestep), which of its timesteps, the shape,
    and seeds. Each call builds everything afresh, so that every function run
    on it (the learner's, the reference, the mistakes) gets the same scheduler,
    the same inputs and a generator in the same state."""

    def __init__(
        self,
        description: str,
        settings: dict[str, Any],
        steps: int | None,
        index: int,
        shape: tuple[int, ...],
        seed: int,
    ) -> None:
        self.description = description
        self.settings = settings
        self.steps = steps
        self.index = index
        self.shape = shape
        self.seed = seed

    def build(self) -> tuple[DDPMScheduler, tuple, torch.Generator]:
        scheduler = DDPMScheduler(**self.settings)
        if self.steps is not None:
            scheduler.set_timesteps(self.steps)
        timestep = scheduler.timesteps[self.index]  # a 0-dim tensor, as loops pass
        model_output = randn(*self.shape, seed=self.seed)  # the model's eps
        sample = 1.5 * randn(*self.shape, seed=self.seed + 100)  # x_t
        generator = torch.Generator().manual_seed(self.seed + 200)
        return scheduler, (model_output, timestep, sample, generator), generator

    def is_last(self) -> bool:
        scheduler, (_, timestep, _, _), _ = self.build()
        return scheduler.previous_timestep(int(timestep)) < 0

    def __repr__(self) -> str:
        return self.description


def _run(step: Callable) -> Callable:
    """`step` (a function taking the scheduler as `self`) on a case: what it
    returned, and the generator's next number, which tells how much it drew."""

    @functools.wraps(step)
    def run(inputs: StepInputs) -> Any:
        scheduler, args, generator = inputs.build()
        out = step(scheduler, *args)
        after = torch.randn(1, generator=generator)  # the generator's next draw
        prev = getattr(out, "prev_sample", out)
        guess = getattr(out, "pred_original_sample", None)
        if guess is None and not isinstance(out, torch.Tensor):
            return out
        return (prev, guess, after)

    return run


def _step_cases() -> list[Case]:
    pixel, sd = "the pixel settings", "Stable Diffusion's settings"
    all_steps = "all 1000 timesteps"
    linear = {**PIXEL_SETTINGS, "clip_sample": False}
    P = PIXEL_SETTINGS
    runs = [
        # (description, settings, steps (None: all), index into timesteps, shape)
        (f"{sd}, 50 steps, from t = 781", SD_SETTINGS, 50, 10, (2, 4, 8, 8)),
        (f"{pixel}, 100 steps, the first (t = 999)", P, 100, 0, (2, 3, 8, 8)),
        (f"{pixel}, 100 steps, the last (t = 9)", P, 100, -1, (2, 3, 8, 8)),
        (f"{sd}, 50 steps, the last (t = 1)", SD_SETTINGS, 50, -1, (2, 4, 8, 8)),
        (f"{pixel}, 10 steps, t = 499", PIXEL_SETTINGS, 10, 5, (1, 3, 8, 8)),
        (f"the linear schedule, {all_steps}, t = 600", linear, None, 399, (2, 3, 4, 4)),
        (f"{sd}, {all_steps}, the last (t = 0)", SD_SETTINGS, None, -1, (2, 4, 4, 4)),
    ]  # fmt: skip
    cases = []
    for seed, (description, settings, steps, index, shape) in enumerate(runs):
        inputs = StepInputs(description, settings, steps, index, shape, seed)
        cases.append(Case((inputs,), _run(DDPMScheduler.step)(inputs)))
    return cases


def _close(actual: Any, expected: torch.Tensor) -> bool:
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    return torch.allclose(actual.double(), expected.double(), atol=1e-4, rtol=1e-4)


def _step_problem(actual: Any, case: Case) -> str | None:
    inputs = case.args[0]
    prev, guess, after = case.expected
    if not isinstance(actual, tuple) or len(actual) != 3 or actual[1] is None:
        got = actual[0] if isinstance(actual, tuple) and len(actual) == 3 else actual
        return (
            f"returned {type(got).__name__}; return "
            "DDPMSchedulerOutput(prev_sample=..., pred_original_sample=...)"
        )
    actual_prev, actual_guess, actual_after = actual
    named = (("pred_original_sample", actual_guess), ("prev_sample", actual_prev))
    for what, value in named:
        problem = tensor_form_problem(value, prev)
        if problem:
            return f"{what} {problem}"
    if not _close(actual_guess, guess):
        return (
            "pred_original_sample (x0_hat, the guess of the clean sample) differs "
            "from the reference's: eq. 15 with alpha_bar_t, then clipped when "
            "self.config.clip_sample is true"
        )
    if not _close(actual_prev, prev):
        return _prev_problem(inputs, actual_prev, prev)
    if not inputs.is_last() and not torch.equal(actual_after, after):
        return (
            "prev_sample is right, but the generator was drawn from a different "
            "number of times: draw one noise tensor of the sample's shape per step"
        )
    return None


def _prev_problem(
    inputs: StepInputs, actual: torch.Tensor, expected: torch.Tensor
) -> str:
    """What is wrong with a prev_sample whose x0_hat was right."""
    if torch.isnan(actual).any() and not torch.isnan(expected).any():
        return (
            "prev_sample has NaN values: a variance went negative under a square "
            "root. On the last step prev_t is -1, and there alpha_bar_prev is 1 "
            "(the clean sample), not alphas_cumprod[-1], the table's last entry"
        )
    scheduler, args, _ = inputs.build()
    mean = reference_step(scheduler, *args, mistake="no noise").prev_sample
    if not inputs.is_last():
        if _close(actual, mean):
            return (
                "prev_sample is the posterior mean alone: add the noise, "
                "sqrt(beta_tilde) times a draw from `generator`, on every step "
                "but the last"
            )
        drawn, wanted = (actual - mean).std(), (expected - mean).std()
        if abs(drawn / wanted - 1) < 0.2 and not _close(actual - mean, expected - mean):
            return (
                "the noise has the right size but is not the generator's draw: "
                "draw it with torch.randn(model_output.shape, generator=generator, "
                "dtype=model_output.dtype), once, after nothing else"
            )
    error = (actual.double() - expected.double()).abs().max().item()
    return (
        f"pred_original_sample is right, but prev_sample differs from the "
        f"reference's by up to {error:.3g}: check the posterior mean (eq. 7) and "
        "the noise's scale"
    )


STEP_MISTAKES: dict[str, Callable] = {
    "the step lands on t - 1, but after set_timesteps(n) it jumps to "
    "self.previous_timestep(t), many training timesteps earlier": _run(
        functools.partial(reference_step, mistake="t - 1")
    ),
    "beta_t = self.betas[t] is one training timestep's beta; a step that jumps "
    "from t to prev_t needs alpha_t = alpha_bar_t / alpha_bar_prev and "
    "beta_t = 1 - alpha_t": _run(functools.partial(reference_step, mistake="betas[t]")),
    "sqrt(alpha_bar_t) where eq. 7 has sqrt(alpha_t) in front of x_t": _run(
        functools.partial(reference_step, mistake="alpha_bar_t in eq. 7")
    ),
    "the noise is scaled by the variance beta_tilde; scale it by the standard "
    "deviation, sqrt(beta_tilde)": _run(
        functools.partial(reference_step, mistake="variance for std")
    ),
    "the noise has fixed_large's scale sqrt(beta_t); fixed_small is the "
    "posterior's, sqrt(beta_tilde)": _run(
        functools.partial(reference_step, mistake="fixed_large")
    ),
    "x0_hat is not clipped, though self.config.clip_sample is true: clamp it to "
    "[-clip_sample_range, clip_sample_range] before the posterior mean": _run(
        functools.partial(reference_step, mistake="no clipping")
    ),
    "x0_hat is clipped, though self.config.clip_sample is false (latents have no "
    "range to clip to)": _run(functools.partial(reference_step, mistake="clipping")),
    "the step that lands before timestep 0 read alphas_cumprod[-1], the *last* "
    "entry; before timestep 0 the sample is clean, alpha_bar_prev = 1": _run(
        functools.partial(reference_step, mistake="alphas_cumprod[-1]")
    ),
    "pred_original_sample is x0_hat before clipping; return the clipped guess, "
    "the one the mean used": _run(
        functools.partial(reference_step, mistake="unclipped guess")
    ),
}


def check_ddpm_step(fn: Callable) -> Verdict:
    """Exercise 05.8: one reverse step, a drop-in for `DDPMScheduler.step` with
    epsilon prediction and the fixed_small variance, clipping or not."""
    return check(
        "Exercise 05.8",
        _run(fn),
        _step_cases(),
        hints=STEP_HINTS,
        mistakes=STEP_MISTAKES,
        compare=_step_problem,
        atol=1e-4,
        rtol=1e-4,
        keep=STEP_PART,
    )


# --- Exercise 05.7: where a step lands ------------------------------------------

PREVIOUS_PART = "ddpm:DDPMScheduler.previous_timestep"

PREVIOUS_HINTS = (
    "Before set_timesteps (self.num_inference_steps is None) the sampler walks "
    "every training timestep, so a step from t lands on t - 1. After it, a step "
    "lands on the next entry of self.timesteps, and after the last entry on -1.",
    "Find t's position in self.timesteps: (self.timesteps == timestep)"
    ".nonzero() gives it. The next position holds the answer, unless t is the "
    "last entry. Return a plain int.",
    "(index,) = (self.timesteps == timestep).nonzero(as_tuple=True); next_index "
    "= index[0].item() + 1; return -1 if next_index == len(self.timesteps) else "
    "int(self.timesteps[next_index]).",
)


def _landings(previous_timestep: Callable) -> Callable:
    """`previous_timestep` (taking the scheduler as `self`) from every timestep
    of a scheduler with `settings`, after set_timesteps(steps) (None: not
    called, and a few timesteps instead)."""

    @functools.wraps(previous_timestep)
    def run(settings: dict[str, Any], steps: int | None) -> Any:
        scheduler = DDPMScheduler(**settings)
        if steps is None:
            timesteps = [999, 500, 1, 0]
        else:
            scheduler.set_timesteps(steps)
            timesteps = scheduler.timesteps.tolist()
        landed = [previous_timestep(scheduler, t) for t in timesteps]
        return [int(t) if isinstance(t, int | torch.Tensor) else t for t in landed]

    return run


def _t_minus_one(self, timestep):
    return timestep - 1


def _minus_ratio(self, timestep):
    if self.num_inference_steps is None:
        return timestep - 1
    return timestep - self.config.num_train_timesteps // self.num_inference_steps


def _earlier_entry(self, timestep):
    if self.num_inference_steps is None:
        return timestep - 1
    (index,) = (self.timesteps == timestep).nonzero(as_tuple=True)
    i = index[0].item() - 1
    return -1 if i < 0 else int(self.timesteps[i])


def _last_lands_on_0(self, timestep):
    landed = DDPMScheduler.previous_timestep(self, timestep)
    return 0 if landed == -1 and timestep != 0 else landed


PREVIOUS_MISTAKES: dict[str, Callable] = {
    "always t - 1: after set_timesteps(n) a step jumps to the next of "
    "self.timesteps, many training timesteps earlier": _landings(_t_minus_one),
    "t - T // n: right for most of 'leading', but 'trailing' and 'linspace' do "
    "not space their timesteps T // n apart, and the last step lands on -1": (
        _landings(_minus_ratio)
    ),
    "the entry before t in self.timesteps: the timesteps go down, so the step "
    "lands on the entry *after* t": _landings(_earlier_entry),
    "the last step lands on 0; it lands on -1, 'before timestep 0', where the "
    "sample is clean": _landings(_last_lands_on_0),
}


def check_previous_timestep(fn: Callable) -> Verdict:
    """Exercise 05.7: `previous_timestep(self, timestep)`, a drop-in for
    `DDPMScheduler.previous_timestep`."""
    runs = [
        (SD_SETTINGS, 10),
        (PIXEL_SETTINGS, 7),
        ({**PIXEL_SETTINGS, "timestep_spacing": "linspace"}, 7),
        (SD_SETTINGS, None),
        (PIXEL_SETTINGS, 100),
    ]
    reference = _landings(DDPMScheduler.previous_timestep)
    cases = [Case(args, reference(*args)) for args in runs]
    return check(
        "Exercise 05.7",
        _landings(fn),
        cases,
        hints=PREVIOUS_HINTS,
        mistakes=PREVIOUS_MISTAKES,
        keep=PREVIOUS_PART,
    )
