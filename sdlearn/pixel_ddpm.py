"""DDPM's two algorithms for a model of pixels: training (Algorithm 1) and
sampling (Algorithm 2) of Ho et al. 2020.

Chapter 05 trains a small denoiser on the shapes images with `ddpm_loss` and
draws from it with `ddpm_sample`, the loop that diffusers' `DDPMPipeline` runs.
The latent model of Stable Diffusion has its own loss (`sdlearn.diffusion_loss`,
chapter 07) and its own loop (`sdlearn.pipeline`, chapter 06), which add the
text and the VAE around the same ideas.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sdlearn.schedulers.common import PREDICTION_TYPES, add_noise, check_choice
from sdlearn.schedulers.ddpm import DDPMScheduler, DDPMSchedulerOutput

# a model of noisy samples: (x_t (B, C, H, W), timesteps (B,)) -> (B, C, H, W)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# called after every sampling step: (index, timestep, the step's output)
StepCallback = Callable[[int, torch.Tensor, DDPMSchedulerOutput], None]


def ddpm_loss(
    model: Denoiser,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The simple loss of DDPM (eq. 14, Ho et al. 2020) on a batch of clean images.

    Each image gets a timestep drawn uniformly from the training timesteps, then
    noise; the model sees the noised batch and is scored with the mean squared
    error against the target that `prediction_type` names.

    Args:
        model: the denoiser, `model(x_t, timesteps)`.
        x0: (B, C, H, W) clean images.
        alphas_cumprod: (num_train_timesteps,) alpha_bar of every timestep.
        prediction_type: what the model predicts, one of PREDICTION_TYPES.
        generator: where the timesteps, then the noise, are drawn from.

    Returns:
        The loss, a 0-dim tensor.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if x0.ndim != 4:
        raise ValueError(f"expected x0 of shape (B, C, H, W), got {tuple(x0.shape)}")
    if alphas_cumprod.ndim != 1:
        raise ValueError(
            f"expected alphas_cumprod of shape (num_train_timesteps,), got "
            f"{tuple(alphas_cumprod.shape)}"
        )
    B = x0.shape[0]
    # timesteps first, then the noise: the order fixes what a seed gives
    t = torch.randint(0, len(alphas_cumprod), (B,), generator=generator)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = add_noise(alphas_cumprod, x0, noise, t)
    alpha_bar_t = alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = x0
    else:
        # v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, Salimans & Ho 2022
        target = alpha_bar_t.sqrt() * noise - (1 - alpha_bar_t).sqrt() * x0
    return F.mse_loss(model(x_t, t), target)


def ddpm_sample(
    model: Denoiser,
    scheduler: DDPMScheduler,
    noise: torch.Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Draw samples: from pure noise, one scheduler step per chosen timestep.

    Args:
        model: the denoiser, `model(x_t, timesteps)`, answering with what the
            scheduler's `prediction_type` says.
        scheduler: the sampler; its `step` takes each step.
        noise: (B, C, H, W) standard normal noise, where sampling starts.
        num_inference_steps: how many steps to take.
        generator: where each step's noise is drawn from.
        callback: called after every step with (index, timestep, the step's
            output), e.g. to keep a film strip.

    Returns:
        (B, C, H, W) the samples.
    """
    if noise.ndim != 4:
        raise ValueError(
            f"expected noise of shape (B, C, H, W), got {tuple(noise.shape)}"
        )
    scheduler.set_timesteps(num_inference_steps)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_output = model(x, t.expand(len(x)))  # (B, C, H, W)
        out = scheduler.step(model_output, t, x, generator=generator)
        if callback is not None:
            callback(i, t, out)
        x = out.prev_sample
    return x
