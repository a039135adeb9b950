"""Chapter 06's exercise 06.5, img2img and inpainting in one loop: a right answer
passes and is kept, the typical slips are named, an unsolved one never raises."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import editing
from sdlearn.pipeline import classifier_free_guidance, img2img_start
from sdlearn.pipeline_io import from_pretrained
from tests.helpers import assert_refused, assert_unsolved_never_raise


@pytest.fixture(scope="module")
def pipe():
    pipe = from_pretrained()
    pipe.progress = False
    return pipe


@torch.no_grad()
def edit(pipe, prompts, image, strength, mask=None, steps=25, scale=7.5, **kw):
    # written as a learner would: the mask's blend with torch.where
    scheduler, vae, generator = pipe.scheduler, pipe.vae, kw["generator"]
    B = len(prompts)
    uncond = pipe.text_encoder(pipe.tokenizer([""] * B))
    context = torch.cat([uncond, pipe.text_encoder(pipe.tokenizer(prompts))])
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[img2img_start(steps, strength) :]
    known = vae.encode(image).sample(generator) * vae.config.scaling_factor
    known = known.expand(B, -1, -1, -1)
    noise = torch.randn(known.shape, generator=generator)
    latents = scheduler.add_noise(known, noise, timesteps[:1])
    if mask is not None:
        mask = F.interpolate(mask, size=latents.shape[-2:], mode="nearest")
    for i, t in enumerate(timesteps):
        uncond, text = pipe.unet(torch.cat([latents] * 2), t, context).chunk(2)
        guided = classifier_free_guidance(uncond, text, scale)
        latents = scheduler.step(guided, t, latents, generator=generator).prev_sample
        if mask is not None:
            later = timesteps[i + 1 : i + 2]
            now = scheduler.add_noise(known, noise, later) if len(later) else known
            latents = torch.where(mask.bool(), latents, now)
    return (pipe.vae.decode(latents / vae.config.scaling_factor) / 2 + 0.5).clamp(0, 1)


def slipped(slip):
    def edit(*args, generator=None):
        return editing._slipped_edit(*args, generator=generator, slip=slip)

    return edit


def test_a_right_answer_passes_and_is_kept(pipe, answers_home, capsys):
    assert editing.check_edit(edit, pipe)
    assert "✅ Exercise 06.5" in capsys.readouterr().out
    assert "def edit(" in (answers_home / "pipeline.py").read_text()


@pytest.mark.parametrize("message, slip", list(editing.EDIT_SLIPS.items()))
def test_typical_slips_are_named(pipe, capsys, message, slip):
    out = assert_refused(lambda fn: editing.check_edit(fn, pipe), slipped(slip), capsys)
    assert message in out


def test_the_slips_start_from_a_right_answer():
    # with no slip, the loop the slips are made from draws the package's pixels
    pipe = from_pretrained()
    pipe.progress = False
    right = slipped("none")
    assert editing.check_edit(right, pipe)


def test_unsolved_never_raises(pipe, capsys):
    assert_unsolved_never_raise([lambda fn: editing.check_edit(fn, pipe)], capsys)
