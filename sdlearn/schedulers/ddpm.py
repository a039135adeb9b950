"""DDPM sampling (Ho et al. 2020): walk back from noise one posterior draw at a time.

Training noised images with q(x_t | x_0). To sample, start from pure noise and at
each timestep ask the model for its guess of the clean image x_0, then draw x_{t-1}
from the posterior q(x_{t-1} | x_t, x_0) that this guess makes: a Gaussian whose
mean mixes x_0 and x_t (eq. 7) and whose variance is known in closed form. With
fewer steps than training timesteps, each step jumps over several timesteps and
acts like one DDPM step of a coarser schedule.

The interface and the numbers are diffusers' `DDPMScheduler`: with the same model
and the same `torch.Generator`, a sampling loop gives the same samples.
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

VARIANCE_TYPES: tuple[str, ...] = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "learned",
    "learned_range",
)

# diffusers' name for what DDPMScheduler.step returns
DDPMSchedulerOutput = SchedulerOutput


@dataclass(frozen=True)
class DDPMConfig:
    """The settings of a DDPMScheduler, with diffusers' names; see its docstring."""

    num_train_timesteps: int = 1000  # timesteps the model was trained with
    beta_start: float = 0.00085  # first beta of the linear and scaled_linear schedules
    beta_end: float = 0.012  # last beta of the linear and scaled_linear schedules
    beta_schedule: str = "scaled_linear"  # how beta grows: one of BETA_SCHEDULES
    trained_betas: tuple[float, ...] | None = (
        None  # explicit betas instead of a schedule
    )
    variance_type: str = (
        "fixed_small"  # the variance of each reverse step: one of VARIANCE_TYPES
    )
    clip_sample: bool = False  # clamp the predicted clean sample to +-clip_sample_range
    clip_sample_range: float = 1.0  # the bound for clip_sample
    prediction_type: str = "epsilon"  # what the model predicts: one of PREDICTION_TYPES
    timestep_spacing: str = (
        "leading"  # how sampling picks timesteps: one of TIMESTEP_SPACINGS
    )
    steps_offset: int = 1  # added to the timesteps of the "leading" spacing

    def __post_init__(self) -> None:
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)


