"""The sigma view of diffusion, shared by Euler, Euler ancestral and DPM-Solver.

Divide x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps by sqrt(alpha_bar_t):

    x = x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps,
    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t).

In these coordinates noising only adds Gaussian noise of standard deviation sigma,
from almost 0 at t = 0 to about 14.6 at t = 999 for Stable Diffusion's schedule.
Sampling is then solving the probability-flow ODE of Karras et al. 2022 (eq. 1
with sigma(t) = t):

    dx / dsigma = (x - x_0(x, sigma)) / sigma = eps(x, sigma),

from the largest sigma down to 0; x_0(x, sigma) is the model's guess of the clean
sample. Euler's method and DPM-Solver are two ways to take its steps. The model
was trained on x_t, not x, so its input is x / sqrt(sigma^2 + 1) (which is x_t).

The numbers follow diffusers (Euler*DiscreteScheduler, DPMSolverMultistepScheduler):
sigmas are interpolated at the chosen timesteps, timesteps found back from sigmas
by interpolating log sigma, and each scheduler counts its steps (`step_index`) so
that a timestep may repeat.
"""

from __future__ import annotations

import numpy as np
import torch

from sdlearn.schedulers.common import Scheduler, check_choice

FINAL_SIGMAS_TYPES: tuple[str, ...] = ("zero", "sigma_min")


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of every training timestep.

    Args:
        alphas_cumprod: (num_train_timesteps,) alpha_bar_t.

    Returns:
        (num_train_timesteps,) sigmas, rising with t.
    """
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(
    sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0
) -> np.ndarray:
    """The noise levels of Karras et al. 2022, eq. 5: dense near sigma_min.

    Evenly spaced in sigma^(1/rho) rather than in t: with rho = 7 the steps are
    short where the image's details form (small sigma) and long where the
    sample is mostly noise.

    Args:
        sigma_min: the last (smallest) sigma.
        sigma_max: the first (largest) sigma.
        num_inference_steps: how many sigmas.
        rho: the spacing's exponent; 7 in the paper.

    Returns:
        (num_inference_steps,) float64 sigmas from sigma_max down to sigma_min.
    """
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma, interpolating log sigma.

    Args:
        sigmas: (N,) noise levels.
        log_sigmas: (num_train_timesteps,) log sigma_t of the training timesteps,
            rising with t.

    Returns:
        (N,) timesteps t in [0, num_train_timesteps - 1] with log sigma_t
        linearly interpolated to each sigma, as diffusers computes them.
    """
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (num_train_timesteps, N)
    # the last training timestep whose log sigma is at most the given one
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0)
    low_idx = low_idx.clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigmas.shape)


def final_sigma(alphas_cumprod: torch.Tensor, final_sigmas_type: str) -> float:
    """Where the last step lands: sigma 0 (a clean sample) or sigma_0."""
    check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if final_sigmas_type == "zero":
        return 0.0
    return float(sigmas_from_alphas_cumprod(alphas_cumprod[:1])[0])


def sigma_original_sample(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The clean sample x_0 that a model's output implies at x = x_0 + sigma eps.

    Args:
        model_output: (B, C, H, W) eps, x_0 or v, as `prediction_type` says.
        sample: (B, C, H, W) x, in sigma coordinates (not x_t).
        sigma: the noise level of `sample`.
        prediction_type: "epsilon", "sample" or "v_prediction".

    Returns:
        (B, C, H, W) x_0.
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 with
    # sqrt(alpha_bar) = 1 / sqrt(sigma^2 + 1) and x_t = x / sqrt(sigma^2 + 1)
    return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)


class SigmaScheduler(Scheduler):
    """What the sigma-space samplers share: `sigmas`, a step counter, and the
    Euler samplers' starting noise, input scaling and add_noise (x = x_0 +
    sigma eps), which DPM-Solver, working on x_t itself, overrides.

    A subclass fills `self.sigmas` ((N + 1,) float32, the N steps' noise levels
    and the final one) and `self.timesteps` in `set_timesteps`, and brings its
    own `step`, which must call `_start_step` first and `_end_step` last.
    """

    def _reset_steps(self) -> None:
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """The index of the current step into `timesteps`; None before the first."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The index of the first step, when the pipeline set one (img2img)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start counting steps at `begin_index` (img2img starts part-way).

        Args:
            begin_index: the index into `timesteps` of the first step to run.
        """
        self._begin_index = begin_index

    def index_for_timestep(
        self,
        timestep: float | torch.Tensor,
        schedule_timesteps: torch.Tensor | None = None,
    ) -> int:
        """The index of `timestep` in the schedule (the second when it repeats,
        so that starting part-way does not skip a sigma, as in diffusers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"timestep {float(timestep)} is not one of the timesteps "
                f"set_timesteps chose; step through scheduler.timesteps"
            )
        return indices[1 if len(indices) > 1 else 0].item()

    def _start_step(self, timestep: float | torch.Tensor) -> None:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step")
        if self._step_index is None:
            if self._begin_index is None:
                self._step_index = self.index_for_timestep(timestep)
            else:
                self._step_index = self._begin_index
        if self._step_index >= len(self.timesteps):
            raise ValueError(
                f"all {len(self.timesteps)} steps are done; call set_timesteps "
                f"again to sample anew"
            )

    def _end_step(self) -> None:
        self._step_index += 1

    def sigma_step_indices(self, timesteps: torch.Tensor) -> list[int]:
        """The step index of each of `timesteps` (add_noise's lookup, as diffusers').

        After `set_begin_index` it is the step the scheduler is at (the begin
        index before the first step), whatever the timesteps say: img2img and
        inpainting call add_noise for the timestep they are about to run.
        """
        timesteps = torch.as_tensor(timesteps).to(self.timesteps.device).flatten()
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        index = self._begin_index if self._step_index is None else self._step_index
        return [index] * len(timesteps)

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The standard deviation of x at the first step: pure noise at sigma_max.

        x = x_0 + sigma eps is noise of variance sigma^2 + 1 (x_0 has about unit
        variance); the spacings that start at the last training timestep use
        sigma_max alone, as diffusers does.
        """
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def scale_model_input(
        self, sample: torch.Tensor, timestep: float | torch.Tensor
    ) -> torch.Tensor:
        """The UNet's input: x_t = x / sqrt(sigma^2 + 1), what it was trained on.

        Args:
            sample: (B, C, H, W) x at the current step.
            timestep: the current timestep, one of `self.timesteps`.

        Returns:
            (B, C, H, W) the scaled sample.
        """
        if self._step_index is None:
            self._start_step(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / (sigma**2 + 1) ** 0.5

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Noise clean samples to the sigma of `timesteps`: x = x_0 + sigma eps.

        Args:
            original_samples: (B, C, H, W) clean samples.
            noise: (B, C, H, W) standard normal noise.
            timesteps: (B,) or (1,) timesteps out of `self.timesteps`.

        Returns:
            (B, C, H, W) x in sigma coordinates, ready for `step`.
        """
        sigma = self.noise_level(timesteps, original_samples)  # (B, 1, 1, 1)
        return original_samples + noise * sigma

    def noise_level(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, 1) sigma of each of `timesteps`, to broadcast over `like`."""
        sigmas = self.sigmas.to(device=like.device, dtype=like.dtype)
        sigma = sigmas[self.sigma_step_indices(timesteps)]
        return sigma.view(-1, *[1] * (like.ndim - 1))
