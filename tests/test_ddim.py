"""Tests for sdlearn/schedulers/ddim.py: DDIM's sampling loop equals diffusers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlearn.pipeline import StableDiffusionPipeline
from sdlearn.schedulers import DDIMScheduler, scheduler_from_config
from tests.helpers import (
    PROMPTS,
    SIZE,
    needs_diffusers,
    random_pipeline,
    sample_loop,
)

# (settings, steps, eta): spacings, step counts, eta, prediction types, the last
# step's alpha_bar and clipping
CASES = {
    "sd15-50": ({}, 50, 0.0),
    "sd15-eta1": ({}, 20, 1.0),
    "trailing-eta-half": ({"timestep_spacing": "trailing"}, 10, 0.5),
    "linspace-v": (
        {"timestep_spacing": "linspace", "prediction_type": "v_prediction"},
        7,
        0.3,
    ),
    "sample-alpha-one-clip": (
        {
            "prediction_type": "sample",
            "set_alpha_to_one": True,
            "clip_sample": True,
            "steps_offset": 0,
            "beta_schedule": "linear",
            "beta_start": 1e-4,
            "beta_end": 0.02,
        },
        25,
        1.0,
    ),
    "cosine": ({"beta_schedule": "squaredcos_cap_v2"}, 15, 0.0),
}


@needs_diffusers
@pytest.mark.parametrize("name", list(CASES))
def test_sampling_loop_matches_diffusers(name):
    settings, steps, eta = CASES[name]
    ours = DDIMScheduler(**settings)
    theirs = ours.to_diffusers()
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)  # before set_timesteps
    for actual, expected in zip(
        sample_loop(ours, steps, eta=eta),
        sample_loop(theirs, steps, eta=eta),
        strict=True,
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)


@needs_diffusers
def test_from_diffusers_and_config_round_trip():
    from diffusers import DDIMScheduler as DiffusersDDIM

    theirs = DiffusersDDIM(beta_schedule="scaled_linear", timestep_spacing="trailing")
    ours = DDIMScheduler.from_diffusers(theirs)
    assert ours.config.timestep_spacing == "trailing"
    assert ours.config.set_alpha_to_one  # diffusers' default, kept
    again = scheduler_from_config({"_class_name": "DDIMScheduler", **theirs.config})
    assert isinstance(again, DDIMScheduler) and again.config == ours.config


def test_eta_zero_is_deterministic_and_eta_adds_noise():
    a = sample_loop(DDIMScheduler(), 10, eta=0.0)
    b = sample_loop(DDIMScheduler(), 10, eta=0.0)
    torch.testing.assert_close(a[-2], b[-2], rtol=0, atol=0)
    noisy = sample_loop(DDIMScheduler(), 10, eta=1.0)
    assert (noisy[-2] - a[-2]).abs().max() > 1e-2


def test_bad_input_raises_value_error():
    scheduler = DDIMScheduler()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="eta >= 0"):
        scheduler.step(x, 901, x, eta=-1)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 2, 2\)"):
        scheduler.step(torch.zeros(1, 3, 2, 2), 901, x)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        DDIMScheduler(prediction_type="noise")


@needs_diffusers
def test_pipeline_with_ddim_matches_diffusers(tmp_path):
    from diffusers import DDIMScheduler as DiffusersDDIM
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    ours = random_pipeline()
    ours.scheduler = DDIMScheduler()
    ours.save_pretrained(tmp_path)
    theirs = DiffusersPipeline.from_pretrained(tmp_path)
    assert isinstance(theirs.scheduler, DiffusersDDIM)
    theirs.set_progress_bar_config(disable=True)
    assert isinstance(
        StableDiffusionPipeline.from_pretrained(tmp_path).scheduler, DDIMScheduler
    )
    for eta in (0.0, 0.7):  # eta > 0 draws the step noise from the generator too
        kwargs = dict(
            num_inference_steps=8, guidance_scale=7.5, output_type="np", eta=eta
        )
        mine = ours(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
        ref = theirs(
            PROMPTS,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images
        assert np.abs(mine.images - ref).max() <= 1e-4, eta


def test_eta_needs_a_scheduler_that_takes_it():
    from sdlearn.schedulers import EulerDiscreteScheduler

    pipe = random_pipeline()
    pipe.scheduler = EulerDiscreteScheduler()
    with pytest.raises(
        ValueError, match="eta=0.5 needs a scheduler whose step takes eta"
    ):
        pipe("a red circle", num_inference_steps=2, eta=0.5)
