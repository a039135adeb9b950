"""What every noise scheduler shares: betas, alpha_bar, timestep spacing, add_noise.

All samplers in `sdlearn.schedulers` walk back through the same forward process,
the one fixed at training time: a beta per training timestep, and the running
product alpha_bar_t of (1 - beta) that says how much of the clean image is left
after t steps of noising. They differ only in how they walk back, so this module
holds the forward process and the bookkeeping around it; each algorithm has its
own file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise a ValueError naming `value` and the `choices` unless it is one of them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")


@dataclass
class SchedulerOutput:
    """What a scheduler's `step` returns.

    Args:
        prev_sample: (B, C, H, W) the less noisy sample at the previous timestep;
            the model's next input.
        pred_original_sample: (B, C, H, W) the current guess of the clean sample,
            handy for previews.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of improved DDPM, diffusers' "squaredcos_cap_v2".

    alpha_bar falls like a squared cosine, so images lose their information more
    evenly over the timesteps than with the linear schedule, which is almost pure
    noise for its last quarter.

    Args:
        num_train_timesteps: how many betas to make.
        max_beta: the cap on each beta; the last ones would approach 1 otherwise.

    Returns:
        (num_train_timesteps,) float32 betas.
    """

    def alpha_bar(time: float) -> float:
        # eq. 17, Nichol & Dhariwal 2021, with s = 0.008; time runs from 0 to 1.
        # The division by f(0) cancels in the ratio below, so it is left out.
        return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        start, end = i / num_train_timesteps, (i + 1) / num_train_timesteps
        # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, capped, Section 3.2,
        # Nichol & Dhariwal 2021
        betas.append(min(1 - alpha_bar(end) / alpha_bar(start), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """The variance of the noise added at each training timestep.

    Args:
        num_train_timesteps: the number of training timesteps.
        beta_start: the first beta (linear and scaled_linear only).
        beta_end: the last beta (linear and scaled_linear only).
        beta_schedule: one of BETA_SCHEDULES; ignored when `trained_betas` is given.
        trained_betas: explicit betas, one per training timestep.

    Returns:
        (num_train_timesteps,) float32 betas.
    """
    if trained_betas is not None:
        if len(trained_betas) != num_train_timesteps:
            raise ValueError(
                f"expected one trained beta per training timestep "
                f"({num_train_timesteps}), got {len(trained_betas)}"
            )
        return torch.tensor(trained_betas, dtype=torch.float32)
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":
        # The DDPM paper's schedule (Section 4, Ho et al. 2020: 1e-4 to 0.02)
        return torch.linspace(
            beta_start, beta_end, num_train_timesteps, dtype=torch.float32
        )
    if beta_schedule == "scaled_linear":
        # Latent diffusion, and so Stable Diffusion, spaces sqrt(beta) evenly: its
        # betas start slower and end lower than a linear ramp between the same ends.
        sqrt_betas = torch.linspace(
            beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32
        )
        return sqrt_betas**2
    return cosine_betas(num_train_timesteps)


def make_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t for every training timestep t.

    Args:
        betas: (num_train_timesteps,) the noise variance of each step.

    Returns:
        (num_train_timesteps,) alpha_bar_t, falling from almost 1 towards 0.
    """
    # alpha_t = 1 - beta_t, alpha_bar_t = prod_{s <= t} alpha_s, just before eq. 4,
    # Ho et al. 2020
    return torch.cumprod(1.0 - betas, dim=0)


def spaced_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    timestep_spacing: str,
    steps_offset: int = 0,
) -> torch.Tensor:
    """Which training timesteps a sampler visits when it takes fewer steps.

    The three spacings are the ones Table 2 of Lin et al. 2024 ("Common Diffusion
    Noise Schedules and Sample Steps are Flawed") compares. They are computed with
    numpy exactly as diffusers does, so that rounding ties break the same way.

    Args:
        num_inference_steps: how many steps to take, 1 to num_train_timesteps.
        num_train_timesteps: the number of training timesteps.
        timestep_spacing: one of TIMESTEP_SPACINGS.
        steps_offset: added to every timestep of the "leading" spacing only
            (Stable Diffusion 1.x uses 1), as in diffusers.

    Returns:
        (num_inference_steps,) int64 timesteps, from the noisiest down.
    """
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps="
            f"{num_train_timesteps}, got {num_inference_steps}"
        )
    if timestep_spacing == "linspace":
        # evenly from the last training timestep down to 0, rounded
        timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps)
        timesteps = timesteps.round()[::-1]
    elif timestep_spacing == "leading":
        # every (T // n)-th timestep counted up from 0: the first step is never at
        # the noisiest timestep, which is what Lin et al. call flawed
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = np.arange(num_inference_steps)[::-1] * step_ratio + steps_offset
    else:
        # every (T / n)-th timestep counted down from T, so the first step starts
        # at the noisiest timestep T - 1
        step_ratio = num_train_timesteps / num_inference_steps
        timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)) - 1
    timesteps = torch.from_numpy(timesteps.astype(np.int64))
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(
            f"leading spacing with steps_offset={steps_offset} puts the first of "
            f"{num_inference_steps} steps at timestep {timesteps[0].item()}, past the "
            f"last training timestep {num_train_timesteps - 1}; take fewer steps or "
            f"use timestep_spacing='trailing'"
        )
    return timesteps


