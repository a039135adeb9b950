"""Sampling as one short loop over the noise levels, as k-diffusion writes it.

A scheduler splits a sampler into `set_timesteps`, `scale_model_input` and
`step`, so that one pipeline loop drives any of them. k-diffusion (Crowson,
after Karras et al. 2022) writes each sampler instead as a loop over a list of
noise levels, given a *denoiser* `denoise(x, sigma) -> x_0`: the model with its
input scaling and its noise-to-x_0 conversion wrapped up. Everything a sampler
decides is then in a dozen lines: where it asks the model, how it steps, when
it adds noise and when it changes order.

`sample_sigmas` gives the same samples as the package's schedulers (Euler,
Euler ancestral, DPM-Solver++(2M)) given their sigmas, their starting noise and
the same generator; "heun" is Karras et al.'s second-order sampler (Algorithm
1), which spends two model calls per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdlearn.schedulers.common import check_choice
from sdlearn.schedulers.dpm_solver import (
    alpha_sigma,
    dpm_solver_first_order,
    dpm_solver_second_order,
)
from sdlearn.schedulers.euler import euler_step
from sdlearn.schedulers.euler_ancestral import ancestral_step

SIGMA_SAMPLERS: tuple[str, ...] = ("euler", "heun", "euler_ancestral", "dpmpp_2m")


def sample_sigmas(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sample: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Walk a sample down the noise levels `sigmas` with one sampler.

    Args:
        denoise: (x, sigma) -> x_0, the model's clean guess at x = x_0 + sigma eps.
        sample: (B, C, H, W) x at sigmas[0], in the sigma view: the starting
            noise times the scheduler's `init_noise_sigma` (DPM-Solver, which
            starts from x_t = noise, needs noise * sqrt(sigmas[0]^2 + 1)).
        sigmas: (N + 1,) noise levels from the largest down; the last is
            where the last step lands (0 for a clean sample).
        sampler: one of SIGMA_SAMPLERS.
        generator: the ancestral sampler's source of fresh noise.

    Returns:
        (B, C, H, W) x at sigmas[-1].
    """
    check_choice("sampler", sampler, SIGMA_SAMPLERS)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            f"expected sigmas of shape (N + 1,) with N >= 1 steps, got "
            f"{tuple(sigmas.shape)}"
        )
    x, previous = sample, None  # previous: the last step's x_0, for 2M
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_0 = denoise(x, sigma)
        if sampler == "euler":
            x = euler_step(x, x_0, sigma, sigma_next)
        elif sampler == "heun":
            # Karras et al.'s Algorithm 1: an Euler step, then the average of
            # the slopes at both ends (a second model call, but onto sigma 0)
            x_next = euler_step(x, x_0, sigma, sigma_next)
            if sigma_next > 0:
                slope = (x - x_0) / sigma
                slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
                x_next = x + (sigma_next - sigma) * (slope + slope_next) / 2
            x = x_next
        elif sampler == "euler_ancestral":
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = ancestral_step(x, x_0, sigma, sigma_next, noise)
        else:
            # DPM-Solver++ steps x_t = alpha x; first order on the first step
            # and on a last step to sigma 0 or of a short run (diffusers')
            x_t = alpha_sigma(sigma)[0] * x
            last = i == n - 1 and (n < 15 or sigma_next == 0)
            if previous is None or last:
                x_t = dpm_solver_first_order(x_t, x_0, sigma, sigma_next)
            else:
                levels = (sigmas[i - 1], sigma, sigma_next)
                x_t = dpm_solver_second_order(x_t, (previous, x_0), levels, "midpoint")
            x = x_t / alpha_sigma(sigma_next)[0]
            previous = x_0
    return x
