"""Checks for chapter 06's exercise 06.5: img2img and inpainting, one loop.

The learner's `edit(pipe, prompts, image, strength, mask, ...)` starts from a
picture instead of pure noise: it encodes the picture with the VAE, noises its
latents to the timestep where the strength says to start, runs the last steps of
chapter 06's loop and, with a mask, puts the picture back outside the mask after
every step. The reference is the package's pipeline called with the same
arguments (`pipe(prompts, image=..., mask_image=..., strength=...)`), which the
test suite holds to diffusers' img2img pipeline; with the same seed the two must
draw the same pixels, so the learner's random draws must come in diffusers'
order: the VAE's sample first, then the noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sdlearn.checks import Case, Verdict, check
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.checks.pipeline import Seed, with_seeds
from sdlearn.images import to_pixels
from sdlearn.pipeline import (
    StableDiffusionPipeline,
    blend_latents,
    classifier_free_guidance,
    img2img_start,
)
from sdlearn.shapes import Scene, render


def reference_edit(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    image: torch.Tensor,
    strength: float,
    mask: torch.Tensor | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The package's pipeline called as the learner's `edit` is: images
    (B, 3, H, W) in [0, 1]."""
    return pipe(
        prompts,
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="pt",
    ).images


@torch.no_grad()
def _slipped_edit(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    image: torch.Tensor,
    strength: float,
    mask: torch.Tensor | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    *,
    slip: str,
) -> torch.Tensor:
    """`edit` with one known slip, to recognise it in a learner's answer."""
    unet, scheduler, vae = pipe.unet, pipe.scheduler, pipe.vae
    B = len(prompts)
    text = pipe.text_encoder(pipe.tokenizer(prompts))
    uncond = pipe.text_encoder(pipe.tokenizer([""] * B))
    context = torch.cat([uncond, text])
    scheduler.set_timesteps(num_inference_steps)
    start = 0 if slip == "every step" else img2img_start(num_inference_steps, strength)
    timesteps = scheduler.timesteps[start:]
    scale = 1.0 if slip == "unscaled" else vae.config.scaling_factor
    posterior = vae.encode(image)
    if slip == "noise first":
        noise = torch.randn((B, *posterior.mean.shape[1:]), generator=generator)
    known = (posterior.sample(generator) * scale).repeat(B, 1, 1, 1)
    if slip != "noise first":
        noise = torch.randn(known.shape, generator=generator)
    latents = scheduler.add_noise(known, noise, timesteps[:1])
    if slip == "not noised":
        latents = known
    if mask is not None:
        mask = F.interpolate(mask, size=latents.shape[-2:])
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_uncond, noise_text = unet(model_input, t, context).chunk(2)
        noise_pred = classifier_free_guidance(noise_uncond, noise_text, guidance_scale)
        latents = scheduler.step(noise_pred, t, latents, generator=generator)
        latents = latents.prev_sample
        if mask is None:
            continue
        last = i == len(timesteps) - 1
        # the slips that noise the known latents to the timestep just run
        at_t = {"known at t", "last noised" if last else "known at t, clean last"}
        if slip in at_t:  # noised to the timestep just run
            known_now = scheduler.add_noise(known, noise, t.reshape(1))
        elif last or slip == "clean known":
            known_now = known
        else:  # noised to the timestep the latents are now at
            known_now = scheduler.add_noise(known, noise, timesteps[i + 1 : i + 2])
        latents = blend_latents(latents, known_now, mask)
    pixels = vae.decode(latents / scale)
    return (pixels / 2 + 0.5).clamp(0, 1)


EDIT_SLIPS = {
    "the picture's latents were not noised before the first step: noise them "
    "with scheduler.add_noise to the first timestep that runs": "not noised",
    "every step ran, from the noisiest timestep: img2img runs only the last "
    "ones, from img2img_start on (exercise 06.3)": "every step",
    "the picture's latents were not multiplied by the VAE's scaling factor "
    "(and so decoded without dividing by it): the UNet works on scaled "
    "latents": "unscaled",
    "outside the mask the clean latents went back after every step: noise "
    "them to the timestep the latents are now at, the next one": "clean known",
    "outside the mask the latents went back noised to the timestep just run, "
    "after the last step too: after a step the latents are at the next "
    "timestep, and after the last one they are clean": "known at t",
    "outside the mask the latents went back noised to the timestep just run: "
    "after a step the latents are at the next timestep (and after the last "
    "one, clean)": "known at t, clean last",
    "after the last step the known latents went back noised: the latents are "
    "clean then, so the known ones go back clean": "last noised",
    "the noise was drawn before the VAE's sample of the picture: draw in "
    "diffusers' order, the posterior's sample first, then the noise": "noise first",
}


def _cases(pipe: StableDiffusionPipeline) -> list[Case]:
    """img2img and inpainting runs, each with its expected pixels."""
    source = to_pixels(render(Scene("square", "blue", "large", "left"), size=64))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 40:] = 1  # repaint a band on the right, off the latents' middle
    runs = [
        (["a red circle", "a yellow triangle at the top"], None, 0.6, 5, 7.5, 0),
        (["a green square"], None, 0.5, 7, 3.0, 1),  # 3.5 steps: 3 run
        (["a red circle on the right"], mask, 1.0, 4, 7.5, 2),
        (["a small yellow circle", "a purple triangle"], mask, 0.75, 6, 5.0, 3),
    ]
    cases = []
    for prompts, where, strength, steps, scale, seed in runs:
        args = (pipe, prompts, source, strength, where, steps, scale)
        generator = torch.Generator().manual_seed(seed)
        expected = reference_edit(*args, generator)
        cases.append(Case(args, expected, {"generator": Seed(seed)}))
    return cases


def check_edit(fn: Callable, pipe: StableDiffusionPipeline) -> Verdict:
    """Exercise 06.5: img2img and inpainting, prompts and a picture -> images.

    Args:
        fn: the learner's `edit(pipe, prompts, image, strength, mask,
            num_inference_steps, guidance_scale, generator)`.
        pipe: the pipeline to run it on (the chapter's: the shipped tiny one).
    """
    pipe.progress = False
    mistakes = {
        message: with_seeds(_slipped_edit, slip=slip)
        for message, slip in EDIT_SLIPS.items()
    }
    with torch.no_grad():
        return check(
            "Exercise 06.5",
            with_seeds(fn),
            _cases(pipe),
            atol=1e-5,
            rtol=1e-5,
            hints=[
                "it is exercise 06.2's loop with a different start: the picture's "
                "latents, noised to where the strength says to begin, and only "
                "the steps from there; with a mask, one blend after every step.",
                "draw in diffusers' order: the VAE's sample of the picture first "
                "(vae.encode(image).sample(generator), times the scaling factor, "
                "repeated for the B prompts), then the noise; shrink the mask to "
                "the latents' size with F.interpolate (nearest).",
                "timesteps = scheduler.timesteps[img2img_start(steps, strength):]; "
                "latents = scheduler.add_noise(known, noise, timesteps[:1]); after "
                "step i, blend with add_noise(known, noise, timesteps[i + 1 : i + "
                "2]), or with known itself after the last step.",
            ],
            mistakes=mistakes,
            keep="pipeline:edit",
        )
