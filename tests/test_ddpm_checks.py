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
from tests.helpers import assert_refused, assert_unsolved_never_raise

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


def test_right_answers_pass_and_are_kept(answers_home, capsys):
    assert checks.check_add_noise(add_noise)
    assert checks.check_previous_timestep(previous_timestep)
    assert checks.check_ddpm_step(ddpm_step)
    out = capsys.readouterr().out
    assert out.count("✅") == 3 and "Hint" not in out
    kept = answers.kept("ddpm")
    assert set(kept) == {
        "add_noise",
        "DDPMScheduler.previous_timestep",
        "DDPMScheduler.step",
    }
    previous = answers.use(
        checks.PREVIOUS_PART,
        DDPMScheduler.previous_timestep,
        checks.check_previous_timestep,
    )
    assert answers.is_learners(previous)
    # the kept copies run on their own, as the chapter (and chapter 06) use them
    used = answers.use(checks.ADD_NOISE_PART, common.add_noise, checks.check_add_noise)
    assert answers.is_learners(used)
    step = answers.use(checks.STEP_PART, DDPMScheduler.step, checks.check_ddpm_step)
    assert answers.is_learners(step)


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


@pytest.mark.parametrize("message", list(checks.ADD_NOISE_MISTAKES))
def test_add_noise_mistakes_are_named(answers_home, capsys, message):
    wrong = checks.ADD_NOISE_MISTAKES[message]
    out = assert_refused(checks.check_add_noise, wrong, capsys)
    assert message in out
    assert "add_noise" not in answers.kept("ddpm")


def test_the_package_passes(answers_home):
    assert checks.check_add_noise(common.add_noise)
    assert checks.check_previous_timestep(DDPMScheduler.previous_timestep)
    assert checks.check_ddpm_step(DDPMScheduler.step)


@pytest.mark.parametrize("message", list(checks.PREVIOUS_MISTAKES))
def test_previous_timestep_mistakes_are_named(answers_home, capsys, message):
    wrong = checks.PREVIOUS_MISTAKES[message].__wrapped__  # a method, as a learner's
    out = assert_refused(checks.check_previous_timestep, wrong, capsys)
    assert message in out
    assert "DDPMScheduler.previous_timestep" not in answers.kept("ddpm")


@pytest.mark.parametrize("message", list(checks.STEP_MISTAKES))
def test_step_mistakes_are_named(answers_home, capsys, message):
    wrong = checks.STEP_MISTAKES[message].__wrapped__  # a step, as a learner's

    out = assert_refused(checks.check_ddpm_step, wrong, capsys)
    assert message in out
    assert "DDPMScheduler.step" not in answers.kept("ddpm")


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
def test_other_step_slips_are_described(answers_home, capsys, wrong, words):
    out = assert_refused(checks.check_ddpm_step, wrong, capsys)
    assert words in out


def test_a_wrong_answer_replaces_a_kept_one(answers_home, capsys):
    assert checks.check_ddpm_step(ddpm_step)
    wrong = functools.partial(checks.reference_step, mistake="fixed_large")
    wrong.__name__ = "ddpm_step"
    assert not checks.check_ddpm_step(wrong)
    assert "DDPMScheduler.step" not in answers.kept("ddpm")
    step = answers.use(checks.STEP_PART, DDPMScheduler.step, checks.check_ddpm_step)
    assert step is DDPMScheduler.step
    assert "the package's stands in" in capsys.readouterr().out


def test_unsolved_exercises_never_raise_nor_hint(answers_home, capsys):
    assert_unsolved_never_raise(
        [
            checks.check_add_noise,
            checks.check_previous_timestep,
            checks.check_ddpm_step,
        ],
        capsys,
    )
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