def check_timesteps(timesteps: torch.Tensor, num_train_timesteps: int) -> None:
    """Raise a ValueError unless `timesteps` are integers in [0, num_train_timesteps).

    Args:
        timesteps: a tensor of timesteps, any shape.
        num_train_timesteps: the number of training timesteps.
    """
    if timesteps.is_floating_point():
        raise ValueError(f"timesteps must be integers, got dtype {timesteps.dtype}")
    outside = timesteps[(timesteps < 0) | (timesteps >= num_train_timesteps)]
    if outside.numel() > 0:
        raise ValueError(
            f"timesteps must be in [0, {num_train_timesteps - 1}], "
            f"got {outside.unique().tolist()}"
        )


def check_model_output(model_output: torch.Tensor, sample: torch.Tensor) -> None:
    """Raise a ValueError unless the model's output has the sample's shape."""
    if model_output.shape != sample.shape:
        raise ValueError(
            f"expected model_output of the sample's shape {tuple(sample.shape)}, "
            f"got {tuple(model_output.shape)}"
        )


def add_noise(
    alphas_cumprod: torch.Tensor,
    original_samples: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor | int,
) -> torch.Tensor:
    """Noise clean samples to the given timesteps in one jump: a draw of q(x_t | x_0).

    Args:
        alphas_cumprod: (num_train_timesteps,) alpha_bar of every training timestep.
        original_samples: (B, C, H, W) clean samples x_0 (any shape with batch first).
        noise: (B, C, H, W) standard normal noise eps.
        timesteps: (B,) integer timesteps, one per sample, or a single one for all.

    Returns:
        (B, C, H, W) the noisy samples x_t.
    """
    if noise.shape != original_samples.shape:
        raise ValueError(
            f"expected noise of the samples' shape {tuple(original_samples.shape)}, "
            f"got {tuple(noise.shape)}"
        )
    timesteps = torch.as_tensor(timesteps, device=original_samples.device).flatten()
    batch_size = original_samples.shape[0]
    if timesteps.numel() not in (1, batch_size):
        raise ValueError(
            f"expected 1 or B={batch_size} timesteps, got {timesteps.numel()}"
        )
    check_timesteps(timesteps, len(alphas_cumprod))
    alphas_cumprod = alphas_cumprod.to(original_samples.device, original_samples.dtype)
    # one alpha_bar_t per sample, shaped to broadcast over the sample's other dims
    ones = [1] * (original_samples.ndim - 1)
    alpha_bar_t = alphas_cumprod[timesteps].view(-1, *ones)  # (B, 1, 1, 1)
    # x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, eq. 4, Ho et al. 2020
    return alpha_bar_t**0.5 * original_samples + (1 - alpha_bar_t) ** 0.5 * noise