class DDPMScheduler(Scheduler):
    """The DDPM sampler with diffusers' interface and Stable Diffusion 1.x's defaults.

    diffusers' own defaults are the DDPM paper's (beta_schedule="linear",
    beta_start=1e-4, beta_end=0.02, clip_sample=True, steps_offset=0); ours are the
    values Stable Diffusion 1.x was trained with.

    Args:
        config: all the settings at once, a `DDPMConfig`; its
            defaults when None. The keyword settings below change single
            fields of it, by name.
        num_train_timesteps: the number of timesteps the model was trained with.
        beta_start: the first beta of the linear and scaled_linear schedules.
        beta_end: the last beta of the linear and scaled_linear schedules.
        beta_schedule: "linear" (the DDPM paper), "scaled_linear" (Stable
            Diffusion) or "squaredcos_cap_v2" (the cosine schedule of improved DDPM).
        trained_betas: explicit betas, one per training timestep; overrides the
            schedule.
        variance_type: the variance of each reverse step: "fixed_small" (the true
            posterior's), "fixed_large" (beta_t), "fixed_small_log" (fixed_small
            computed through its log), or predicted by the model: "learned" (the
            variance itself) or "learned_range" (a mix of the two fixed ones).
        clip_sample: clamp the predicted clean sample to [-clip_sample_range,
            clip_sample_range]; right for pixels in [-1, 1], wrong for latents.
        clip_sample_range: the bound for clip_sample.
        prediction_type: what the model predicts: "epsilon" (the noise), "sample"
            (the clean sample) or "v_prediction" (the velocity).
        timestep_spacing: how `set_timesteps` picks timesteps: "leading",
            "trailing" or "linspace".
        steps_offset: added to the timesteps of the "leading" spacing.
    """

    config_class = DDPMConfig

    def __init__(self, config: DDPMConfig | None = None, **settings: Any) -> None:
        config = self.make_config(config, settings)
        self._init_schedule(config)
        # Sampling starts from N(0, I); Euler-style schedulers need a larger sigma.
        self.init_noise_sigma = 1.0
        # Until set_timesteps is called, sampling walks every training timestep.
        self.timesteps = torch.arange(config.num_train_timesteps - 1, -1, -1)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep that a step from `timestep` lands on; -1 after the last.

        Args:
            timestep: the current timestep.

        Returns:
            The next of `self.timesteps`, or -1 when `timestep` is the last one.
        """
        if self.num_inference_steps is None:
            return timestep - 1
        (index,) = (self.timesteps == timestep).nonzero(as_tuple=True)
        if len(index) == 0:
            raise ValueError(
                f"timestep {timestep} is not one of the {self.num_inference_steps} "
                f"timesteps set_timesteps chose; step through scheduler.timesteps"
            )
        next_index = index[0].item() + 1
        if next_index == len(self.timesteps):
            return -1
        return int(self.timesteps[next_index])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> DDPMSchedulerOutput:
        """One reverse step: draw the sample at the previous timestep.

        Args:
            model_output: (B, C, H, W) the model's prediction at `timestep` (noise,
                clean sample or velocity, as `prediction_type` says); (B, 2C, H, W)
                with the predicted variance after it for the learned variance types.
            timestep: the current timestep, one of `self.timesteps`.
            sample: (B, C, H, W) the current noisy sample.
            generator: where the step's noise comes from; None uses torch's global
                generator.

        Returns:
            DDPMSchedulerOutput with prev_sample (B, C, H, W), the sample at the
            previous timestep, and pred_original_sample (B, C, H, W).
        """
        t = int(timestep)
        check_timesteps(torch.tensor(t), self.config.num_train_timesteps)
        prev_t = self.previous_timestep(t)
        model_output, predicted_variance = self._split_variance(model_output, sample)

        # 1. the noise levels at t and at prev_t, the timestep this step lands on;
        # before timestep 0 the sample is clean, so alpha_bar is 1 there
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = (
            self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        )
        # A jump over several training timesteps is one DDPM step with this
        # alpha_t and beta_t (Section 4, Nichol & Dhariwal 2021).
        alpha_t = alpha_bar_t / alpha_bar_prev
        beta_t = 1 - alpha_t

        # 2. the model's guess of the clean sample
        pred_original_sample, _ = predict_original_and_noise(
            model_output, sample, alpha_bar_t, self.config.prediction_type
        )

        # 3. clip the guess into the data's range
        if self.config.clip_sample:
            bound = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-bound, bound)

        # 4. the mean of the posterior q(x_{t-1} | x_t, x_0) at the guessed x_0,
        # eq. 7, Ho et al. 2020
        x_0_coeff = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)
        x_t_coeff = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        prev_sample = x_0_coeff * pred_original_sample + x_t_coeff * sample

        # 5. add noise of the step's standard deviation. diffusers draws it whenever
        # t > 0 (even when it lands on -1 from t = 1), with this shape, dtype and
        # device; drawing at the same steps keeps a seeded loop in step with it.
        if t > 0:
            rand_device = model_output.device if generator is None else generator.device
            noise = torch.randn(
                model_output.shape,
                generator=generator,
                device=rand_device,
                dtype=model_output.dtype,
            ).to(model_output.device)
            std = self._std(alpha_bar_t, alpha_bar_prev, beta_t, predicted_variance)
            prev_sample = prev_sample + std * noise

        return DDPMSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample
        )

    def _split_variance(
        self, model_output: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split off the predicted variance channels, for the learned variance types."""
        channels = sample.shape[1]
        if self.config.variance_type in ("learned", "learned_range"):
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"variance_type {self.config.variance_type!r} expects "
                    f"model_output with 2*C={2 * channels} channels (prediction, "
                    f"then variance), got shape {tuple(model_output.shape)}"
                )
            return model_output.split(channels, dim=1)  # 2x (B, C, H, W)
        check_model_output(model_output, sample)
        return model_output, None

    def _std(
        self,
        alpha_bar_t: torch.Tensor,
        alpha_bar_prev: torch.Tensor,
        beta_t: torch.Tensor,
        predicted_variance: torch.Tensor | None,
    ) -> torch.Tensor:
        """The standard deviation of the noise one reverse step adds."""
        # the true posterior's variance beta_tilde_t, eq. 7, Ho et al. 2020; it is 0
        # on the step to -1, so clamp it to keep its log finite
        posterior_variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
        posterior_variance = torch.clamp(posterior_variance, min=1e-20)
        variance_type = self.config.variance_type
        if variance_type == "fixed_small":
            return posterior_variance**0.5
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(posterior_variance))
        if variance_type == "fixed_large":
            # sigma_t^2 = beta_t, the upper bound, works as well (Section 3.2,
            # Ho et al. 2020)
            return beta_t**0.5
        if variance_type == "learned":
            return predicted_variance**0.5
        # learned_range: the model mixes the two bounds in log space,
        # Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t), eq. 15,
        # Nichol & Dhariwal 2021, with v = (output + 1) / 2 in [0, 1]
        frac = (predicted_variance + 1) / 2
        log_variance = frac * torch.log(beta_t) + (1 - frac) * torch.log(
            posterior_variance
        )
        return torch.exp(0.5 * log_variance)
