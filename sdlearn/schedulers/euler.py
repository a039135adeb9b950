"""Euler sampling (Karras et al. 2022): the probability-flow ODE, one straight step
at a time.

In sigma coordinates (see `sigmas.py`) the sample follows

    dx / dsigma = (x - x_0(x, sigma)) / sigma,

and Euler's method takes that slope at the current sigma and walks along it to
the next one: x_next = x + (sigma_next - sigma) * (x - x_0) / sigma (Algorithm
1 of Karras et al. 2022 without its second-order correction). No noise is added
(unless `s_churn` asks for it), so the same starting noise always gives the same
image, and more steps converge to the ODE's exact solution.

The interface and the numbers are diffusers' `EulerDiscreteScheduler`: with the
same model, settings and `torch.Generator`, a sampling loop gives the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdlearn.schedulers.common import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SchedulerOutput,
    check_choice,
    check_model_output,
    spaced_timesteps,
)
from sdlearn.schedulers.sigmas import (
    FINAL_SIGMAS_TYPES,
    SigmaScheduler,
    final_sigma,
    karras_sigmas,
    sigma_original_sample,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)


@dataclass(frozen=True)
class EulerDiscreteConfig:
    """The settings of an EulerDiscreteScheduler, with diffusers' names."""

    num_train_timesteps: int = 1000  # timesteps the model was trained with
    beta_start: float = 0.00085  # first beta of the linear and scaled_linear schedules
    beta_end: float = 0.012  # last beta of the linear and scaled_linear schedules
    beta_schedule: str = "scaled_linear"  # how beta grows: one of BETA_SCHEDULES
    trained_betas: tuple[float, ...] | None = (
        None  # explicit betas instead of a schedule
    )
    prediction_type: str = "epsilon"  # what the model predicts: one of PREDICTION_TYPES
    use_karras_sigmas: bool = (
        False  # Karras et al.'s noise levels instead of the spacing's
    )
    sigma_min: float | None = None  # the Karras levels' smallest sigma (None: sigma_0)
    sigma_max: float | None = None  # the Karras levels' largest sigma (None: sigma_T-1)
    timestep_spacing: str = (
        "linspace"  # how sampling picks timesteps: one of TIMESTEP_SPACINGS
    )
    steps_offset: int = 1  # added to the timesteps of the "leading" spacing
    final_sigmas_type: str = "zero"  # where the last step lands: "zero" or "sigma_min"

    def __post_init__(self) -> None:
        # diffusers' configs may hold any truthy value
        object.__setattr__(self, "use_karras_sigmas", bool(self.use_karras_sigmas))
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)


def inference_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    timestep_spacing: str,
    steps_offset: int,
) -> np.ndarray:
    """The Euler samplers' timesteps: float32, and not rounded for "linspace".

    The sigma-space samplers interpolate sigma between training timesteps, so
    they need no integer timesteps (the UNet's sinusoidal embedding takes
    fractions); the other spacings give the integers of `spaced_timesteps`.

    Returns:
        (num_inference_steps,) float32 timesteps, from the noisiest down.
    """
    if timestep_spacing == "linspace":
        timesteps = np.linspace(
            0, num_train_timesteps - 1, num_inference_steps, dtype=np.float32
        )
        return timesteps[::-1].copy()
    timesteps = spaced_timesteps(
        num_inference_steps, num_train_timesteps, timestep_spacing, steps_offset
    )
    return timesteps.numpy().astype(np.float32)


def euler_schedule(
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int,
    timestep_spacing: str,
    steps_offset: int,
    use_karras_sigmas: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: str = "zero",
) -> tuple[np.ndarray, np.ndarray]:
    """The Euler samplers' timesteps and noise levels, as diffusers computes them.

    Args:
        alphas_cumprod: (num_train_timesteps,) alpha_bar_t.
        num_inference_steps: how many steps to take.
        timestep_spacing, steps_offset: as for `inference_timesteps`.
        use_karras_sigmas: replace the spacing's sigmas by `karras_sigmas`
            between sigma_min and sigma_max (None: the spacing's ends), and the
            timesteps by theirs.
        final_sigmas_type: "zero" or "sigma_min", the level after the last step.

    Returns:
        (timesteps, sigmas): (N,) float32 timesteps and (N + 1,) float32 sigmas,
        the last one where the final step lands.
    """
    timesteps = inference_timesteps(
        num_inference_steps, len(alphas_cumprod), timestep_spacing, steps_offset
    )
    train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).numpy()
    # sigma at fractional timesteps: linear between the training ones
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if use_karras_sigmas:
        sigma_min = sigmas[-1].item() if sigma_min is None else sigma_min
        sigma_max = sigmas[0].item() if sigma_max is None else sigma_max
        sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
    last = final_sigma(alphas_cumprod, final_sigmas_type)
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return timesteps.astype(np.float32), sigmas


