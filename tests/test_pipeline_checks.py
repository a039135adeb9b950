"""Chapter 06's exercise checks: right answers pass, typical slips fail, none raise."""

from __future__ import annotations

import math

import pytest
import torch

from sdlearn.checks import pipeline as checks
from tests.helpers import assert_refused, assert_unsolved_never_raise

# --- right answers, written as a learner would ---


def guidance(noise_uncond, noise_text, guidance_scale):
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


def guidance_lerp(noise_uncond, noise_text, guidance_scale):
    # lerp extrapolates past the end for weights above 1
    return torch.lerp(noise_uncond, noise_text, guidance_scale)


def guidance_paper(noise_uncond, noise_text, guidance_scale):
    # Ho & Salimans' eq. 6 with w = s - 1: (1 + w) eps_text - w eps_uncond
    w = guidance_scale - 1
    return (1 + w) * noise_text - w * noise_uncond


def start(num_inference_steps, strength):
    steps_to_run = min(int(num_inference_steps * strength), num_inference_steps)
    return num_inference_steps - steps_to_run


def start_floor(num_inference_steps, strength):
    return num_inference_steps - math.floor(num_inference_steps * strength)


def blend(latents, known_latents, mask):
    return (1 - mask) * known_latents + mask * latents


def blend_where(latents, known_latents, mask):
    return torch.where(mask.bool(), latents, known_latents)


def blend_lerp(latents, known_latents, mask):
    return torch.lerp(known_latents, latents, mask)


def test_right_answers_pass(capsys):
    for fn in (guidance, guidance_lerp, guidance_paper):
        assert checks.check_classifier_free_guidance(fn)
    for fn in (start, start_floor):
        assert checks.check_img2img_start(fn)
    for fn in (blend, blend_where, blend_lerp):
        assert checks.check_blend_latents(fn)
    assert capsys.readouterr().out.count("✅") == 8


def test_cases_cover_the_edges():
    # guidance at 0 and 1, a strength of 1, and a strength whose steps round down
    from sdlearn.pipeline import img2img_start

    assert img2img_start(50, 1.0) == 0
    assert img2img_start(25, 0.3) == 18  # 7.5 steps -> 7
    assert img2img_start(1000, 0.999) == 1


# --- typical slips ---


def guidance_swapped(noise_uncond, noise_text, guidance_scale):
    return noise_text + guidance_scale * (noise_uncond - noise_text)


def guidance_w_for_s(noise_uncond, noise_text, guidance_scale):
    # the paper's w used as if it were s: one step too far
    return noise_text + guidance_scale * (noise_text - noise_uncond)


def guidance_s_minus_one(noise_uncond, noise_text, guidance_scale):
    return noise_uncond + (guidance_scale - 1) * (noise_text - noise_uncond)


def guidance_from_text_alone(noise_uncond, noise_text, guidance_scale):
    return guidance_scale * noise_text


def start_steps_to_run(num_inference_steps, strength):
    # returns how many steps to run, not where to start
    return int(num_inference_steps * strength)


def start_from_one_minus_strength(num_inference_steps, strength):
    # rounds the steps to skip down, so it runs one step too many
    return int(num_inference_steps * (1 - strength))


def start_rounded(num_inference_steps, strength):
    return num_inference_steps - round(num_inference_steps * strength)


def start_as_float(num_inference_steps, strength):
    return num_inference_steps - num_inference_steps * strength // 1


def start_as_tensor(num_inference_steps, strength):
    return torch.tensor(start(num_inference_steps, strength))


def blend_swapped(latents, known_latents, mask):
    return mask * known_latents + (1 - mask) * latents


def blend_known_only(latents, known_latents, mask):
    return (1 - mask) * known_latents


def blend_average(latents, known_latents, mask):
    return (latents + known_latents) / 2


