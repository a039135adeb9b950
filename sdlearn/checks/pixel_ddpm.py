"""Checks for chapter 05's DDPM algorithms on pixels: the training loss and the
sampling loop; and a DDPMScheduler that runs the learner's scheduler parts.

The references are `sdlearn.pixel_ddpm.ddpm_loss` and `ddpm_sample`. A passing
answer is kept as "pixel_ddpm:ddpm_loss" or "pixel_ddpm:ddpm_sample", and the
chapter trains and samples its small model with it.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sdlearn.checks import (
    Case,
    Verdict,
    answers,
    check,
    compare_values,
    randn,
    schedule,
)
from sdlearn.checks import ddpm as ddpm_checks
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.pixel_ddpm import ddpm_loss, ddpm_sample
from sdlearn.schedulers import common
from sdlearn.schedulers.ddpm import DDPMScheduler

LOSS_PART = "pixel_ddpm:ddpm_loss"
SAMPLE_PART = "pixel_ddpm:ddpm_sample"


def stand_in_model(x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """A fixed 'denoiser' for the checks: its answer depends on each image's
    own timestep, so a loop or a loss that mixes timesteps up shows. Like the
    chapter's denoiser, it wants one timestep per image."""
    if timesteps.shape != (len(x_t),):
        raise ValueError(
            f"the model wants one timestep per image, shape (B,) = ({len(x_t)},), "
            f"got shape {tuple(timesteps.shape)}"
        )
    t = timesteps.float().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return 0.4 * torch.tanh(x_t) + 3e-4 * t - 0.1


# --- Exercise 05.5: the training loss ---------------------------------------------


@dataclass
class LossInputs:
    """One case of the loss, built afresh for every function run on it, so that
    each gets a generator in the same state."""

    prediction_type: str
    schedule: str
    shape: tuple[int, ...]
    seed: int

    def build(self) -> tuple:
        x0 = randn(*self.shape, seed=self.seed).clamp(-1, 1)
        alphas_cumprod = ddpm_checks.alphas_cumprod(self.schedule)
        generator = torch.Generator().manual_seed(self.seed + 100)
        return (stand_in_model, x0, alphas_cumprod, self.prediction_type, generator)

    def __repr__(self) -> str:
        return f"{self.prediction_type}, {self.schedule}, x0 {self.shape}"


def _run_loss(loss_fn: Callable) -> Callable:
    """`loss_fn` on a case: its loss, and the generator's next draw (which
    tells how much it drew)."""

    @functools.wraps(loss_fn)
    def run(inputs: LossInputs) -> Any:
        args = inputs.build()
        loss = loss_fn(*args)
        return (loss, torch.randn(1, generator=args[-1]))

    return run


def _loss_slip(model, x0, alphas_cumprod, prediction_type, generator, slip):
    B, T = x0.shape[0], len(alphas_cumprod)
    if slip == "noise first":
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, T, (B,), generator=generator)
    else:
        size = (1,) if slip == "one timestep" else (B,)
        t = torch.randint(0, T, size, generator=generator).expand(B)
        noise = torch.randn(x0.shape, generator=generator)
    x_t = common.add_noise(alphas_cumprod, x0, noise, t)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        target = a.sqrt() * x0 - (1 - a).sqrt() * noise if slip == "v" else v
    else:
        target = noise if prediction_type == "epsilon" else x0
    reduction = "sum" if slip == "sum" else "mean"
    return F.mse_loss(model(x_t, t), target, reduction=reduction)


def _loss_mistake(slip: str) -> Callable:
    def wrong(*args):
        return _loss_slip(*args, slip=slip)

    return _run_loss(wrong)


LOSS_MISTAKES: dict[str, Callable] = {
    "one timestep for the whole batch: draw one per image, torch.randint(0, T, "
    "(B,), generator=generator), so that every batch trains many timesteps": (
        _loss_mistake("one timestep")
    ),
    "v's two terms are swapped: v = sqrt(alpha_bar_t) eps - sqrt(1 - "
    "alpha_bar_t) x_0": _loss_mistake("v"),
    "the squared errors are summed; the loss is their mean (F.mse_loss), so "
    "that its size does not depend on the batch or the image": _loss_mistake("sum"),
    "the noise is drawn before the timesteps: the loss is right, but a seed "
    "gives other numbers than the package's; draw the timesteps first": (
        _loss_mistake("noise first")
    ),
}

LOSS_HINTS = (
    "Algorithm 1 of Ho et al.: for each image a timestep, uniform over the "
    "training timesteps, and standard normal noise; noise the batch with "
    "add_noise; ask the model; the mean squared error against the target that "
    "prediction_type names.",
    "Draw t = torch.randint(0, len(alphas_cumprod), (B,), generator=generator) "
    "first, then noise = torch.randn(x0.shape, generator=generator). The "
    "targets: the noise, x0, or v = sqrt(alpha_bar_t) noise - sqrt(1 - "
    "alpha_bar_t) x0 with alpha_bar_t shaped (B, 1, 1, 1).",
    "x_t = add_noise(alphas_cumprod, x0, noise, t); alpha_bar_t = "
    "alphas_cumprod[t].view(-1, 1, 1, 1); ...; return F.mse_loss(model(x_t, t), "
    "target).",
)


