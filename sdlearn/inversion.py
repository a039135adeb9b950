"""Chapter 08: DDIM inversion, from an image's latents back to the noise that
DDIM (eta 0) turns into it.

DDIM's steps are deterministic, so they can be run backwards: from the clean
latents up to the noisiest timestep, each step asking the model for the noise
at the timestep it lands on. Sampling from the result with the same schedule
and steps draws the image again, nearly; editing the prompt on the way back
edits the image.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from tqdm.auto import tqdm

from sdlearn.pipeline import StableDiffusionPipeline
from sdlearn.schedulers.common import Scheduler, scheduler_to_config
from sdlearn.schedulers.ddim import DDIMConfig, DDIMInverseScheduler


def inverse_settings(scheduler: Scheduler) -> dict:
    """DDIMInverseScheduler's settings for the noise schedule of `scheduler`."""
    config = scheduler_to_config(scheduler)
    settings = {f.name: config[f.name] for f in fields(DDIMConfig) if f.name in config}
    # the inverse scheduler spaces its steps as DDIM does: leading or trailing
    if settings.get("timestep_spacing") not in ("leading", "trailing"):
        settings["timestep_spacing"] = "leading"
    return settings


@torch.no_grad()
def invert(
    pipeline: StableDiffusionPipeline,
    latents: torch.Tensor,
    prompt: str | list[str] = "",
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    fixed_point_iterations: int = 0,
) -> torch.Tensor:
    """DDIM inversion: the starting noise from which DDIM (eta 0) redraws `latents`
    with `pipeline`.

    Runs `DDIMInverseScheduler` on the pipeline's noise schedule, from the
    clean latents up to the noisiest timestep. Sampling with `DDIMScheduler`
    (same schedule and steps, `latents=` the result) comes back close to the
    start. Each inverse step asks the model at the timestep it lands on but
    for the sample it starts from, which sampling never does; that mismatch
    is the round trip's error. `fixed_point_iterations` re-asks the model at
    the landing point itself (x_next = step(eps(x_next)), solved by
    iteration), which makes each step the exact inverse of DDIM's.

    Args:
        pipeline: the models and the scheduler whose noise schedule to invert.
        latents: (B, C, h, w) clean latents, e.g. from `pipeline.encode_image`.
        prompt: the prompt to invert under (one, or one per latent).
        num_inference_steps: DDIM steps; sample back with the same number.
        guidance_scale: classifier-free guidance while inverting; 1 (none)
            inverts best, since guidance bends the path.
        fixed_point_iterations: extra model calls per step to refine it.

    Returns:
        (B, C, h, w) the noise latents x_T.
    """
    if latents.ndim != 4 or latents.shape[1] != pipeline.unet.config.in_channels:
        raise ValueError(
            f"expected latents of shape (B, {pipeline.unet.config.in_channels}, "
            f"h, w), got {tuple(latents.shape)}"
        )
    if fixed_point_iterations < 0:
        raise ValueError(
            f"expected fixed_point_iterations >= 0, got {fixed_point_iterations}"
        )
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) == 1:
        prompts = prompts * len(latents)
    if len(prompts) != len(latents):
        raise ValueError(
            f"expected one prompt or one per latent ({len(latents)}), "
            f"got {len(prompts)}"
        )
    text = pipeline.encode_prompt(prompts, 1)
    if guidance_scale > 1:
        text = torch.cat([pipeline.encode_prompt([""] * len(latents), 1), text])
    inverse = DDIMInverseScheduler(**inverse_settings(pipeline.scheduler))
    inverse.set_timesteps(num_inference_steps, device=pipeline.device)
    x = latents.to(pipeline.device)
    for t in tqdm(inverse.timesteps, disable=not pipeline.progress):
        x_next = inverse.step(pipeline.predict_noise(x, t, text, guidance_scale), t, x)
        x_next = x_next.prev_sample
        for _ in range(fixed_point_iterations):
            eps = pipeline.predict_noise(x_next, t, text, guidance_scale)
            x_next = inverse.step(eps, t, x).prev_sample
        x = x_next
    return x
