"""DPM-Solver++ (Lu et al. 2022): a second-order multistep solver for the ODE.

Write the probability-flow ODE in terms of lambda = log(alpha / sigma), the log
signal-to-noise ratio (alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)).
Its linear part can be solved exactly, which leaves an integral of the model's
clean-sample prediction x_0(lambda) (eq. 9 of DPM-Solver++):

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_s^t e^lambda x_0(lambda) dlambda.

With x_0 held constant over the step this is the first-order update, the same
as DDIM's (eta = 0):

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x_0,    h = lambda_t - lambda_s.

"2M", the second-order multistep variant (Algorithm 2), also uses the previous
step's x_0 to estimate how x_0 changes with lambda, at no extra model call:

    D = x_0(s0) + 1/(2 r) (x_0(s0) - x_0(s1)),   r = h_prev / h,
    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^-h - 1) D.

Stable Diffusion gets good images in about 20 steps this way.

The interface and the numbers are diffusers' `DPMSolverMultistepScheduler` with
algorithm_type="dpmsolver++" and solver_order 1 or 2: with the same model and
settings, a sampling loop gives the same samples.
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
)
from sdlearn.schedulers.sigmas import (
    FINAL_SIGMAS_TYPES,
    SigmaScheduler,
    final_sigma,
    karras_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)

SOLVER_TYPES: tuple[str, ...] = ("midpoint", "heun")


@dataclass(frozen=True)
class DPMSolverMultistepConfig:
    """The settings of a DPMSolverMultistepScheduler, with diffusers' names."""

    num_train_timesteps: int = 1000  # timesteps the model was trained with
    beta_start: float = 0.00085  # first beta of the linear and scaled_linear schedules
    beta_end: float = 0.012  # last beta of the linear and scaled_linear schedules
    beta_schedule: str = "scaled_linear"  # how beta grows: one of BETA_SCHEDULES
    trained_betas: tuple[float, ...] | None = (
        None  # explicit betas instead of a schedule
    )
    solver_order: int = 2  # 1 (DDIM-like) or 2 (2M)
    prediction_type: str = "epsilon"  # what the model predicts: one of PREDICTION_TYPES
    algorithm_type: str = (
        "dpmsolver++"  # "dpmsolver++": the solver works on x_0 predictions
    )
    solver_type: str = "midpoint"  # the second-order update: "midpoint" or "heun"
    lower_order_final: bool = True  # first order for the last step(s) under 15 steps
    euler_at_final: bool = False  # always first order for the last step
    use_karras_sigmas: bool = (
        False  # Karras et al.'s noise levels instead of the spacing's
    )
    final_sigmas_type: str = "zero"  # where the last step lands: "zero" or "sigma_min"
    lambda_min_clipped: float = -float(
        "inf"
    )  # skip timesteps whose log-SNR is below this
    timestep_spacing: str = (
        "linspace"  # how sampling picks timesteps: one of TIMESTEP_SPACINGS
    )
    steps_offset: int = 1  # added to the timesteps of the "leading" spacing

    def __post_init__(self) -> None:
        # diffusers' configs may hold any truthy value
        object.__setattr__(self, "use_karras_sigmas", bool(self.use_karras_sigmas))
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("solver_order", self.solver_order, (1, 2))
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("algorithm_type", self.algorithm_type, ("dpmsolver++",))
        check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)) of a sigma level.

    sigma = sigma_t / alpha_t, and alpha_t^2 + sigma_t^2 = 1.
    """
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha_t / sigma_t), the log signal-to-noise ratio (+inf at 0)."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


def dpm_solver_first_order(
    sample: torch.Tensor,
    pred_original_sample: torch.Tensor,
    sigma_s: torch.Tensor,
    sigma_t: torch.Tensor,
) -> torch.Tensor:
    """DPM-Solver++'s first-order step from level sigma_s to sigma_t (eq. 10).

    Args:
        sample: (B, C, H, W) x_s, the noisy sample (not scaled).
        pred_original_sample: (B, C, H, W) the model's x_0 at x_s.
        sigma_s, sigma_t: the current and the next noise level (sigma space).

    Returns:
        (B, C, H, W) x_t.
    """
    alpha_t, sigma_t_ = alpha_sigma(sigma_t)
    alpha_s, sigma_s_ = alpha_sigma(sigma_s)
    h = log_snr(sigma_t) - log_snr(sigma_s)
    return (sigma_t_ / sigma_s_) * sample - (
        alpha_t * (torch.exp(-h) - 1.0)
    ) * pred_original_sample


def dpm_solver_second_order(
    sample: torch.Tensor,
    pred_original_samples: tuple[torch.Tensor, torch.Tensor],
    sigmas: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M)'s multistep update from sigma_s0 to sigma_t.

    Args:
        sample: (B, C, H, W) x_s0, the current noisy sample.
        pred_original_samples: (m1, m0): the x_0 predictions of the previous step
            (at sigma_s1) and of this one (at sigma_s0).
        sigmas: (sigma_s1, sigma_s0, sigma_t): previous, current, next levels.
        solver_type: "midpoint" (the paper's 2M) or "heun".

    Returns:
        (B, C, H, W) x_t.
    """
    m1, m0 = pred_original_samples
    sigma_s1, sigma_s0, sigma_t = sigmas
    alpha_t, sigma_t_ = alpha_sigma(sigma_t)
    _, sigma_s0_ = alpha_sigma(sigma_s0)
    lambda_t, lambda_s0 = log_snr(sigma_t), log_snr(sigma_s0)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - log_snr(sigma_s1)
    r0 = h_0 / h
    # D1 estimates h * dx_0/dlambda from the last two predictions
    D0, D1 = m0, (1.0 / r0) * (m0 - m1)
    x_t = (sigma_t_ / sigma_s0_) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
    if solver_type == "midpoint":
        return x_t - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
    return x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1


