"""Checks for chapter 06's exercises.

Exercises: guidance (06.1), the sampling loop (06.2), img2img's start (06.3)
and the inpainting blend (06.4); img2img and inpainting as one loop (06.5) are
checked in `sdlearn.checks.editing`; the learner's own Stable Diffusion is put
together in `sdlearn.checks.learners_pipeline`. Every reference is sdlearn's own code in
`sdlearn.pipeline`, which the test suite holds to diffusers' pipelines image for
image. The cases are chosen so that the usual slips show: guidance scales of 0
and 1 (where the formula must give the unconditional and the conditional
prediction exactly), strengths whose number of steps is not a whole number
(diffusers rounds it down), masks that are not symmetric, so that swapping
"keep" and "repaint" cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdlearn.checks import Case, Verdict, check, randn
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.pipeline import (
    StableDiffusionPipeline,
    blend_latents,
    classifier_free_guidance,
    img2img_start,
)

SHAPE = (2, 4, 8, 8)  # (B, C, h, w): the tiny model's latents


def check_classifier_free_guidance(fn: Callable) -> Verdict:
    """Exercise 06.1: eps = eps_uncond + s * (eps_text - eps_uncond)."""
    cases = []
    for seed, scale in enumerate((7.5, 1.0, 0.0, 3.0, 15.0)):
        noise_uncond = randn(*SHAPE, seed=seed)
        noise_text = randn(*SHAPE, seed=seed + 10)
        expected = classifier_free_guidance(noise_uncond, noise_text, scale)
        cases.append(Case((noise_uncond, noise_text, scale), expected))
    return check(
        "Exercise 06.1",
        fn,
        cases,
        hints=[
            "start from the unconditional prediction and move away from it, in "
            "the direction of the text's prediction, guidance_scale times as far "
            "as the text moves it.",
            "at guidance_scale 1 the answer is noise_text exactly, at 0 it is "
            "noise_uncond: a straight line through the two predictions.",
            "noise_uncond + s * (the difference from noise_uncond to noise_text)",
        ],
        mistakes={
            "this is guidance by s + 1: starting from the text's prediction, "
            "noise_text + s * (noise_text - noise_uncond), takes a weight of "
            "s - 1 (Imagen's w); start from noise_uncond with s": lambda u, c, s: (
                c + s * (c - u)
            ),
            "the two predictions are swapped: this starts from the text's "
            "prediction and moves towards the unconditional one": lambda u, c, s: (
                c + s * (u - c)
            ),
            "this is guidance by s - 1 (Imagen's w in place of s): at s = 1 it "
            "gives the unconditional prediction, not the text's": lambda u, c, s: (
                u + (s - 1) * (c - u)
            ),
        },
        keep="pipeline:classifier_free_guidance",
    )


# --- Exercise 06.2: the sampling loop ----------------------------------------------


def reference_generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    negative_prompt: str = "",
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The package's pipeline called as the learner's `generate` is: images
    (B, 3, H, W) in [0, 1]."""
    return pipe(
        prompts,
        negative_prompt=[negative_prompt] * len(prompts),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="pt",
    ).images


@torch.no_grad()
def _slipped_loop(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    negative_prompt: str = "",
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    *,
    slip: str,
) -> torch.Tensor:
    """The loop with one known slip, to recognise it in a learner's answer."""
    B = len(prompts)
    text = pipe.text_encoder(pipe.tokenizer(prompts))
    uncond = pipe.text_encoder(pipe.tokenizer([negative_prompt] * B))
    context = torch.cat([uncond, text])
    pipe.scheduler.set_timesteps(num_inference_steps)
    h = w = pipe.unet.config.sample_size
    shape = (B, pipe.unet.config.in_channels, h, w)
    latents = torch.randn(shape, generator=generator) * pipe.scheduler.init_noise_sigma
    for t in pipe.scheduler.timesteps:
        model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_uncond, noise_text = pipe.unet(model_input, t, context).chunk(2)
        if slip == "swapped":
            noise_uncond, noise_text = noise_text, noise_uncond
        noise_pred = classifier_free_guidance(noise_uncond, noise_text, guidance_scale)
        if slip == "no guidance":
            noise_pred = noise_text
        latents = pipe.scheduler.step(
            noise_pred, t, latents, generator=generator
        ).prev_sample
    scale = 1.0 if slip == "unscaled" else pipe.vae.config.scaling_factor
    pixels = pipe.vae.decode(latents / scale)
    return pixels / 2 + 0.5 if slip == "no clamp" else (pixels / 2 + 0.5).clamp(0, 1)


GENERATE_SLIPS = {
    "the pictures come from latents decoded without undoing the VAE's scaling "
    "factor: divide the latents by vae.config.scaling_factor first": "unscaled",
    "the unconditional and the text halves of the UNet's output are swapped: "
    "the batch holds the unconditional half first": "swapped",
    "this loop uses the text's prediction alone: guidance combines it with the "
    "unconditional one (exercise 06.1)": "no guidance",
    "some pixels are outside [0, 1]: the decoder's output only roughly stays in "
    "[-1, 1], so clamp after mapping it to [0, 1]": "no clamp",
}


