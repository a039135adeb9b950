"""DDPM's training loss and sampling loop on pixels (sdlearn.pixel_ddpm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlearn.pixel_ddpm import ddpm_loss, ddpm_sample
from sdlearn.schedulers.common import add_noise
from sdlearn.schedulers.ddpm import DDPMScheduler
from tests.helpers import needs_diffusers


def model(x_t, timesteps):
    return 0.5 * torch.tanh(x_t) + 1e-3 * timesteps.float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_the_loss_is_the_mse_against_its_target(prediction_type):
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    x0 = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = ddpm_loss(
        model, x0, scheduler.alphas_cumprod, prediction_type,
        torch.Generator().manual_seed(1),
    )  # fmt: skip
    # the same draws, by hand: the timesteps first, then the noise
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = add_noise(scheduler.alphas_cumprod, x0, noise, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {
        "epsilon": noise,
        "sample": x0,
        "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0,
    }[prediction_type]
    torch.testing.assert_close(loss, F.mse_loss(model(x_t, t), target))
    assert loss.ndim == 0


def test_the_loss_refuses_an_unknown_target():
    with pytest.raises(ValueError, match="prediction_type"):
        ddpm_loss(model, torch.zeros(1, 3, 4, 4), torch.ones(10), "noise")


def test_the_loss_and_the_loop_refuse_inputs_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"x0 of shape \(B, C, H, W\), got \(3, 4"):
        ddpm_loss(model, torch.zeros(3, 4, 4), torch.ones(10), "epsilon")
    with pytest.raises(ValueError, match="alphas_cumprod of shape"):
        ddpm_loss(model, torch.zeros(1, 3, 4, 4), torch.ones(10, 1), "epsilon")
    with pytest.raises(ValueError, match=r"noise of shape \(B, C, H, W\), got \(4"):
        ddpm_sample(model, DDPMScheduler(), torch.zeros(4, 4), 2)


def test_the_loop_calls_back_after_every_step():
    scheduler = DDPMScheduler(timestep_spacing="trailing", steps_offset=0)
    calls = []
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    samples = ddpm_sample(
        model, scheduler, noise, 5, torch.Generator().manual_seed(1),
        callback=lambda i, t, out: calls.append((i, int(t), out.prev_sample)),
    )  # fmt: skip
    assert [c[:2] for c in calls] == [(0, 999), (1, 799), (2, 599), (3, 399), (4, 199)]
    torch.testing.assert_close(samples, calls[-1][2])
    assert samples.shape == noise.shape


@needs_diffusers
def test_the_loop_samples_as_diffusers_scheduler_does():
    from diffusers import DDPMScheduler as DiffusersDDPMScheduler

    settings = {
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "clip_sample": True,
        "timestep_spacing": "trailing",
        "steps_offset": 0,
    }
    runs = []
    for scheduler in (DDPMScheduler(**settings), DiffusersDDPMScheduler(**settings)):
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(1)
        runs.append(ddpm_sample(model, scheduler, noise, 20, generator))
    torch.testing.assert_close(runs[0], runs[1])
