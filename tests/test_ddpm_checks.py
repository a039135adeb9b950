"""Chapter 05's exercise checks: right answers pass and are kept, each named
mistake is named, an untouched exercise gets no hint, and a wrong answer is not
kept."""

from __future__ import annotations

import functools

import pytest
import torch

from sdlearn.checks import answers
from sdlearn.checks import ddpm as checks
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


def add_noise(alphas_cumprod, original_samples, noise, timesteps):
    alpha_bar_t = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return alpha_bar_t.sqrt() * original_samples + (1 - alpha_bar_t).sqrt() * noise


def ddpm_step(self, model_output, timestep, sample, generator=None):
    from sdlearn.schedulers.ddpm import DDPMSchedulerOutput

    t = int(timestep)
    prev_t = self.previous_timestep(t)
    alpha_bar_t = self.alphas_cumprod[t]
    alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    x0 = (sample - (1 - alpha_bar_t).sqrt() * model_output) / alpha_bar_t.sqrt()
    if self.config.clip_sample:
        bound = self.config.clip_sample_range
        x0 = x0.clamp(-bound, bound)
    mean = (
        alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t) * x0
        + alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * sample
    )
    if prev_t >= 0:  # no draw on the last step: allowed, its variance is 0
        noise = torch.randn(model_output.shape, generator=generator)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
        mean = mean + variance.sqrt() * noise
    return DDPMSchedulerOutput(prev_sample=mean, pred_original_sample=x0)


def previous_timestep(self, timestep):
    if self.num_inference_steps is None:
        return timestep - 1
    i = self.timesteps.tolist().index(timestep) + 1
    return int(self.timesteps[i]) if i < len(self.timesteps) else -1


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (checks.check_add_noise, add_noise, common.add_noise, checks.ADD_NOISE_PART),
    (
        checks.check_previous_timestep,
        previous_timestep,
        DDPMScheduler.previous_timestep,
        checks.PREVIOUS_PART,
    ),
    (checks.check_ddpm_step, ddpm_step, DDPMScheduler.step, checks.STEP_PART),
]
IDS = ["add_noise", "previous_timestep", "step"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    # the kept copies run on their own, as the chapter (and chapter 06) use them
    assert_passes_and_is_kept(check, right, package, part, capsys)


def test_the_kept_step_samples_as_the_package_does(answers_home):
    assert checks.check_ddpm_step(ddpm_step)
    step = answers.kept("ddpm")["DDPMScheduler.step"]
    loops = []
    for fn in (DDPMScheduler.step, step):
        scheduler = DDPMScheduler(**checks.PIXEL_SETTINGS)
        scheduler.set_timesteps(20)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 8, 8, generator=g)
        for t in scheduler.timesteps:
            x = fn(scheduler, torch.tanh(x) * 0.5, t, x, g).prev_sample
        loops.append(x)
    torch.testing.assert_close(loops[1], loops[0], atol=1e-5, rtol=1e-5)


def test_the_checks_step_without_a_mistake_is_the_packages():
    for case in checks._step_cases():
        actual = checks._run(checks.reference_step)(*case.args)
        for a, e in zip(actual, case.expected, strict=True):
            torch.testing.assert_close(a, e)


# --- the named mistakes: each one made, each one named ---


# the mistakes as a learner's methods, not wrapped for the check's harness
def _unwrapped(wrong):
    return wrong.__wrapped__


MISTAKES = [
    (checks.check_add_noise, "Exercise 05.4", checks.ADD_NOISE_MISTAKES),
    (
        checks.check_previous_timestep,
        "Exercise 05.7",
        checks.PREVIOUS_MISTAKES,
        _unwrapped,
    ),
    (checks.check_ddpm_step, "Exercise 05.8", checks.STEP_MISTAKES, _unwrapped),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)
    assert answers.kept("ddpm") == {}


def _without_noise(self, model_output, timestep, sample, generator=None):
    return checks.reference_step(
        self, model_output, timestep, sample, mistake="no noise"
    )


def _global_noise(self, model_output, timestep, sample, generator=None):
    return checks.reference_step(
        self, model_output, timestep, sample, torch.Generator().manual_seed(123)
    )


def _draws_twice(self, model_output, timestep, sample, generator=None):
    out = checks.reference_step(self, model_output, timestep, sample, generator)
    torch.randn(model_output.shape, generator=generator)
    return out


def _a_tensor(self, model_output, timestep, sample, generator=None):
    return checks.reference_step(
        self, model_output, timestep, sample, generator
    ).prev_sample


@pytest.mark.parametrize(
    ("wrong", "words"),
    [
        (_without_noise, "the posterior mean alone"),
        (_global_noise, "not the generator's draw"),
        (_draws_twice, "a different number of times"),
        (_a_tensor, "return DDPMSchedulerOutput"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_other_step_slips_are_described(capsys, wrong, words):
    out = assert_refused(checks.check_ddpm_step, wrong, capsys)
    assert words in out


def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(capsys):
    wrong = functools.partial(checks.reference_step, mistake="fixed_large")
    wrong.__name__ = "ddpm_step"
    check, right, package, part = EXERCISES[2]
    assert_wrong_is_not_kept(check, right, wrong, package, part, capsys)


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES], ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys):
    assert_untouched_gets_no_hint(check, capsys)
    assert answers.kept("ddpm") == {}


def test_a_step_with_nan_on_the_last_step_is_told_why(capsys):
    # alphas_cumprod[prev_t] with prev_t = -1 can make a variance negative: NaN
    def step(self, model_output, timestep, sample, generator=None):
        out = DDPMScheduler.step(self, model_output, timestep, sample, generator)
        if self.previous_timestep(int(timestep)) < 0:
            out.prev_sample.fill_(float("nan"))
        return out

    assert not checks.check_ddpm_step(step)
    out = capsys.readouterr().out
    assert "prev_sample has NaN values" in out and "alpha_bar_prev is 1" in out
