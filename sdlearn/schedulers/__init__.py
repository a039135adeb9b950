"""Noise schedulers: one file per sampling algorithm, all with diffusers' interface.

    common           what they share: betas, alpha_bar, timestep spacing, add_noise
    ddpm             DDPM (Ho et al. 2020): ancestral sampling from the posterior
    ddim             DDIM (Song et al. 2021): deterministic (eta = 0) or noisier
                     steps, and its inversion from an image to noise
    sigmas           the sigma view (x = x_0 + sigma eps) of the samplers below
    euler            Euler steps along the probability-flow ODE (Karras et al. 2022)
    euler_ancestral  Euler steps with fresh noise each step (an SDE sampler)
    dpm_solver       DPM-Solver++ (Lu et al. 2022), first or second order (2M)

Each has `set_timesteps`, `.timesteps`, `step(...)` returning `prev_sample` and
`pred_original_sample`, and `add_noise`, so one sampling loop drives them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from sdlearn.schedulers.common import Scheduler, SchedulerOutput, scheduler_to_config
from sdlearn.schedulers.ddim import DDIMConfig, DDIMInverseScheduler, DDIMScheduler
from sdlearn.schedulers.ddpm import DDPMConfig, DDPMScheduler, DDPMSchedulerOutput
from sdlearn.schedulers.dpm_solver import (
    DPMSolverMultistepConfig,
    DPMSolverMultistepScheduler,
)
from sdlearn.schedulers.euler import EulerDiscreteConfig, EulerDiscreteScheduler
from sdlearn.schedulers.euler_ancestral import (
    EulerAncestralDiscreteConfig,
    EulerAncestralDiscreteScheduler,
)

__all__ = [
    "DDIMConfig",
    "DDIMInverseScheduler",
    "DDIMScheduler",
    "DDPMConfig",
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "DPMSolverMultistepConfig",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteConfig",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteConfig",
    "EulerDiscreteScheduler",
    "SCHEDULERS",
    "Scheduler",
    "SchedulerOutput",
    "scheduler_from_config",
    "scheduler_to_config",
    "with_sampler",
]


# diffusers' class name -> sdlearn's scheduler of the same algorithm
SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.__name__: cls
    for cls in (
        DDPMScheduler,
        DDIMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
    )
}


def scheduler_from_config(config: Mapping[str, Any]) -> Scheduler:
    """A scheduler from a diffusers scheduler_config.json (or `scheduler.config`).

    The class is the config's `_class_name` where sdlearn has that algorithm.
    The noise schedule (betas, timestep spacing, prediction type) belongs to the
    model: it was trained with it. The sampler is a choice made at generation
    time, so a config of a sampler sdlearn does not have (SD 1.5's folder names
    PNDMScheduler) gives a DDPMScheduler with the same schedule.

    Args:
        config: diffusers' settings; keys that the scheduler does not know are
            ignored, missing ones take its (SD 1.x's) defaults.
    """
    cls = SCHEDULERS.get(config.get("_class_name"), DDPMScheduler)
    known = {f.name for f in fields(cls.config_class)}
    settings = {k: v for k, v in config.items() if k in known}
    if settings.get("trained_betas") is not None:
        settings["trained_betas"] = tuple(settings["trained_betas"])
    return cls(**settings)


# what the model was trained with; everything else is the sampler's own choice
NOISE_SCHEDULE = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "steps_offset",
)


def with_sampler(scheduler: Scheduler, class_name: str, **settings: Any) -> Scheduler:
    """Another sampler on `scheduler`'s noise schedule.

    The betas, the prediction type and the steps offset belong to the model;
    the sampler keeps its own defaults for the rest (DDPM and DDIM space their
    steps "leading", Euler and DPM-Solver++ "linspace", as diffusers does for
    Stable Diffusion 1.x's configs), unless `settings` say otherwise.

    Args:
        scheduler: the pipeline's scheduler, whose schedule to keep.
        class_name: diffusers' name of the sampler, a key of `SCHEDULERS`.
        settings: any of the sampler's own settings, e.g. use_karras_sigmas.

    Returns:
        The new scheduler.
    """
    if class_name not in SCHEDULERS:
        raise ValueError(
            f"unknown scheduler {class_name!r}; expected one of {tuple(SCHEDULERS)}"
        )
    config = scheduler_to_config(scheduler)
    if class_name == config["_class_name"]:
        return scheduler_from_config({**config, **settings})
    schedule = {k: config[k] for k in NOISE_SCHEDULE if k in config}
    return scheduler_from_config({"_class_name": class_name, **schedule, **settings})