def check_ddpm_loss(fn: Callable) -> Verdict:
    """Exercise 05.5: `ddpm_loss(model, x0, alphas_cumprod, prediction_type,
    generator)`, a drop-in for `sdlearn.pixel_ddpm.ddpm_loss`."""
    runs = [
        LossInputs("epsilon", "linear", (4, 3, 8, 8), 0),
        LossInputs("sample", "linear", (3, 3, 8, 8), 1),
        LossInputs("v_prediction", "scaled_linear", (5, 3, 4, 4), 2),
        LossInputs("epsilon", "squaredcos_cap_v2", (1, 3, 8, 8), 3),
    ]
    cases = [Case((inputs,), _run_loss(ddpm_loss)(inputs)) for inputs in runs]
    return check(
        "Exercise 05.5",
        _run_loss(fn),
        cases,
        hints=LOSS_HINTS,
        mistakes=LOSS_MISTAKES,
        atol=1e-5,
        rtol=1e-5,
        keep=LOSS_PART,
    )


# --- Exercise 05.9: the sampling loop ---------------------------------------------


@dataclass
class SampleInputs:
    """One case of the loop: a fresh package scheduler, noise and generator."""

    settings: dict
    steps: int
    shape: tuple[int, ...]
    seed: int
    # DDPM starts from sigma 1; a sampler in the sigma view (chapter 08) does not
    init_noise_sigma: float = 1.0

    def build(self) -> tuple:
        scheduler = DDPMScheduler(**self.settings)
        scheduler.init_noise_sigma = self.init_noise_sigma
        noise = randn(*self.shape, seed=self.seed)
        generator = torch.Generator().manual_seed(self.seed + 100)
        return (stand_in_model, scheduler, noise, self.steps, generator)

    def __repr__(self) -> str:
        sigma = self.init_noise_sigma
        scale = f" times {sigma:g}" if sigma != 1 else ""
        return f"{self.steps} steps, noise {self.shape}{scale}"


def _run_sample(sample_fn: Callable) -> Callable:
    """`sample_fn` on a case: the samples, and the (index, timestep) of every
    call of the callback."""

    @functools.wraps(sample_fn)
    def run(inputs: SampleInputs) -> Any:
        calls = []

        def callback(i, t, out):
            calls.append((int(i), int(t), tuple(out.prev_sample.shape)))

        samples = sample_fn(*inputs.build(), callback=callback)
        return (samples, calls)

    return run


def _sample_slip(model, scheduler, noise, steps, generator, callback, slip):
    if slip != "no set_timesteps":
        scheduler.set_timesteps(steps)
    x = noise if slip == "unscaled" else noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(model(x, t.expand(len(x))), t, x, generator=generator)
        callback(i, t, out)
        x = out.pred_original_sample if slip == "guess" else out.prev_sample
    return x


def _sample_mistake(slip: str) -> Callable:
    def wrong(model, scheduler, noise, steps, generator=None, callback=None):
        return _sample_slip(model, scheduler, noise, steps, generator, callback, slip)

    return _run_sample(wrong)


SAMPLE_MISTAKES: dict[str, Callable] = {
    "the loop walks all 1000 training timesteps: call "
    "scheduler.set_timesteps(num_inference_steps) first, then loop over "
    "scheduler.timesteps": _sample_mistake("no set_timesteps"),
    "the next input is pred_original_sample, the guess of x_0; it is "
    "prev_sample, x_t one step less noisy": _sample_mistake("guess"),
    "the loop starts from the noise as it is: multiply it by "
    "scheduler.init_noise_sigma, the noise level of the first timestep (1 for "
    "DDPM, more for other samplers)": _sample_mistake("unscaled"),
}

SAMPLE_HINTS = (
    "Algorithm 2 of Ho et al.: choose the timesteps, start from the noise, and "
    "at each timestep ask the model, take one scheduler step, and go on from "
    "the step's prev_sample. Call the callback after each step.",
    "scheduler.set_timesteps(num_inference_steps); x = noise * "
    "scheduler.init_noise_sigma; for i, t in enumerate(scheduler.timesteps): "
    "the model wants one timestep per image, t.expand(len(x)).",
    "model_output = model(x, t.expand(len(x))); out = scheduler.step("
    "model_output, t, x, generator=generator); if callback is not None: "
    "callback(i, t, out); x = out.prev_sample; after the loop, return x.",
)


