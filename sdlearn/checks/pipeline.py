"""Checks for chapter 06's exercises: guidance, img2img's start, the inpainting blend.

Every reference is sdlearn's own function in `sdlearn.pipeline`, which the test
suite holds to diffusers' pipelines image for image. The cases are chosen so
that the usual slips show: guidance scales of 0 and 1 (where the formula must
give the unconditional and the conditional prediction exactly), strengths whose
number of steps is not a whole number (diffusers rounds it down), and masks
that are not symmetric, so that swapping "keep" and "repaint" cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdlearn.checks import Case, Verdict, check, randn
from sdlearn.pipeline import blend_latents, classifier_free_guidance, img2img_start

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
        hint="start from the unconditional prediction and go guidance_scale times "
        "the step from it to the text's: noise_uncond + guidance_scale * "
        "(noise_text - noise_uncond). At scale 1 that is noise_text exactly, at "
        "scale 0 noise_uncond.",
    )


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
        return (
            f"returned {actual} for {steps} steps at strength {strength}, expected "
            f"{case.expected} (run the last {steps - case.expected} steps)"
        )
    return None


def check_img2img_start(fn: Callable) -> Verdict:
    """Exercise 06.2: the first timestep index img2img runs, from the strength."""
    runs = [(50, 0.8), (50, 1.0), (25, 0.3), (50, 0.25), (10, 0.55), (30, 0.5)]
    runs += [(7, 0.5), (1000, 0.999), (20, 0.04)]
    cases = [Case(run, img2img_start(*run)) for run in runs]
    return check(
        "Exercise 06.2",
        fn,
        cases,
        hint="the number of steps to run is int(num_inference_steps * strength), "
        "rounded down as diffusers does (and never more than num_inference_steps); "
        "the start index is num_inference_steps minus that, an int.",
        compare=_start_problem,
    )


def check_blend_latents(fn: Callable) -> Verdict:
    """Exercise 06.3: the sampler's latents inside the mask, the known ones outside."""
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
        "Exercise 06.3",
        fn,
        cases,
        hint="mask is 1 where the image is repainted: take `latents` (the "
        "sampler's) there and `known_latents` where mask is 0, "
        "(1 - mask) * known_latents + mask * latents; the (B, 1, h, w) mask "
        "broadcasts over the channels.",
    )