def check_generate(fn: Callable, pipe: StableDiffusionPipeline) -> Verdict:
    """Exercise 06.2: Stable Diffusion's sampling loop, prompts -> images in [0, 1].

    Args:
        fn: the learner's `generate(pipe, prompts, negative_prompt,
            num_inference_steps, guidance_scale, generator)`.
        pipe: the pipeline to run it on (the chapter's: the shipped tiny one).
    """
    pipe.progress = False
    runs = [
        (["a large red circle at the top", "a small blue square"], "", 4, 7.5, 0),
        (["a green triangle on the left"], "", 3, 1.0, 1),
        (["a yellow square at the bottom"], "yellow", 3, 3.0, 2),
    ]
    cases = []
    for prompts, negative, steps, scale, seed in runs:
        args = (pipe, prompts, negative, steps, scale)
        expected = reference_generate(*args, torch.Generator().manual_seed(seed))
        cases.append(Case(args, expected, {"generator": Seed(seed)}))

    mistakes = {
        message: with_seeds(_slipped_loop, slip=slip)
        for message, slip in GENERATE_SLIPS.items()
    }
    with torch.no_grad():
        return check(
            "Exercise 06.2",
            with_seeds(fn),
            cases,
            atol=1e-5,
            rtol=1e-5,  # the pipeline skips the unconditional half at scale 1
            hints=[
                "follow the six steps above in order; the UNet sees the two "
                "halves (unconditional first) in one batch of 2B.",
                "draw the starting latents with torch.randn(shape, "
                "generator=generator) before anything else that draws; hand the "
                "generator to every scheduler.step; decode latents / "
                "scaling_factor and map [-1, 1] to [0, 1] with a clamp.",
                "for t in scheduler.timesteps: u, c = unet(cat([x, x]), t, "
                "context).chunk(2); x = scheduler.step(cfg(u, c, s), t, x, "
                "generator=generator).prev_sample",
            ],
            mistakes=mistakes,
            keep="pipeline:generate",
        )


class Seed:
    """A case's seed, shown in a few words when a case fails."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __repr__(self) -> str:
        return f"a generator seeded {self.seed}"


def with_seeds(call: Callable, **options) -> Callable:
    """`call` that takes a case's `Seed` as its generator: every case gets a
    generator of its own, fresh for each attempt (the mistakes' too)."""

    def run(*args, generator: Seed):
        seed = torch.Generator().manual_seed(generator.seed)
        return call(*args, generator=seed, **options)

    run.__name__ = getattr(call, "__name__", "generate")
    run.__wrapped__ = call  # what a passing check keeps: the learner's own
    return run


# --- Exercises 06.3 and 06.4: img2img's start, the inpainting blend ---------------


def _start_problem(actual: object, case: Case) -> str | None:
    """An index into `scheduler.timesteps` must be a plain int, and the right one."""
    steps, strength = case.args
    if isinstance(actual, bool) or not isinstance(actual, int):
        kind = type(actual).__name__
        return (
            f"returned {kind} {actual!r}; expected an int, the index of the first "
            f"timestep to run"
        )
    if actual != case.expected:
        if actual == steps - case.expected:
            return (
                f"returned {actual} for {steps} steps at strength {strength}: that "
                "is the number of steps to run; the answer is where they start"
            )
        if actual == steps - round(steps * strength) != case.expected:
            return (
                f"returned {actual} for {steps} steps at strength {strength}: the "
                "steps to run were rounded to the nearest; diffusers rounds down"
            )
        return (
            f"returned {actual} for {steps} steps at strength {strength}, expected "
            f"{case.expected} (run the last {steps - case.expected} steps)"
        )
    return None


def check_img2img_start(fn: Callable) -> Verdict:
    """Exercise 06.3: the first timestep index img2img runs, from the strength."""
    runs = [(50, 0.8), (50, 1.0), (25, 0.3), (50, 0.25), (10, 0.55), (30, 0.5)]
    runs += [(7, 0.5), (1000, 0.999), (20, 0.04), (10, 0.36)]
    cases = [Case(run, img2img_start(*run)) for run in runs]
    return check(
        "Exercise 06.3",
        fn,
        cases,
        hints=[
            "strength is the fraction of the steps that run: the last ones, from "
            "the noise level where the image is noised to.",
            "count the steps to run first, rounded down as diffusers does; the "
            "answer is the index where they start in scheduler.timesteps.",
            "num_inference_steps - int(num_inference_steps * strength), an int",
        ],
        compare=_start_problem,
        keep="pipeline:img2img_start",
    )


def check_blend_latents(fn: Callable) -> Verdict:
    """Exercise 06.4: the sampler's latents inside the mask, the known ones outside."""
    cases = []
    B, C, h, w = SHAPE
    masks = torch.zeros(3, B, 1, h, w)
    masks[0, :, :, :, w // 2 :] = 1  # repaint the right half
    masks[1, 0, :, 2:5, 1:4] = 1  # a box in the first image, nothing in the second
    masks[1, 1] = 1  # and the whole second image
    masks[2] = (randn(B, 1, h, w, seed=3) > 0.5).float()  # scattered pixels
    for seed, mask in enumerate(masks):
        latents = randn(*SHAPE, seed=seed)
        known = randn(*SHAPE, seed=seed + 10)
        cases.append(Case((latents, known, mask), blend_latents(latents, known, mask)))
    return check(
        "Exercise 06.4",
        fn,
        cases,
        hints=[
            "the mask says, pixel by pixel, which of the two latents to keep.",
            "mask is 1 where the picture is repainted: there the sampler's latents "
            "win; where it is 0 the known image's do. The (B, 1, h, w) mask "
            "broadcasts over the channels.",
            "mask * latents + (1 - mask) * known_latents",
        ],
        mistakes={
            "keep and repaint are swapped: mask is 1 where the sampler's latents "
            "win": lambda latents, known, mask: mask * known + (1 - mask) * latents,
            "this is the average of the two latents, not a choice between them": (
                lambda latents, known, mask: (latents + known) / 2
            ),
        },
        keep="pipeline:blend_latents",
    )
