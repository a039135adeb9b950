"""sdlearn.schedulers.ddpm against diffusers' DDPMScheduler: the same numbers.

Reference tests read tensors that tools/reference/ddpm.py made with diffusers and
run without it; the live tests (needs_diffusers) compare with diffusers directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from sdlearn.schedulers import DDPMScheduler
from tests.helpers import load_reference, needs_diffusers
from tools.reference.ddpm import (
    LOOPS,
    SCHEDULES,
    SD15,
    SPACINGS,
    add_noise_inputs,
    diffusers_scheduler,
    loop_inputs,
    sample_loop,
)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_reference("ddpm")


def assert_loops_close(actual: dict, expected: dict) -> None:
    # torch's float32 defaults (atol 1e-5, rtol 1.3e-6); today the loops agree exactly
    for key in ("timesteps", "pred_original_samples", "prev_samples"):
        torch.testing.assert_close(
            actual[key], expected[key], msg=lambda m, k=key: f"{k}: {m}"
        )


# --- against the stored reference tensors ---


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_alphas_cumprod_matches_reference(reference, name):
    scheduler = DDPMScheduler(**SCHEDULES[name])
    torch.testing.assert_close(
        scheduler.alphas_cumprod, reference[f"alphas_cumprod/{name}"], atol=1e-7, rtol=0
    )


@pytest.mark.parametrize(("spacing", "offset", "steps"), SPACINGS)
def test_timesteps_match_reference(reference, spacing, offset, steps):
    scheduler = DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(
        scheduler.timesteps, reference[f"timesteps/{spacing}/{offset}/{steps}"]
    )


def test_add_noise_matches_reference(reference):
    scheduler = DDPMScheduler(**SD15)
    noisy = scheduler.add_noise(
        reference["add_noise/original"],
        reference["add_noise/noise"],
        reference["add_noise/timesteps"],
    )
    torch.testing.assert_close(noisy, reference["add_noise/noisy"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(LOOPS))
def test_sampling_loop_matches_reference(reference, name):
    loop = LOOPS[name]
    inputs = {
        k: reference[f"loops/{name}/{k}"] for k in ("initial", "direction", "seed")
    }
    actual = sample_loop(DDPMScheduler(**loop["settings"]), loop, inputs)
    expected = {k: reference[f"loops/{name}/{k}"] for k in actual}
    assert_loops_close(actual, expected)


# --- live, against diffusers ---


@needs_diffusers
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_alphas_cumprod_matches_diffusers(name):
    expected = diffusers_scheduler(SCHEDULES[name]).alphas_cumprod
    actual = DDPMScheduler(**SCHEDULES[name]).alphas_cumprod
    torch.testing.assert_close(actual, expected, atol=1e-7, rtol=0)


@needs_diffusers
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers_for_every_step_count(spacing, offset):
    settings = {**SD15, "timestep_spacing": spacing, "steps_offset": offset}
    expected, actual = diffusers_scheduler(settings), DDPMScheduler(**settings)
    for steps in range(1, 1001):
        expected.set_timesteps(steps)
        if expected.timesteps[0] >= 1000:
            # diffusers returns a timestep past the end, which fails only in step
            with pytest.raises(ValueError, match="past the last training timestep"):
                actual.set_timesteps(steps)
            continue
        actual.set_timesteps(steps)
        torch.testing.assert_close(actual.timesteps, expected.timesteps)


@needs_diffusers
@pytest.mark.parametrize("timesteps", [[0, 1, 500, 999], [700]], ids=["each", "one"])
def test_add_noise_matches_diffusers(timesteps):
    inputs = add_noise_inputs()
    timesteps = torch.tensor(timesteps)
    expected = diffusers_scheduler(SD15).add_noise(
        inputs["original"], inputs["noise"], timesteps
    )
    actual = DDPMScheduler(**SD15).add_noise(
        inputs["original"], inputs["noise"], timesteps
    )
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


@needs_diffusers
@pytest.mark.parametrize("name", list(LOOPS))
def test_sampling_loop_matches_diffusers(name):
    loop = LOOPS[name]
    inputs = loop_inputs(list(LOOPS).index(name))
    expected = sample_loop(diffusers_scheduler(loop["settings"]), loop, inputs)
    actual = sample_loop(DDPMScheduler(**loop["settings"]), loop, inputs)
    assert_loops_close(actual, expected)


@needs_diffusers
@pytest.mark.parametrize("name", list(LOOPS))
def test_config_round_trips_through_diffusers(name):
    scheduler = DDPMScheduler(**LOOPS[name]["settings"])
    theirs = scheduler.to_diffusers()
    for key, value in asdict(scheduler.config).items():
        expected = theirs.config[key]
        if key == "trained_betas" and expected is not None:
            expected = tuple(expected)
        assert value == expected, key
    assert DDPMScheduler.from_diffusers(theirs).config == scheduler.config


@needs_diffusers
def test_from_diffusers_keeps_diffusers_defaults():
    from diffusers import DDPMScheduler as DiffusersDDPMScheduler

    theirs = DiffusersDDPMScheduler()
    ours = DDPMScheduler.from_diffusers(theirs)
    assert ours.config.beta_schedule == "linear"
    assert ours.config.clip_sample is True
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod)


@needs_diffusers
def test_from_diffusers_rejects_what_it_leaves_out():
    from diffusers import DDPMScheduler as DiffusersDDPMScheduler

    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        DDPMScheduler.from_diffusers(DiffusersDDPMScheduler(thresholding=True))


# --- behaviour and errors ---


def test_timesteps_descend_as_int64():
    scheduler = DDPMScheduler()
    assert scheduler.timesteps.tolist() == list(range(999, -1, -1))
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.dtype == torch.int64
    assert scheduler.timesteps.tolist() == [751, 501, 251, 1]


def _step(scheduler: DDPMScheduler, channels: int = 4, timestep: int = 999) -> None:
    sample = torch.zeros(1, 4, 2, 2)
    scheduler.step(torch.zeros(1, channels, 2, 2), timestep, sample)


def _stepped_after_set(timestep: int) -> None:
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    _step(scheduler, timestep=timestep)


def _add_noise(timesteps: torch.Tensor) -> None:
    x = torch.zeros(2, 4, 2, 2)
    DDPMScheduler().add_noise(x, x, timesteps)


BAD_INPUTS: dict[str, tuple[Callable[[], object], str]] = {
    "beta_schedule": (
        lambda: DDPMScheduler(beta_schedule="cosine"),
        r"unknown beta_schedule 'cosine'; expected one of \('linear', ",
    ),
    "variance_type": (
        lambda: DDPMScheduler(variance_type="fixed_large_log"),
        r"unknown variance_type 'fixed_large_log'; expected one of \('fixed_small'",
    ),
    "prediction_type": (
        lambda: DDPMScheduler(prediction_type="noise"),
        r"unknown prediction_type 'noise'; expected one of \('epsilon', ",
    ),
    "timestep_spacing": (
        lambda: DDPMScheduler(timestep_spacing="even"),
        r"unknown timestep_spacing 'even'; expected one of \('leading', ",
    ),
    "trained_betas": (
        lambda: DDPMScheduler(trained_betas=(0.1, 0.2)),
        r"one trained beta per training timestep \(1000\), got 2",
    ),
    "no_steps": (
        lambda: DDPMScheduler().set_timesteps(0),
        r"between 1 and num_train_timesteps=1000, got 0",
    ),
    "too_many_steps": (
        lambda: DDPMScheduler().set_timesteps(1001),
        r"between 1 and num_train_timesteps=1000, got 1001",
    ),
    "leading_past_end": (
        lambda: DDPMScheduler(steps_offset=1).set_timesteps(1000),
        r"first of 1000 steps at timestep 1000, past the last training timestep 999",
    ),
    "add_noise_too_late": (
        lambda: _add_noise(torch.tensor([0, 1000])),
        r"timesteps must be in \[0, 999\], got \[1000\]",
    ),
    "add_noise_negative": (
        lambda: _add_noise(torch.tensor([-1, 5])),
        r"timesteps must be in \[0, 999\], got \[-1\]",
    ),
    "add_noise_float": (
        lambda: _add_noise(torch.tensor([0.5, 5.0])),
        r"timesteps must be integers, got dtype torch.float32",
    ),
    "add_noise_count": (
        lambda: _add_noise(torch.tensor([1, 2, 3])),
        r"expected 1 or B=2 timesteps, got 3",
    ),
    "step_too_late": (
        lambda: _step(DDPMScheduler(), timestep=1000),
        r"timesteps must be in \[0, 999\], got \[1000\]",
    ),
    "step_not_set": (
        lambda: _stepped_after_set(500),
        r"timestep 500 is not one of the 10 timesteps set_timesteps chose",
    ),
    "step_shape": (
        lambda: _step(DDPMScheduler(), channels=3),
        r"model_output of the sample.s shape \(1, 4, 2, 2\), got \(1, 3, 2, 2\)",
    ),
    "step_learned_channels": (
        lambda: _step(DDPMScheduler(variance_type="learned_range")),
        r"'learned_range' expects model_output with 2\*C=8 channels",
    ),
    "from_diffusers_missing": (
        lambda: DDPMScheduler.from_diffusers(SimpleNamespace(config={})),
        r"scheduler.config lacks \['num_train_timesteps', ",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_helpful_errors(case):
    make, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        make()