def predict_original_and_noise(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean sample x_0 and the noise eps that a model's output implies at x_t.

    Args:
        model_output: (B, C, H, W) eps, x_0 or v, as `prediction_type` says.
        sample: (B, C, H, W) the noisy sample x_t.
        alpha_bar_t: alpha_bar at x_t's timestep.
        prediction_type: one of PREDICTION_TYPES.

    Returns:
        (x_0, eps), each (B, C, H, W), computed with diffusers' formulas.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    x_t, beta_bar_t = sample, 1 - alpha_bar_t
    if prediction_type == "epsilon":
        eps = model_output
        # x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), eq. 15,
        # Ho et al. 2020
        x_0 = (x_t - beta_bar_t**0.5 * eps) / alpha_bar_t**0.5
    elif prediction_type == "sample":
        x_0 = model_output
        eps = (x_t - alpha_bar_t**0.5 * x_0) / beta_bar_t**0.5
    else:
        v = model_output
        # v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, Section 4,
        # Salimans & Ho 2022
        x_0 = alpha_bar_t**0.5 * x_t - beta_bar_t**0.5 * v
        eps = alpha_bar_t**0.5 * v + beta_bar_t**0.5 * x_t
    return x_0, eps


class Scheduler:
    """What every sampler shares: diffusers' interface around one noise schedule.

    A subclass sets `config_class` (its frozen dataclass of settings, with
    diffusers' names and Stable Diffusion 1.x's defaults); its `__init__` takes
    a config and settings to change in it, by name, as diffusers' schedulers
    take them (`DDPMScheduler(beta_schedule="linear")`), passes the result of
    `make_config` to `_init_schedule` (config, betas, alphas_cumprod) and sets
    `init_noise_sigma` and `timesteps`; it brings its own `step`. diffusers'
    scheduler of the same class name is its reference.
    """

    config_class: type
    # diffusers settings this class leaves out, with the value they must have
    # (anything else would change the numbers)
    unsupported: dict[str, Any] = {
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }

    @classmethod
    def make_config(cls, config: Any | None, settings: dict[str, Any]) -> Any:
        """`config` (`config_class`'s defaults when None) with `settings` changed.

        Args:
            config: a `config_class`, or None.
            settings: fields to change, by diffusers' names; `trained_betas` may
                be any sequence (a JSON config's list).
        """
        if settings.get("trained_betas") is not None:
            settings = {**settings, "trained_betas": tuple(settings["trained_betas"])}
        return replace(cls.config_class() if config is None else config, **settings)

    def _init_schedule(self, config: Any) -> None:
        """Keep `config` and compute the noise schedule it describes: `betas`
        and `alphas_cumprod` per training timestep; no timesteps chosen yet."""
        self.config = config
        self.betas = make_betas(
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas,
        )
        self.alphas_cumprod = make_alphas_cumprod(self.betas)
        self.num_inference_steps: int | None = None

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> Scheduler:
        """The same scheduler as diffusers' scheduler of this class's name.

        Args:
            scheduler: e.g. a `diffusers.DDPMScheduler` for `DDPMScheduler` (or
                anything whose `config` holds all of `config_class`'s fields).

        Returns:
            This class's scheduler with the same settings.
        """
        config = scheduler.config
        settings = fields(cls.config_class)
        missing = [f.name for f in settings if f.name not in config]
        if missing:
            raise ValueError(
                f"scheduler.config lacks {missing}; convert it first with "
                f"diffusers.{cls.__name__}.from_config(scheduler.config)"
            )
        # Features we leave out must be off, or the numbers would differ.
        for name, value in cls.unsupported.items():
            if config.get(name, value) != value:
                raise ValueError(
                    f"{name}={config[name]!r} is not supported, expected {value!r}"
                )
        return cls(**{f.name: config[f.name] for f in settings})

    def to_diffusers(self) -> Any:
        """diffusers' scheduler of this class's name with the same settings
        (needs diffusers installed)."""
        import diffusers

        settings = asdict(self.config)
        if settings["trained_betas"] is not None:
            settings["trained_betas"] = list(settings["trained_betas"])
        return getattr(diffusers, type(self).__name__)(**settings)

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None
    ) -> None:
        """Choose the timesteps to sample with; they land in `self.timesteps`.

        Args:
            num_inference_steps: how many steps to take, 1 to num_train_timesteps.
            device: where to put `self.timesteps`.
        """
        self.timesteps = spaced_timesteps(
            num_inference_steps,
            self.config.num_train_timesteps,
            self.config.timestep_spacing,
            self.config.steps_offset,
        ).to(device)
        self.num_inference_steps = num_inference_steps

    def scale_model_input(
        self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The model's input at `timestep`: for DDPM and DDIM, `sample` itself.

        Kept so that one sampling loop drives every scheduler; Euler's does scale.

        Args:
            sample: (B, C, H, W) the current noisy sample.
            timestep: the current timestep (unused).

        Returns:
            (B, C, H, W) `sample`, unchanged.
        """
        return sample

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor | int,
    ) -> torch.Tensor:
        """Noise clean samples to the given timesteps, as in training.

        Args:
            original_samples: (B, C, H, W) clean samples.
            noise: (B, C, H, W) standard normal noise.
            timesteps: (B,) integer timesteps, one per sample, or a single one.

        Returns:
            (B, C, H, W) the noisy samples.
        """
        return add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
