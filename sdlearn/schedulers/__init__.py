"""Noise schedulers: one file per sampling algorithm, all with diffusers' interface.

    common   what they share: betas, alpha_bar, timestep spacing, add_noise
    ddpm     DDPM (Ho et al. 2020): ancestral sampling from the posterior

Each has `set_timesteps`, `.timesteps`, `step(...)` returning `prev_sample` and
`pred_original_sample`, and `add_noise`, so one sampling loop drives them all.
"""

from sdlearn.schedulers.common import SchedulerOutput
from sdlearn.schedulers.ddpm import DDPMConfig, DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDPMConfig", "DDPMScheduler", "DDPMSchedulerOutput", "SchedulerOutput"]
