"""Chapter 05's checks of the training loss and the sampling loop, and the
scheduler that runs the learner's parts: right answers pass and are kept, each
named mistake is named, an untouched exercise gets no hint, and a wrong answer
is not kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlearn import pixel_ddpm
from sdlearn.checks import answers
from sdlearn.checks import ddpm as ddpm_checks
from sdlearn.checks import pixel_ddpm as checks
from sdlearn.checks import schedule as schedule_checks
from sdlearn.schedulers import common
from sdlearn.schedulers.ddpm import DDPMScheduler
from tests.check_contract import (
    assert_mistake_named,
    assert_passes_and_is_kept,
    assert_untouched_gets_no_hint,
    assert_wrong_is_not_kept,
    named_mistakes,
)
from tests.helpers import assert_refused

# --- right answers, written as a learner would ---


def ddpm_loss(model, x0, alphas_cumprod, prediction_type, generator=None):
    t = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = add_noise(alphas_cumprod, x0, noise, t)  # noqa: F821 (the module's)
    a = alphas_cumprod[t][:, None, None, None]
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = x0
    else:
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    return ((model(x_t, t) - target) ** 2).mean()


def ddpm_sample(model, scheduler, noise, num_inference_steps, generator=None,
                callback=None):  # fmt: skip
    scheduler.set_timesteps(num_inference_steps)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(model(x, t.expand(len(x))), t, x, generator=generator)
        if callback:
            callback(i, t, out)
        x = out.prev_sample
    return x


# the loss refers to add_noise as a learner's notebook cell does
add_noise = common.add_noise


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (checks.check_ddpm_loss, ddpm_loss, pixel_ddpm.ddpm_loss, checks.LOSS_PART),
    (checks.check_ddpm_sample, ddpm_sample, pixel_ddpm.ddpm_sample, checks.SAMPLE_PART),
]
IDS = ["loss", "sample"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    # the kept copies run on their own (add_noise: the package module's)
    assert_passes_and_is_kept(check, right, package, part, capsys)


# the mistakes as a learner's loss and loop, not wrapped for the check's harness
def _unwrapped(wrong):
    return wrong.__wrapped__


MISTAKES = [
    (checks.check_ddpm_loss, "Exercise 05.5", checks.LOSS_MISTAKES, _unwrapped),
    (checks.check_ddpm_sample, "Exercise 05.9", checks.SAMPLE_MISTAKES, _unwrapped),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)
    assert answers.kept("pixel_ddpm") == {}


def test_a_loop_that_forgets_the_callback_is_told(answers_home, capsys):
    def no_callback(model, scheduler, noise, steps, generator=None, callback=None):
        return pixel_ddpm.ddpm_sample(model, scheduler, noise, steps, generator)

    out = assert_refused(checks.check_ddpm_sample, no_callback, capsys)
    assert "callback(i, t, out) after every step" in out


def test_a_loop_that_gives_the_model_one_timestep_is_told(answers_home, capsys):
    def one_timestep(model, scheduler, noise, steps, generator=None, callback=None):
        scheduler.set_timesteps(steps)
        x = noise
        for i, t in enumerate(scheduler.timesteps):
            out = scheduler.step(model(x, t), t, x, generator=generator)
            callback(i, t, out)
            x = out.prev_sample
        return x

    out = assert_refused(checks.check_ddpm_sample, one_timestep, capsys)
    assert "one timestep per image" in out


def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(capsys):
    def ddpm_loss_again(model, x0, alphas_cumprod, prediction_type, generator=None):
        return F.mse_loss(model(x0, torch.zeros(len(x0))), x0)  # forgot the noise

    check, right, package, part = EXERCISES[0]
    assert_wrong_is_not_kept(check, right, ddpm_loss_again, package, part, capsys)


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES], ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys):
    assert_untouched_gets_no_hint(check, capsys)
    assert answers.kept("pixel_ddpm") == {}


# --- the scheduler that runs the learner's parts ---


def _loop(scheduler):
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return pixel_ddpm.ddpm_sample(
        checks.stand_in_model, scheduler, noise, 7, torch.Generator().manual_seed(1)
    )


def test_installed_parts_run_and_sample_as_the_package(answers_home):
    calls = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    parts = {
        "schedule:make_betas": counted("betas", common.make_betas),
        "schedule:make_alphas_cumprod": counted("abar", common.make_alphas_cumprod),
        "schedule:spaced_timesteps": counted("spacing", common.spaced_timesteps),
        "ddpm:DDPMScheduler.previous_timestep": counted(
            "previous", DDPMScheduler.previous_timestep
        ),
        "ddpm:DDPMScheduler.step": counted("step", DDPMScheduler.step),
    }
    settings = ddpm_checks.PIXEL_SETTINGS
    scheduler = checks.install_scheduler_parts(DDPMScheduler(**settings), parts)
    torch.testing.assert_close(_loop(scheduler), _loop(DDPMScheduler(**settings)))
    assert set(calls) == {"betas", "abar", "spacing", "previous", "step"}
    assert calls.count("step") == 7
    # the package's class is not touched
    assert DDPMScheduler.step is not scheduler.step.__func__


def test_use_scheduler_parts_runs_what_is_kept(answers_home, capsys):
    assert schedule_checks.check_make_alphas_cumprod(common.make_alphas_cumprod)
    capsys.readouterr()
    scheduler = checks.use_scheduler_parts(DDPMScheduler(**ddpm_checks.PIXEL_SETTINGS))
    out = capsys.readouterr().out
    assert "make_betas: no answer of yours is kept" in out
    assert "▶ make_alphas_cumprod: your answer runs from here on" in out
    torch.testing.assert_close(
        _loop(scheduler), _loop(DDPMScheduler(**ddpm_checks.PIXEL_SETTINGS))
    )
