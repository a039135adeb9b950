"""Chapter 05's schedule checks: right answers pass and are kept, each named
mistake is named, an untouched exercise gets no hint, and a wrong answer is not
kept."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdlearn.checks import answers
from sdlearn.checks import schedule as checks
from sdlearn.schedulers import common
from tests.check_contract import (
    assert_mistake_named,
    assert_passes_and_is_kept,
    assert_untouched_gets_no_hint,
    assert_wrong_is_not_kept,
    named_mistakes,
)

# --- right answers, written as a learner would ---


def cosine_betas(num_train_timesteps, max_beta=0.999):
    def f(time):
        return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained=None):
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    return cosine_betas(num_train_timesteps)


def make_alphas_cumprod(betas):
    return torch.cumprod(1 - betas, dim=0)


def spaced_timesteps(n, T, spacing, steps_offset=0):
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        timesteps = np.arange(n)[::-1] * (T // n) + steps_offset
    else:
        timesteps = np.round(np.arange(T, 0, -T / n)) - 1
    return torch.from_numpy(timesteps.astype(np.int64))


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (
        checks.check_cosine_betas,
        cosine_betas,
        common.cosine_betas,
        checks.COSINE_PART,
    ),
    (checks.check_make_betas, make_betas, common.make_betas, checks.BETAS_PART),
    (
        checks.check_make_alphas_cumprod,
        make_alphas_cumprod,
        common.make_alphas_cumprod,
        checks.ALPHAS_CUMPROD_PART,
    ),
    (
        checks.check_spaced_timesteps,
        spaced_timesteps,
        common.spaced_timesteps,
        checks.SPACING_PART,
    ),
]
IDS = ["cosine_betas", "make_betas", "make_alphas_cumprod", "spaced_timesteps"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    # the kept copies run on their own, as the chapter uses them
    assert_passes_and_is_kept(check, right, package, part, capsys)


def test_a_kept_make_betas_runs_the_kept_cosine_schedule():
    assert checks.check_cosine_betas(cosine_betas)
    assert checks.check_make_betas(make_betas)
    kept = answers.kept("schedule")
    assert kept["make_betas"].__globals__["cosine_betas"] is kept["cosine_betas"]


MISTAKES = [
    (checks.check_cosine_betas, "Exercise 05.1", checks.COSINE_MISTAKES),
    (checks.check_make_betas, "Exercise 05.2", checks.BETAS_MISTAKES),
    (
        checks.check_make_alphas_cumprod,
        "Exercise 05.3",
        checks.ALPHAS_CUMPROD_MISTAKES,
    ),
    (checks.check_spaced_timesteps, "Exercise 05.6", checks.SPACING_MISTAKES),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)
    assert answers.kept("schedule") == {}


def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(capsys):
    def make_alphas_cumprod_again(betas):  # the learner edits the cell
        return torch.cumsum(1 - betas, dim=0)

    check, right, package, part = EXERCISES[2]
    assert_wrong_is_not_kept(
        check, right, make_alphas_cumprod_again, package, part, capsys
    )


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES], ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys):
    assert_untouched_gets_no_hint(check, capsys)
    assert answers.kept("schedule") == {}
