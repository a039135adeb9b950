"""Noise schedulers: one file per sampling algorithm, all with diffusers' interface.

    common   what they share: betas, alpha_bar, timestep spacing, add_noise
    ddpm     DDPM (Ho et al. 2020): ancestral sampling from the posterior
    ddim     DDIM (Song et al. 2021): deterministic (eta = 0) or noisier steps

Each has `set_timesteps`, `.timesteps`, `step(...)` returning `prev_sample` and
`pred_original_sample`, and `add_noise`, so one sampling loop drives them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from sdlearn.schedulers.common import SchedulerOutput
from sdlearn.schedulers.ddim import DDIMConfig, DDIMScheduler
from sdlearn.schedulers.ddpm import DDPMConfig, DDPMScheduler, DDPMSchedulerOutput

__all__ = [
    "DDIMConfig",
    "DDIMScheduler",
    "DDPMConfig",
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "SchedulerOutput",
    "scheduler_from_config",
    "scheduler_to_config",
]


# diffusers' class name -> sdlearn's scheduler of the same algorithm
SCHEDULERS = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}


def scheduler_from_config(
    config: Mapping[str, Any],
) -> DDPMScheduler | DDIMScheduler:
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
    config_class = DDIMConfig if cls is DDIMScheduler else DDPMConfig
    known = {f.name for f in fields(config_class)}
    settings = {k: v for k, v in config.items() if k in known}
    if settings.get("trained_betas") is not None:
        settings["trained_betas"] = tuple(settings["trained_betas"])
    return cls(**settings)


def scheduler_to_config(scheduler: DDPMScheduler | DDIMScheduler) -> dict[str, Any]:
    """The scheduler_config.json that diffusers reads back as the same scheduler."""
    settings = asdict(scheduler.config)
    if settings["trained_betas"] is not None:
        settings["trained_betas"] = list(settings["trained_betas"])
    return {"_class_name": type(scheduler).__name__, **settings}