@pytest.mark.parametrize(
    ("check", "wrong"),
    [
        ("check_classifier_free_guidance", guidance_swapped),
        ("check_classifier_free_guidance", guidance_w_for_s),
        ("check_classifier_free_guidance", guidance_s_minus_one),
        ("check_classifier_free_guidance", guidance_from_text_alone),
        ("check_img2img_start", start_steps_to_run),
        ("check_img2img_start", start_from_one_minus_strength),
        ("check_img2img_start", start_rounded),
        ("check_img2img_start", start_as_float),
        ("check_img2img_start", start_as_tensor),
        ("check_blend_latents", blend_swapped),
        ("check_blend_latents", blend_known_only),
        ("check_blend_latents", blend_average),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_typical_slips_fail_with_a_hint(capsys, check, wrong):
    assert_refused(getattr(checks, check), wrong, capsys)


@pytest.mark.parametrize(
    ("check", "wrong", "named"),
    [
        ("check_classifier_free_guidance", guidance_swapped, "predictions are swapped"),
        ("check_classifier_free_guidance", guidance_w_for_s, "guidance by s + 1"),
        ("check_classifier_free_guidance", guidance_s_minus_one, "guidance by s - 1"),
        ("check_img2img_start", start_steps_to_run, "the number of steps to run"),
        ("check_img2img_start", start_rounded, "rounded to the nearest"),
        ("check_blend_latents", blend_swapped, "keep and repaint are swapped"),
        ("check_blend_latents", blend_average, "the average of the two latents"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_typical_mistakes_are_named(capsys, check, wrong, named):
    assert not getattr(checks, check)(wrong)
    assert named in capsys.readouterr().out


def test_img2img_start_says_what_is_wrong(capsys):
    assert not checks.check_img2img_start(start_steps_to_run)
    assert "returned 40 for 50 steps at strength 0.8" in capsys.readouterr().out
    assert not checks.check_img2img_start(start_as_float)
    assert "expected an int" in capsys.readouterr().out


def test_unsolved_exercises_never_raise(capsys):
    assert_unsolved_never_raise(
        [
            checks.check_classifier_free_guidance,
            checks.check_img2img_start,
            checks.check_blend_latents,
        ],
        capsys,
    )


# --- the loop, and the learner's own Stable Diffusion ---


@torch.no_grad()
def generate(
    pipe,
    prompts,
    negative_prompt="",
    num_inference_steps=25,
    guidance_scale=7.5,
    generator=None,
):
    B = len(prompts)
    text = pipe.text_encoder(pipe.tokenizer(prompts))
    uncond = pipe.text_encoder(pipe.tokenizer([negative_prompt] * B))
    context = torch.cat([uncond, text])
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps)
    size = pipe.unet.config.sample_size
    shape = (B, pipe.unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond_pred, text_pred = pipe.unet(model_input, t, context).chunk(2)
        pred = uncond_pred + guidance_scale * (text_pred - uncond_pred)
        latents = scheduler.step(pred, t, latents, generator=generator).prev_sample
    pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    return (pixels / 2 + 0.5).clamp(0, 1)


def generate_unscaled(
    pipe,
    prompts,
    negative_prompt="",
    num_inference_steps=25,
    guidance_scale=7.5,
    generator=None,
):
    return checks._slipped_loop(
        pipe,
        prompts,
        negative_prompt,
        num_inference_steps,
        guidance_scale,
        generator,
        slip="unscaled",
    )


def test_the_loop_is_checked_kept_and_drawn_with(answers_home, capsys):
    from sdlearn.checks import answers
    from sdlearn.checks.learners_pipeline import LEARNERS_PARTS, use_learners_parts
    from sdlearn.pipeline_io import from_pretrained

    pipe = from_pretrained()
    assert not checks.check_generate(generate_unscaled, pipe)
    assert "without undoing the VAE's scaling factor" in capsys.readouterr().out
    assert not (answers_home / "pipeline.py").exists()  # a wrong answer: not kept
    assert checks.check_generate(generate, pipe)
    assert "def generate(" in (answers_home / "pipeline.py").read_text()
    # chapter 06's own Stable Diffusion: the kept loop draws; for the parts the
    # learner has not written yet, the package's stand in
    yours = from_pretrained()
    loop = use_learners_parts(yours)
    out = capsys.readouterr().out
    assert f"1 of {len(LEARNERS_PARTS)} parts are yours" in out
    assert answers.is_learners(loop)
    mine = loop(yours, ["a red circle"], "", 3, 7.5, torch.Generator().manual_seed(3))
    package = checks.reference_generate(
        pipe, ["a red circle"], "", 3, 7.5, torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(mine, package)


def test_a_kept_forward_runs_in_that_pipeline_only():
    from sdlearn.checks import answers
    from sdlearn.pipeline_io import from_pretrained
    from sdlearn.unet import UNet

    calls = []

    def unet_forward(self, sample, timestep, encoder_hidden_states):
        calls.append(tuple(sample.shape))  # the learner's code runs, not the class's
        return UNet.forward(self, sample, timestep, encoder_hidden_states)

    pipe = from_pretrained()
    answers.install_forward(pipe.unet, UNet, unet_forward)
    pipe.progress = False
    pipe("a red circle", num_inference_steps=2)
    assert len(calls) == 2
    other = from_pretrained()
    other.progress = False
    other("a red circle", num_inference_steps=2)
    assert len(calls) == 2  # the package's UNet class is untouched


def attention_block_forward(self, x):
    from einops import rearrange

    from sdlearn.attention import Attention

    H, W = x.shape[-2:]
    h = rearrange(self.group_norm(x), "B C H W -> B (H W) C")
    h = Attention.forward(self, h)
    return x + rearrange(h, "B (H W) C -> B C H W", H=H, W=W)


def test_with_every_part_kept_every_part_is_the_learners(answers_home, capsys):
    """The package's own code kept as the answers: every part of chapters 01-06
    is then the learner's, installed where it belongs, and draws the package's
    pixels."""
    from sdlearn.checks import answers
    from sdlearn.checks.learners_pipeline import (
        _PACKAGE_FORWARDS,
        _SCHEDULER_PARTS,
        _TOKENIZER_PARTS,
        _VAE_METHODS,
        LEARNERS_PARTS,
        use_learners_parts,
    )
    from sdlearn.pipeline_io import from_pretrained

    package_code = {
        **_TOKENIZER_PARTS,
        **_SCHEDULER_PARTS,
        **_VAE_METHODS,
        **{part: cls.forward for part, (cls, _) in _PACKAGE_FORWARDS.items()},
        "pipeline:generate": generate,
    }
    assert set(package_code) == set(LEARNERS_PARTS)
    # the package's calls super(), which only works inside its class
    package_code["vae:AttentionBlock.forward"] = attention_block_forward
    for part, code in package_code.items():
        answers.keep(part, code)
    pipe = from_pretrained()
    yours = from_pretrained()
    loop = use_learners_parts(yours)
    out = capsys.readouterr().out
    assert f"{len(LEARNERS_PARTS)} of {len(LEARNERS_PARTS)} parts are yours" in out
    assert "the package" not in out
    # installed in this pipeline's own objects
    assert yours.tokenizer.merge_word is not pipe.tokenizer.merge_word
    assert "step" in vars(yours.scheduler) and "forward" in vars(yours.unet)
    prompts = ["a red circle", "a small blue square on the left"]
    mine = loop(yours, prompts, "", 3, 7.5, torch.Generator().manual_seed(4))
    package = checks.reference_generate(
        pipe, prompts, "", 3, 7.5, torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(mine, package, atol=1e-4, rtol=0)


@pytest.mark.parametrize("message, slip", list(checks.GENERATE_SLIPS.items()))
def test_every_slip_of_the_loop_is_named(capsys, message, slip):
    from sdlearn.pipeline_io import from_pretrained

    pipe = from_pretrained()

    def generate(pipe, prompts, negative_prompt="", num_inference_steps=25,
                 guidance_scale=7.5, generator=None):  # fmt: skip
        return checks._slipped_loop(
            pipe,
            prompts,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            generator,
            slip=slip,
        )

    assert not checks.check_generate(generate, pipe)
    assert message in capsys.readouterr().out
