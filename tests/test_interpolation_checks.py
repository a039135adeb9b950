"""Chapter 02's slerp check: a right answer passes and is kept, every named
mistake is recognised by name, an untouched exercise gets no hint, and a wrong
answer is not kept and forgets a kept one."""

from __future__ import annotations

import pytest
import torch

import sdlearn.checks
from sdlearn import checks as framework
from sdlearn import interpolation
from sdlearn.checks import Verdict, answers
from sdlearn.checks import interpolation as checks


@pytest.fixture(autouse=True)
def first_tries(monkeypatch):
    """Every test starts with no failed tries, so its first hint is the first tier."""
    monkeypatch.setattr(sdlearn.checks, "_FAILED_TRIES", {})


def unsolved(*args, **kwargs):
    raise NotImplementedError


def slerp(a, b, weights, threshold=0.9995):
    w = weights.view(-1, *[1] * a.ndim)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    if cos.abs() > threshold:
        return a + w * (b - a)
    theta = cos.acos()
    return (((1 - w) * theta).sin() * a + (w * theta).sin() * b) / theta.sin()


def test_a_right_answer_passes_and_is_kept(capsys):
    assert checks.check_slerp(interpolation.slerp)  # the package's own
    assert checks.check_slerp(slerp)
    out = capsys.readouterr().out
    assert out.count("✅") == 2 and "Kept in" in out
    assert answers.kept("interpolation")["slerp"].__name__ == "slerp"
    used = answers.use(checks.SLERP_PART, interpolation.slerp, checks.check_slerp)
    assert answers.is_learners(used)
    assert capsys.readouterr().out == ""


def test_every_exercise_names_at_least_two_mistakes():
    assert len(checks.SLERP_MISTAKES) >= 2


@pytest.mark.parametrize(
    "message, wrong",
    checks.SLERP_MISTAKES.items(),
    ids=[m[:40] for m in checks.SLERP_MISTAKES],
)
def test_each_named_mistake_is_recognised(message, wrong, capsys):
    verdict = checks.check_slerp(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "❌ Exercise 02.15" in out and message in out
    assert "Hint 1 of 3" in out


def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(capsys):
    assert checks.check_slerp(slerp)
    assert not checks.check_slerp(lambda a, b, weights, threshold=0.9995: a)
    assert "slerp" not in answers.kept("interpolation")
    used = answers.use(checks.SLERP_PART, interpolation.slerp, checks.check_slerp)
    assert used is interpolation.slerp
    assert "the package's stands in" in capsys.readouterr().out


def test_an_untouched_exercise_gets_a_reminder_and_no_hint(capsys):
    verdict = checks.check_slerp(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "Hint" not in out


def test_hints_come_in_three_tiers_and_the_first_gives_no_code():
    checks.check_slerp(unsolved)
    tiers = framework._HINTS["Exercise 02.15"]
    assert len(tiers) == 3
    assert "torch." not in tiers[0] and "(" not in tiers[0]


def test_a_slerp_without_the_straight_line_is_refused(capsys):
    # exactly parallel inputs: sin θ = 0, and the arc's formula divides by it
    def arc_only(a, b, weights, threshold=0.9995):
        w = weights.view(-1, *[1] * a.ndim)
        theta = torch.nn.functional.cosine_similarity(
            a.flatten(), b.flatten(), dim=0
        ).acos()
        return (((1 - w) * theta).sin() * a + (w * theta).sin() * b) / theta.sin()

    assert not checks.check_slerp(arc_only)
    assert "NaN" in capsys.readouterr().out