def euler_step(
    sample: torch.Tensor,
    pred_original_sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from `sigma` to `sigma_next`.

    Args:
        sample: (B, C, H, W) x at noise level sigma.
        pred_original_sample: (B, C, H, W) the model's x_0 at (x, sigma).
        sigma: the current noise level.
        sigma_next: the noise level to step to (smaller).

    Returns:
        (B, C, H, W) x at sigma_next.
    """
    # the slope dx/dsigma = (x - x_0) / sigma, which is the predicted noise
    derivative = (sample - pred_original_sample) / sigma
    return sample + (sigma_next - sigma) * derivative


class EulerDiscreteScheduler(SigmaScheduler):
    """The Euler sampler with diffusers' interface and Stable Diffusion 1.x's betas.

    Args:
        config: all the settings at once, a `EulerDiscreteConfig`; its
            defaults when None. The keyword settings below change single
            fields of it, by name.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        prediction_type, timestep_spacing, steps_offset: as for `DDPMScheduler`;
            diffusers' default spacing for Euler is "linspace".
        use_karras_sigmas: step through Karras et al.'s noise levels (`karras_sigmas`)
            instead of the spacing's.
        sigma_min, sigma_max: the ends of the Karras levels; None takes the
            training schedule's.
        final_sigmas_type: "zero" ends on a clean sample, "sigma_min" on sigma_0.
    """

    config_class = EulerDiscreteConfig
    unsupported = {
        **SigmaScheduler.unsupported,
        "interpolation_type": "linear",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
    }

    def __init__(
        self, config: EulerDiscreteConfig | None = None, **settings: Any
    ) -> None:
        config = self.make_config(config, settings)
        self._init_schedule(config)
        # until set_timesteps: every training timestep, noisiest first
        sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod).flip(0)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        timesteps = np.linspace(
            0, config.num_train_timesteps - 1, config.num_train_timesteps
        )
        self.timesteps = torch.from_numpy(timesteps[::-1].copy()).float()
        self._reset_steps()

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None
    ) -> None:
        """Choose the timesteps and their sigmas; they land in `timesteps`, `sigmas`.

        Args:
            num_inference_steps: how many steps to take.
            device: where to put `self.timesteps` (sigmas stay on the CPU).
        """
        config = self.config
        timesteps, sigmas = euler_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            config.timestep_spacing,
            config.steps_offset,
            config.use_karras_sigmas,
            config.sigma_min,
            config.sigma_max,
            config.final_sigmas_type,
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
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        """One Euler step from the current sigma to the next.

        Args:
            model_output: (B, C, H, W) the model's prediction for the scaled input.
            timestep: the current timestep, one of `self.timesteps`.
            sample: (B, C, H, W) x at the current sigma (unscaled).
            s_churn, s_tmin, s_tmax, s_noise: Karras et al.'s stochastic churn
                (Algorithm 2): with s_churn > 0, noise raises sigma to
                sigma * (1 + gamma) before the step, for sigma in [s_tmin, s_tmax].
            generator: the churn noise's source.

        Returns:
            SchedulerOutput with prev_sample and pred_original_sample (B, C, H, W).
        """
        check_model_output(model_output, sample)
        self._start_step(timestep)
        sample = sample.float()
        sigma = self.sigmas[self._step_index]

        # 1. churn: add noise to climb to sigma_hat (off by default)
        gamma = 0.0
        if s_tmin <= sigma <= s_tmax:
            gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = torch.randn(
                model_output.shape,
                generator=generator,
                dtype=model_output.dtype,
                device=model_output.device if generator is None else generator.device,
            ).to(model_output.device)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5

        # 2. the model's guess of the clean sample; diffusers reads eps at the
        # churned level and v at sigma (the same when s_churn = 0)
        level = sigma_hat if self.config.prediction_type == "epsilon" else sigma
        pred_original_sample = sigma_original_sample(
            model_output, sample, level, self.config.prediction_type
        )

        # 3. the Euler step to the next sigma
        sigma_next = self.sigmas[self._step_index + 1]
        prev_sample = euler_step(sample, pred_original_sample, sigma_hat, sigma_next)
        self._end_step()
        return SchedulerOutput(
            prev_sample=prev_sample.to(model_output.dtype),
            pred_original_sample=pred_original_sample,
        )
