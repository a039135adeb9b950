"""Reference tensors for sdlearn.schedulers.ddpm, made with diffusers' DDPMScheduler.

tests/test_ddpm.py imports the settings below and `sample_loop`, so the stored
tensors and the tests that read them share one definition. Every setting spells
out all of the scheduler's options, because diffusers' defaults are not ours.
"""

from __future__ import annotations

from typing import Any

import torch

# Stable Diffusion 1.x's scheduler settings, in full.
SD15: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

# A short made-up schedule, to cover trained_betas.
TRAINED_BETAS: tuple[float, ...] = tuple(0.02 + 0.03 * i for i in range(20))

# One scheduler per beta schedule, for alphas_cumprod.
SCHEDULES: dict[str, dict[str, Any]] = {
    "linear": {**SD15, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": SD15,
    "squaredcos_cap_v2": {**SD15, "beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {
        **SD15,
        "num_train_timesteps": 20,
        "trained_betas": TRAINED_BETAS,
    },
}

# (timestep_spacing, steps_offset, num_inference_steps) for set_timesteps.
SPACINGS: list[tuple[str, int, int]] = [
    (spacing, offset, steps)
    for spacing in ("leading", "trailing", "linspace")
    for offset in (0, 1)
    for steps in (1, 3, 7, 50, 999)
]

# Sampling loops that mix schedule, variance, prediction, clipping and spacing;
# num_inference_steps None means set_timesteps is never called.
LOOPS: dict[str, dict[str, Any]] = {
    "sd15": {"settings": SD15, "num_inference_steps": 20},
    "pixels_linear_clip": {
        "settings": {
            **SD15,
            "beta_schedule": "linear",
            "beta_start": 1e-4,
            "beta_end": 0.02,
            "variance_type": "fixed_large",
            "clip_sample": True,
            "prediction_type": "sample",
            "timestep_spacing": "trailing",
            "steps_offset": 0,
        },
        "num_inference_steps": 10,
    },
    "cosine_v": {
        "settings": {
            **SD15,
            "beta_schedule": "squaredcos_cap_v2",
            "variance_type": "fixed_small_log",
            "clip_sample": True,
            "clip_sample_range": 2.0,
            "prediction_type": "v_prediction",
            "timestep_spacing": "linspace",
        },
        "num_inference_steps": 7,
    },
    "learned_range": {
        "settings": {
            **SD15,
            "variance_type": "learned_range",
            "timestep_spacing": "trailing",
        },
        "num_inference_steps": 25,
    },
    "learned_every_timestep": {
        "settings": {
            **SD15,
            "num_train_timesteps": 50,
            "beta_schedule": "linear",
            "beta_start": 1e-3,
            "beta_end": 0.2,
            "variance_type": "learned",
        },
        "num_inference_steps": None,
    },
    "trained_betas_v": {
        "settings": {
            **SCHEDULES["trained_betas"],
            "variance_type": "fixed_large",
            "prediction_type": "v_prediction",
        },
        "num_inference_steps": 4,
    },
}

SAMPLE_SHAPE = (2, 3, 4, 4)  # (B, C, H, W)


def loop_inputs(index: int) -> dict[str, torch.Tensor]:
    """The starting noise, the fake model's direction and the step noise's seed."""
    generator = torch.Generator().manual_seed(100 + index)
    return {
        "initial": torch.randn(SAMPLE_SHAPE, generator=generator),
        "direction": torch.randn(SAMPLE_SHAPE, generator=generator),
        "seed": torch.tensor(200 + index),
    }


def fake_model(
    sample: torch.Tensor,
    timestep: int | torch.Tensor,
    direction: torch.Tensor,
    variance_type: str,
) -> torch.Tensor:
    """A fixed stand-in for a UNet: a smooth, deterministic function of (sample, t).

    Args:
        sample: (B, C, H, W) the current noisy sample.
        timestep: the current timestep.
        direction: (B, C, H, W) a fixed tensor that makes the output depend on t.
        variance_type: the scheduler's; the learned ones get variance channels.

    Returns:
        (B, C, H, W), or (B, 2C, H, W) with the variance after the prediction.
    """
    output = 0.5 * sample + float(timestep) / 1000 * direction
    if variance_type == "learned_range":
        # a mixing value in [-1, 1]
        return torch.cat([output, torch.tanh(sample)], dim=1)  # (B, 2C, H, W)
    if variance_type == "learned":
        # a small positive variance
        return torch.cat([output, 0.01 * torch.sigmoid(sample)], dim=1)  # (B, 2C, H, W)
    return output


def sample_loop(
    scheduler: Any, loop: dict[str, Any], inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Run a sampling loop with any scheduler that has diffusers' interface.

    Args:
        scheduler: an sdlearn or diffusers DDPMScheduler built from loop["settings"].
        loop: one of LOOPS.
        inputs: loop_inputs(...) for this loop.

    Returns:
        timesteps (steps,), and every step's prev_sample and pred_original_sample
        stacked: (steps, B, C, H, W).
    """
    if loop["num_inference_steps"] is not None:
        scheduler.set_timesteps(loop["num_inference_steps"])
    generator = torch.Generator().manual_seed(int(inputs["seed"]))
    sample = inputs["initial"]
    prev_samples, pred_original_samples = [], []
    for t in scheduler.timesteps:
        output = fake_model(
            sample, t, inputs["direction"], loop["settings"]["variance_type"]
        )
        result = scheduler.step(output, t, sample, generator=generator)
        sample = result.prev_sample
        prev_samples.append(result.prev_sample)
        pred_original_samples.append(result.pred_original_sample)
    return {
        "timesteps": scheduler.timesteps.clone(),
        "prev_samples": torch.stack(prev_samples),  # (steps, B, C, H, W)
        "pred_original_samples": torch.stack(pred_original_samples),
    }


def add_noise_inputs() -> dict[str, torch.Tensor]:
    """Clean samples, noise and one timestep per sample, the ends included."""
    generator = torch.Generator().manual_seed(0)
    return {
        "original": torch.randn(4, 3, 4, 4, generator=generator),
        "noise": torch.randn(4, 3, 4, 4, generator=generator),
        "timesteps": torch.tensor([0, 1, 500, 999]),
    }


def diffusers_scheduler(settings: dict[str, Any]) -> Any:
    """diffusers' DDPMScheduler with these settings."""
    from diffusers import DDPMScheduler

    trained_betas = settings["trained_betas"]
    if trained_betas is not None:
        settings = {**settings, "trained_betas": list(trained_betas)}
    return DDPMScheduler(**settings)


def make() -> dict[str, torch.Tensor]:
    tensors = {}
    for name, settings in SCHEDULES.items():
        scheduler = diffusers_scheduler(settings)
        tensors[f"alphas_cumprod/{name}"] = scheduler.alphas_cumprod

    for spacing, offset, steps in SPACINGS:
        settings = {**SD15, "timestep_spacing": spacing, "steps_offset": offset}
        scheduler = diffusers_scheduler(settings)
        scheduler.set_timesteps(steps)
        tensors[f"timesteps/{spacing}/{offset}/{steps}"] = scheduler.timesteps

    inputs = add_noise_inputs()
    scheduler = diffusers_scheduler(SD15)
    noisy = scheduler.add_noise(
        inputs["original"], inputs["noise"], inputs["timesteps"]
    )
    tensors.update({f"add_noise/{k}": v for k, v in inputs.items()})
    tensors["add_noise/noisy"] = noisy

    for index, (name, loop) in enumerate(LOOPS.items()):
        inputs = loop_inputs(index)
        outputs = sample_loop(diffusers_scheduler(loop["settings"]), loop, inputs)
        tensors.update({f"loops/{name}/{k}": v for k, v in inputs.items()})
        tensors.update({f"loops/{name}/{k}": v for k, v in outputs.items()})
    return tensors
