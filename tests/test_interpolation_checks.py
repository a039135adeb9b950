"""Chapter 02's slerp check: a right answer passes and is kept, every named
mistake is recognised by name, an untouched exercise gets no hint, and a wrong
answer is not kept and forgets a kept one."""

from __future__ import annotations

import pytest
import torch

from sdlearn import interpolation
from sdlearn.checks import interpolation as checks
from tests.check_contract import (
    assert_mistake_named,
    assert_passes_and_is_kept,
    assert_three_hint_tiers,
    assert_untouched_gets_no_hint,
    assert_wrong_is_not_kept,
    named_mistakes,
)


def slerp(a, b, weights, threshold=0.9995):
    w = weights.view(-1, *[1] * a.ndim)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    if cos.abs() > threshold:
        return a + w * (b - a)
    theta = cos.acos()
    return (((1 - w) * theta).sin() * a + (w * theta).sin() * b) / theta.sin()


def test_a_right_answer_passes_and_is_kept(capsys):
    package = interpolation.slerp
    assert_passes_and_is_kept(
        checks.check_slerp, slerp, package, checks.SLERP_PART, capsys
    )


@pytest.mark.parametrize(
    "check, exercise, message, wrong",
    named_mistakes([(checks.check_slerp, "Exercise 02.15", checks.SLERP_MISTAKES)]),
)
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(capsys):
    def straight(a, b, weights, threshold=0.9995):
        return a

    package, part = interpolation.slerp, checks.SLERP_PART
    assert_wrong_is_not_kept(checks.check_slerp, slerp, straight, package, part, capsys)


def test_an_untouched_exercise_gets_a_reminder_and_no_hint(capsys):
    assert_untouched_gets_no_hint(checks.check_slerp, capsys)


def test_hints_come_in_three_tiers_and_the_first_gives_no_code():
    assert_three_hint_tiers(checks.check_slerp, "Exercise 02.15", ("torch.", "("))


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