def _sample_problem(actual: Any, case: Case) -> str | None:
    samples, calls = case.expected
    if not isinstance(actual, tuple) or len(actual) != 2:
        return "returned nothing useful: return the last step's prev_sample"
    problem = None
    common_problem = compare_values(actual[0], samples, 1e-4, 1e-4)
    if common_problem:
        problem = f"the samples: {common_problem}"
    elif [c[:2] for c in actual[1]] != [c[:2] for c in calls]:
        problem = (
            f"the samples are right, but the callback was called with (index, "
            f"timestep) {[c[:2] for c in actual[1]][:4]}..., expected "
            f"{[c[:2] for c in calls][:4]}...: callback(i, t, out) after every step"
        )
    return problem


def check_ddpm_sample(fn: Callable) -> Verdict:
    """Exercise 05.9: `ddpm_sample(model, scheduler, noise, num_inference_steps,
    generator=None, callback=None)`, a drop-in for
    `sdlearn.pixel_ddpm.ddpm_sample`."""
    runs = [
        SampleInputs(ddpm_checks.PIXEL_SETTINGS, 10, (2, 3, 8, 8), 0),
        SampleInputs(ddpm_checks.SD_SETTINGS, 7, (3, 4, 4, 4), 1),
        SampleInputs(ddpm_checks.SD_SETTINGS, 4, (1, 4, 4, 4), 2, 3.0),
    ]
    cases = [Case((inputs,), _run_sample(ddpm_sample)(inputs)) for inputs in runs]
    return check(
        "Exercise 05.9",
        _run_sample(fn),
        cases,
        hints=SAMPLE_HINTS,
        mistakes=SAMPLE_MISTAKES,
        compare=_sample_problem,
        atol=1e-4,
        rtol=1e-4,
        keep=SAMPLE_PART,
    )


# --- a DDPMScheduler that runs the learner's parts --------------------------------


def install_scheduler_parts(
    scheduler: DDPMScheduler, parts: dict[str, Callable]
) -> DDPMScheduler:
    """Make `scheduler` (this one only) run the given parts, by part name:
    "schedule:make_betas" and "schedule:make_alphas_cumprod" recompute its
    tables, "schedule:spaced_timesteps" picks its timesteps in `set_timesteps`,
    "ddpm:DDPMScheduler.previous_timestep" and "ddpm:DDPMScheduler.step" become
    its methods. A part left out stays the package's.

    Returns:
        `scheduler`, changed in place.
    """
    config = scheduler.config
    if "schedule:make_betas" in parts:
        scheduler.betas = parts["schedule:make_betas"](
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas,
        )
    make_alphas_cumprod = parts.get("schedule:make_alphas_cumprod")
    if make_alphas_cumprod is not None or "schedule:make_betas" in parts:
        make_alphas_cumprod = make_alphas_cumprod or common.make_alphas_cumprod
        scheduler.alphas_cumprod = make_alphas_cumprod(scheduler.betas)
    spaced_timesteps = parts.get("schedule:spaced_timesteps")
    if spaced_timesteps is not None:

        def set_timesteps(self, num_inference_steps, device=None):
            c = self.config
            self.timesteps = spaced_timesteps(
                num_inference_steps,
                c.num_train_timesteps,
                c.timestep_spacing,
                c.steps_offset,
            ).to(device)
            self.num_inference_steps = num_inference_steps

        scheduler.set_timesteps = types.MethodType(set_timesteps, scheduler)
    for part in (ddpm_checks.PREVIOUS_PART, ddpm_checks.STEP_PART):
        if part in parts:
            name = part.rsplit(".", 1)[1]
            setattr(scheduler, name, types.MethodType(parts[part], scheduler))
    return scheduler


def use_scheduler_parts(scheduler: DDPMScheduler) -> DDPMScheduler:
    """`scheduler` running every scheduler part of chapter 05 that the learner
    kept and that still passes its check (the package's stands in for the
    others, each with a one-line notice), as `install_scheduler_parts` does."""
    fallbacks = {
        schedule.COSINE_PART: (common.cosine_betas, schedule.check_cosine_betas),
        schedule.BETAS_PART: (common.make_betas, schedule.check_make_betas),
        schedule.ALPHAS_CUMPROD_PART: (
            common.make_alphas_cumprod,
            schedule.check_make_alphas_cumprod,
        ),
        schedule.SPACING_PART: (
            common.spaced_timesteps,
            schedule.check_spaced_timesteps,
        ),
        ddpm_checks.PREVIOUS_PART: (
            DDPMScheduler.previous_timestep,
            ddpm_checks.check_previous_timestep,
        ),
        ddpm_checks.STEP_PART: (DDPMScheduler.step, ddpm_checks.check_ddpm_step),
    }
    parts = {}
    for part, (fallback, check_fn) in fallbacks.items():
        code = answers.use(part, fallback, check_fn)
        if answers.is_learners(code):
            parts[part] = code
    return install_scheduler_parts(scheduler, parts)