def dpm_solver_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    last_timestep: int,
    timestep_spacing: str,
    steps_offset: int,
) -> np.ndarray:
    """DPM-Solver's timesteps, as diffusers spaces them (n + 1 points, the last
    dropped, so the first step starts at the noisiest timestep for "linspace").

    Returns:
        (num_inference_steps,) int64 timesteps from the noisiest down.
    """
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    n = num_inference_steps
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1]
        return timesteps.copy().astype(np.int64)
    if timestep_spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1]
        return timesteps.copy().astype(np.int64) + steps_offset
    step_ratio = num_train_timesteps / n
    timesteps = np.arange(last_timestep, 0, -step_ratio).round().astype(np.int64)
    return timesteps - 1


class DPMSolverMultistepScheduler(SigmaScheduler):
    """DPM-Solver++ (1 or 2M) with diffusers' interface and SD 1.x's betas.

    Args:
        config: all the settings at once, a `DPMSolverMultistepConfig`; its
            defaults when None. The keyword settings below change single
            fields of it, by name.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        prediction_type, timestep_spacing, steps_offset: as for `DDPMScheduler`;
            diffusers' default spacing here is "linspace".
        solver_order: 2 for DPM-Solver++(2M), 1 for the first-order solver.
        algorithm_type: "dpmsolver++", the only one sdlearn has.
        solver_type: "midpoint" or "heun" form of the second-order update.
        lower_order_final: under 15 steps, end with first and second order
            steps (more stable for few steps).
        euler_at_final: always take the last step with first order.
        use_karras_sigmas: Karras et al.'s noise levels (`karras_sigmas`).
        final_sigmas_type: "zero" ends on a clean sample, "sigma_min" on sigma_0.
        lambda_min_clipped: leave out the timesteps whose log-SNR lambda is
            below this (-inf keeps all).
    """

    config_class = DPMSolverMultistepConfig
    unsupported = {
        **SigmaScheduler.unsupported,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "variance_type": None,
        "use_dynamic_shifting": False,
    }
    # DPM-Solver works on x_t itself: N(0, I) noise, the model's input unscaled
    init_noise_sigma = 1.0

    def __init__(
        self, config: DPMSolverMultistepConfig | None = None, **settings: Any
    ) -> None:
        config = self.make_config(config, settings)
        self._init_schedule(config)
        # lambda_t = log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)) per timestep
        self.lambda_t = torch.log(self.alphas_cumprod**0.5) - torch.log(
            (1 - self.alphas_cumprod) ** 0.5
        )
        self.sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        timesteps = np.linspace(
            0, config.num_train_timesteps - 1, config.num_train_timesteps
        )
        self.timesteps = torch.from_numpy(timesteps[::-1].astype(np.float32).copy())
        self.model_outputs: list[torch.Tensor | None] = [None] * config.solver_order
        self.lower_order_nums = 0
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
        if not 1 <= num_inference_steps <= config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be between 1 and num_train_timesteps="
                f"{config.num_train_timesteps}, got {num_inference_steps}"
            )
        # leave out the timesteps whose log-SNR is below lambda_min_clipped
        clipped = torch.searchsorted(
            torch.flip(self.lambda_t, [0]), config.lambda_min_clipped
        )
        last_timestep = (config.num_train_timesteps - clipped).item()
        timesteps = dpm_solver_timesteps(
            num_inference_steps,
            config.num_train_timesteps,
            last_timestep,
            config.timestep_spacing,
            config.steps_offset,
        )
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()
        if config.use_karras_sigmas:
            sigmas = karras_sigmas(
                train_sigmas[0].item(), train_sigmas[-1].item(), num_inference_steps
            )
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if config.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        last = final_sigma(self.alphas_cumprod, config.final_sigmas_type)
        self.sigmas = torch.from_numpy(
            np.concatenate([sigmas, [last]]).astype(np.float32)
        )
        self.timesteps = torch.from_numpy(timesteps).to(device, torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * config.solver_order
        self.lower_order_nums = 0
        self._reset_steps()

    def scale_model_input(
        self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The model's input: x_t itself; DPM-Solver needs no scaling."""
        return sample

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Noise clean samples to `timesteps`: alpha_t x_0 + sigma_t eps.

        Args:
            original_samples: (B, C, H, W) clean samples.
            noise: (B, C, H, W) standard normal noise.
            timesteps: (B,) or (1,) timesteps out of `self.timesteps`.

        Returns:
            (B, C, H, W) the noisy samples x_t.
        """
        alpha_t, sigma_t = alpha_sigma(self.noise_level(timesteps, original_samples))
        return alpha_t * original_samples + sigma_t * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        """One DPM-Solver++ step: first order until two x_0 predictions exist.

        Args:
            model_output: (B, C, H, W) the model's prediction at `timestep`.
            timestep: the current timestep, one of `self.timesteps`.
            sample: (B, C, H, W) the current noisy sample x_t.
            generator: unused (the solver adds no noise); kept so that one
                sampling loop drives every scheduler.

        Returns:
            SchedulerOutput with prev_sample and pred_original_sample (B, C, H, W).
        """
        check_model_output(model_output, sample)
        self._start_step(timestep)
        config, i, n = self.config, self._step_index, len(self.timesteps)
        # the last step is first order when it lands on sigma 0 (lambda = inf,
        # where the second-order term is undefined) or, under 15 steps, for
        # stability (diffusers' lower_order_second matters for third order only)
        lower_order_final = i == n - 1 and (
            config.euler_at_final
            or (config.lower_order_final and n < 15)
            or config.final_sigmas_type == "zero"
        )

        # 1. the model's x_0, the quantity DPM-Solver++ extrapolates
        sigma = self.sigmas[i]
        alpha_t, sigma_t = alpha_sigma(sigma)
        if config.prediction_type == "epsilon":
            x_0 = (sample - sigma_t * model_output) / alpha_t
        elif config.prediction_type == "sample":
            x_0 = model_output
        else:
            x_0 = alpha_t * sample - sigma_t * model_output
        self.model_outputs = [*self.model_outputs[1:], x_0]

        # 2. first order at the start and the end, second order in between
        sample = sample.float()
        sigma_next = self.sigmas[i + 1]
        if config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = dpm_solver_first_order(sample, x_0, sigma, sigma_next)
        else:
            prev_sample = dpm_solver_second_order(
                sample,
                (self.model_outputs[-2], x_0),
                (self.sigmas[i - 1], sigma, sigma_next),
                config.solver_type,
            )
        self.lower_order_nums = min(self.lower_order_nums + 1, config.solver_order)
        self._end_step()
        return SchedulerOutput(
            prev_sample=prev_sample.to(model_output.dtype), pred_original_sample=x_0
        )
