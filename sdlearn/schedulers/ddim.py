"""DDIM sampling (Song, Meng & Ermon 2021): the same trained model, fewer steps.

DDPM's reverse process is one of many with the same marginals q(x_t | x_0). DDIM
picks a non-Markovian one: from x_t, guess x_0 and the noise eps, then jump to

    x_prev = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma^2) eps
             + sigma z,                                          eq. 12

with sigma = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)
                        * (1 - alpha_bar_t / alpha_bar_prev))    eq. 16.

eta = 0 adds no noise (a deterministic map from noise to image, which can be run
backwards: inversion); eta = 1 is DDPM's posterior variance.

The interface and the numbers are diffusers' `DDIMScheduler`: with the same
model, settings and `torch.Generator`, a sampling loop gives the same samples.
As in diffusers, the previous timestep is t - T // n whatever the spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdlearn.schedulers.common import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    Scheduler,
    SchedulerOutput,
    check_choice,
    check_model_output,
    check_timesteps,
    predict_original_and_noise,
)


@dataclass(frozen=True)
class DDIMConfig:
    """The settings of a DDIMScheduler, with diffusers' names; see its docstring."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"

    def __post_init__(self) -> None:
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)


def ddim_update(
    pred_original_sample: torch.Tensor,
    pred_epsilon: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    sigma: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """DDIM's jump to noise level alpha_bar_prev, before any fresh noise (eq. 12).

    Args:
        pred_original_sample: (B, C, H, W) the guess of the clean sample x_0.
        pred_epsilon: (B, C, H, W) the guess of the noise eps in x_t.
        alpha_bar_prev: alpha_bar of the timestep to jump to (smaller t when
            sampling, larger when inverting).
        sigma: the standard deviation of the noise the caller adds afterwards
            (0 for deterministic DDIM).

    Returns:
        (B, C, H, W) sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma^2) eps.
    """
    direction = (1 - alpha_bar_prev - sigma**2) ** 0.5 * pred_epsilon
    return alpha_bar_prev**0.5 * pred_original_sample + direction


def ddim_sigma(
    alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float
) -> torch.Tensor:
    """The standard deviation of the noise a DDIM step adds (eq. 16).

    Args:
        alpha_bar_t: alpha_bar of the timestep the step starts from.
        alpha_bar_prev: alpha_bar of the timestep it lands on (larger).
        eta: 0 for deterministic DDIM, 1 for DDPM's posterior.

    Returns:
        eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)
        * (1 - alpha_bar_t / alpha_bar_prev)).
    """
    # DDPM's posterior variance for a jump from t to prev_t (beta_tilde)
    variance = (
        (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    )
    return eta * variance**0.5


class DDIMScheduler(Scheduler):
    """The DDIM sampler with diffusers' interface and Stable Diffusion 1.x's defaults.

    Args:
        config: all the settings at once, a `DDIMConfig`; its
            defaults when None. The keyword settings below change single
            fields of it, by name.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        clip_sample, clip_sample_range, prediction_type, timestep_spacing,
        steps_offset: as for `DDPMScheduler`.
        set_alpha_to_one: what alpha_bar the last step lands on: 1 (a clean
            sample) or alpha_bar_0 of the first training timestep, as SD 1.x's
            own config says (False).
    """

    config_class = DDIMConfig

    def __init__(self, config: DDIMConfig | None = None, **settings: Any) -> None:
        config = self.make_config(config, settings)
        self._init_schedule(config)
        # where the last step lands: the clean data, or the first training timestep
        self.final_alpha_cumprod = (
            torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        )
        self.init_noise_sigma = 1.0
        self.timesteps = torch.arange(config.num_train_timesteps - 1, -1, -1)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        """One DDIM step from `timestep` to the previous one.

        Args:
            model_output: (B, C, H, W) the model's prediction at `timestep`.
            timestep: the current timestep, one of `self.timesteps`.
            sample: (B, C, H, W) the current noisy sample x_t.
            eta: 0 for deterministic DDIM, 1 for DDPM's amount of noise.
            generator: the noise's source when eta > 0.

        Returns:
            SchedulerOutput with prev_sample and pred_original_sample (B, C, H, W).
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step")
        check_model_output(model_output, sample)
        if eta < 0:
            raise ValueError(f"expected eta >= 0, got {eta}")
        t = int(timestep)
        check_timesteps(torch.tensor(t), self.config.num_train_timesteps)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps

        # 1. the noise levels at t and at prev_t
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = (
            self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        )

        # 2. the model's guess of the clean sample and of the noise
        x_0, eps = predict_original_and_noise(
            model_output, sample, alpha_bar_t, self.config.prediction_type
        )
        if self.config.clip_sample:
            bound = self.config.clip_sample_range
            x_0 = x_0.clamp(-bound, bound)

        # 3. sigma, eq. 16: eta times DDPM's posterior standard deviation
        sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)

        # 4. eq. 12: the clean guess at the new noise level, pointing back along eps
        prev_sample = ddim_update(x_0, eps, alpha_bar_prev, sigma)
        if eta > 0:
            device = model_output.device if generator is None else generator.device
            z = torch.randn(
                model_output.shape,
                generator=generator,
                device=device,
                dtype=model_output.dtype,
            ).to(model_output.device)
            prev_sample = prev_sample + sigma * z
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x_0)


class DDIMInverseScheduler(DDIMScheduler):
    """DDIM run backwards: from a clean sample to the noise that DDIM maps onto it.

    Deterministic DDIM (eta = 0) is a discretised ODE, so it can be walked the
    other way: each step guesses x_0 and eps at the current sample and jumps
    *up* to the next, noisier timestep with the same update (`ddim_update`).
    Sampling with DDIM from the result gives back (nearly) the start: the
    model is asked at slightly different points on the way up and on the way
    down, so the round trip is exact only as the steps shrink.

    The interface and the numbers are diffusers' `DDIMInverseScheduler`: the
    timesteps run upwards, and the model is evaluated at the timestep each step
    lands on. Settings as for `DDIMScheduler`; set_alpha_to_one here says where
    the first step starts (alpha_bar 1, a clean sample, or alpha_bar_0), and the
    spacing is "leading" or "trailing".
    """

    def __init__(self, config: DDIMConfig | None = None, **settings: Any) -> None:
        """Settings as for `DDIMScheduler` (the same config)."""
        config = self.make_config(config, settings)
        spacing = config.timestep_spacing
        check_choice("timestep_spacing", spacing, ("leading", "trailing"))
        super().__init__(config)
        # where the first step starts: the clean data, or the first timestep
        self.initial_alpha_cumprod = self.final_alpha_cumprod
        self.timesteps = torch.arange(self.config.num_train_timesteps)

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None
    ) -> None:
        """DDIM's timesteps for `num_inference_steps`, in rising order."""
        super().set_timesteps(num_inference_steps, device)
        self.timesteps = self.timesteps.flip(0)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
    ) -> SchedulerOutput:
        """One inverse step: from the timestep below `timestep` up to `timestep`.

        Args:
            model_output: (B, C, H, W) the model's prediction at `timestep` for
                `sample`.
            timestep: the timestep to land on, one of `self.timesteps`.
            sample: (B, C, H, W) the sample one step below `timestep`.

        Returns:
            SchedulerOutput with prev_sample, the sample at `timestep` (named
            as in every scheduler, though it is noisier), and pred_original_sample.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step")
        check_model_output(model_output, sample)
        T = self.config.num_train_timesteps
        next_t = int(timestep)
        check_timesteps(torch.tensor(next_t), T)
        t = min(next_t - T // self.num_inference_steps, T - 1)
        alpha_bar_t = self.alphas_cumprod[t] if t >= 0 else self.initial_alpha_cumprod
        x_0, eps = predict_original_and_noise(
            model_output, sample, alpha_bar_t, self.config.prediction_type
        )
        if self.config.clip_sample:
            bound = self.config.clip_sample_range
            x_0 = x_0.clamp(-bound, bound)
        next_sample = ddim_update(x_0, eps, self.alphas_cumprod[next_t], 0.0)
        return SchedulerOutput(prev_sample=next_sample, pred_original_sample=x_0)
