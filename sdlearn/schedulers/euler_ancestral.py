"""Euler ancestral sampling: an Euler step down past the target, then fresh noise.

DDPM's ancestral step, in sigma coordinates (see `sigmas.py`): to go from sigma
to sigma_next, first take a deterministic Euler step down to sigma_down, lower
than sigma_next, then add new noise of standard deviation sigma_up, chosen so
that the total noise level comes back to sigma_next:

    sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
    sigma_down = sqrt(sigma_next^2 - sigma_up^2),

so sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's get_ancestral_step
with eta = 1). Each step forgets part of the path it came along and draws new
noise, so the samples do not converge to one image as the steps grow: the
sampler solves an SDE, not an ODE, and every step count gives another picture.

The interface and the numbers are diffusers' `EulerAncestralDiscreteScheduler`:
with the same model, settings and `torch.Generator`, a sampling loop gives the
same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdlearn.schedulers.common import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    SchedulerOutput,
    check_choice,
    check_model_output,
)
from sdlearn.schedulers.euler import euler_schedule, euler_step
from sdlearn.schedulers.sigmas import (
    SigmaScheduler,
    sigma_original_sample,
    sigmas_from_alphas_cumprod,
)


@dataclass(frozen=True)
class EulerAncestralDiscreteConfig:
    """The settings of an EulerAncestralDiscreteScheduler, with diffusers' names."""

    num_train_timesteps: int = 1000  # timesteps the model was trained with
    beta_start: float = 0.00085  # first beta of the linear and scaled_linear schedules
    beta_end: float = 0.012  # last beta of the linear and scaled_linear schedules
    beta_schedule: str = "scaled_linear"  # how beta grows: one of BETA_SCHEDULES
    trained_betas: tuple[float, ...] | None = (
        None  # explicit betas instead of a schedule
    )
    prediction_type: str = (
        "epsilon"  # what the model predicts: "epsilon" or "v_prediction"
    )
    timestep_spacing: str = (
        "linspace"  # how sampling picks timesteps: one of TIMESTEP_SPACINGS
    )
    steps_offset: int = 1  # added to the timesteps of the "leading" spacing

    def __post_init__(self) -> None:
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        # diffusers' ancestral sampler has no "sample" prediction either
        check_choice(
            "prediction_type", self.prediction_type, ("epsilon", "v_prediction")
        )
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)


def ancestral_sigmas(
    sigma: torch.Tensor, sigma_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far an ancestral step goes down deterministically, and how much
    noise it adds back.

    Args:
        sigma: the current noise level.
        sigma_next: the noise level the step must end at.

    Returns:
        (sigma_up, sigma_down): the new noise's standard deviation and the level
        the Euler step goes down to; sigma_down^2 + sigma_up^2 = sigma_next^2.
    """
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_up, sigma_down


def ancestral_step(
    sample: torch.Tensor,
    pred_original_sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One ancestral step: an Euler step down to sigma_down, then `noise`
    scaled by sigma_up, back up to sigma_next.

    Args:
        sample: (B, C, H, W) x at noise level sigma.
        pred_original_sample: (B, C, H, W) the model's x_0 at (x, sigma).
        sigma: the current noise level.
        sigma_next: the noise level the step must end at.
        noise: (B, C, H, W) fresh standard normal noise.

    Returns:
        (B, C, H, W) x at sigma_next.
    """
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    prev_sample = euler_step(sample, pred_original_sample, sigma, sigma_down)
    return prev_sample + sigma_up * noise


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """The Euler ancestral sampler with diffusers' interface and SD 1.x's betas.

    Args:
        config: all the settings at once, a `EulerAncestralDiscreteConfig`; its
            defaults when None. The keyword settings below change single
            fields of it, by name.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        timestep_spacing, steps_offset: as for `EulerDiscreteScheduler`.
        prediction_type: "epsilon" or "v_prediction".
    """

    config_class = EulerAncestralDiscreteConfig

    def __init__(
        self, config: EulerAncestralDiscreteConfig | None = None, **settings: Any
    ) -> None:
        config = self.make_config(config, settings)
        self._init_schedule(config)
        sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()
        self.sigmas = torch.from_numpy(
            np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32)
        )
        timesteps = np.linspace(
            0, config.num_train_timesteps - 1, config.num_train_timesteps
        )
        self.timesteps = torch.from_numpy(timesteps[::-1].copy())
        self._reset_steps()

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None
    ) -> None:
        """Choose the timesteps and their sigmas; they land in `timesteps`, `sigmas`.

        Args:
            num_inference_steps: how many steps to take.
            device: where to put `self.timesteps` (sigmas stay on the CPU).
        """
        timesteps, sigmas = euler_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            self.config.timestep_spacing,
            self.config.steps_offset,
        )
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.num_inference_steps = num_inference_steps
        self._reset_steps()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        """One ancestral step: Euler down to sigma_down, then noise up to sigma_next.

        Args:
            model_output: (B, C, H, W) the model's prediction for the scaled input.
            timestep: the current timestep, one of `self.timesteps`.
            sample: (B, C, H, W) x at the current sigma (unscaled).
            generator: the new noise's source.

        Returns:
            SchedulerOutput with prev_sample and pred_original_sample (B, C, H, W).
        """
        check_model_output(model_output, sample)
        self._start_step(timestep)
        sample = sample.float()
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]

        # 1. the model's guess of the clean sample
        pred_original_sample = sigma_original_sample(
            model_output, sample, sigma, self.config.prediction_type
        )

        # 2. Euler down to sigma_down, then fresh noise back up to sigma_next
        noise = torch.randn(
            model_output.shape,
            generator=generator,
            dtype=model_output.dtype,
            device=model_output.device if generator is None else generator.device,
        ).to(model_output.device)
        prev_sample = ancestral_step(
            sample, pred_original_sample, sigma, sigma_next, noise
        )
        self._end_step()
        return SchedulerOutput(
            prev_sample=prev_sample.to(model_output.dtype),
            pred_original_sample=pred_original_sample,
        )
