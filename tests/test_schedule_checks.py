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
from tests.helpers import assert_refused, assert_unsolved_never_raise

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


RIGHT = [
    (checks.check_cosine_betas, cosine_betas, "cosine_betas", common.cosine_betas),
    (checks.check_make_betas, make_betas, "make_betas", common.make_betas),
    (
        checks.check_make_alphas_cumprod,
        make_alphas_cumprod,
        "make_alphas_cumprod",
        common.make_alphas_cumprod,
    ),
    (
        checks.check_spaced_timesteps,
        spaced_timesteps,
        "spaced_timesteps",
        common.spaced_timesteps,
    ),
]


def test_right_answers_pass_and_are_kept(answers_home, capsys):
    for check, answer, _, _ in RIGHT:
        assert check(answer)
    out = capsys.readouterr().out
    assert out.count("✅") == len(RIGHT) and "Hint" not in out
    assert set(answers.kept("schedule")) == {part for _, _, part, _ in RIGHT}
    # the kept copies run on their own, as the chapter uses them
    for check, _, part, package in RIGHT:
        used = answers.use(f"schedule:{part}", package, check)
        assert answers.is_learners(used)


def test_the_package_passes(answers_home, capsys):
    for check, _, _, package in RIGHT:
        assert check(package)


def test_a_kept_make_betas_runs_the_kept_cosine_schedule(answers_home):
    assert checks.check_cosine_betas(cosine_betas)
    assert checks.check_make_betas(make_betas)
    kept = answers.kept("schedule")
    assert kept["make_betas"].__globals__["cosine_betas"] is kept["cosine_betas"]


MISTAKES = [
    (checks.check_cosine_betas, checks.COSINE_MISTAKES, "cosine_betas"),
    (checks.check_make_betas, checks.BETAS_MISTAKES, "make_betas"),
    (
        checks.check_make_alphas_cumprod,
        checks.ALPHAS_CUMPROD_MISTAKES,
        "make_alphas_cumprod",
    ),
    (checks.check_spaced_timesteps, checks.SPACING_MISTAKES, "spaced_timesteps"),
]


@pytest.mark.parametrize(
    ("check", "message", "part"),
    [(c, m, p) for c, mistakes, p in MISTAKES for m in mistakes],
    ids=lambda v: v[:40] if isinstance(v, str) else getattr(v, "__name__", ""),
)
def test_mistakes_are_named(answers_home, capsys, check, message, part):
    wrong = dict(next(m for c, m, _ in MISTAKES if c is check))[message]
    out = assert_refused(check, wrong, capsys)
    assert message in out
    assert part not in answers.kept("schedule")


def test_a_wrong_answer_replaces_a_kept_one(answers_home, capsys):
    assert checks.check_make_alphas_cumprod(make_alphas_cumprod)

    def make_alphas_cumprod_again(betas):  # the learner edits the cell
        return torch.cumsum(1 - betas, dim=0)

    assert not checks.check_make_alphas_cumprod(make_alphas_cumprod_again)
    assert "make_alphas_cumprod" not in answers.kept("schedule")
    used = answers.use(
        checks.ALPHAS_CUMPROD_PART,
        common.make_alphas_cumprod,
        checks.check_make_alphas_cumprod,
    )
    assert used is common.make_alphas_cumprod
    assert "the package's stands in" in capsys.readouterr().out


def test_unsolved_exercises_never_raise_nor_hint(answers_home, capsys):
    assert_unsolved_never_raise([check for check, _, _, _ in RIGHT], capsys)
    assert answers.kept("schedule") == {}
