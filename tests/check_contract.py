"""What every exercise's check promises, as assertions the checks' test modules
share: a right answer passes and is kept, and a kernel restart uses it again; a
wrong one is not kept and sets an earlier answer aside; an untouched exercise
gets a reminder and no hint; hints come in three tiers, the first without
code; every named mistake is named."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sdlearn import checks as framework
from sdlearn.checks import Verdict, answers


def unsolved(*args, **kwargs):
    raise NotImplementedError


def assert_passes_and_is_kept(check, right, package, part, capsys) -> None:
    assert check(package)  # the package's own code is a right answer
    assert check(right)
    out = capsys.readouterr().out
    assert out.count("✅") == 2 and "Kept in" in out
    module, name = part.split(":")
    assert answers.kept(module)[name].__name__ == right.__name__
    # read back from the file (a kernel restart), it passes again and is used
    assert answers.is_learners(answers.use(part, package, check))
    assert capsys.readouterr().out == f"▶ {name}: your answer runs from here on\n"


def off_by_half(package: Callable) -> Callable:
    """A wrong answer: the package's own result, times 1.5."""

    def wrong(*args, **kwargs):
        return package(*args, **kwargs) * 1.5

    return wrong


def assert_wrong_is_not_kept(check, right, wrong, package, part, capsys) -> None:
    module, name = part.split(":")
    assert check(right)
    assert name in answers.kept(module)
    assert not check(wrong)
    assert name not in answers.kept(module)
    assert answers.use(part, package, check) is package
    assert "the package's stands in" in capsys.readouterr().out


def assert_untouched_gets_no_hint(check, capsys, answers_home=None) -> None:
    """With `answers_home` (conftest's fixture), also that nothing was kept."""
    verdict = check(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "raise NotImplementedError" in out
    assert "Hint" not in out  # no hint before a first try
    if answers_home is not None:
        assert not answers_home.exists() or not any(answers_home.iterdir())


def assert_three_hint_tiers(check, exercise: str, code_marks: tuple) -> None:
    """Three tiers, and the first has none of `code_marks` ("self.", "(")."""
    check(unsolved)
    tiers = framework._HINTS[exercise]  # what the check registered
    assert len(tiers) == 3
    assert not any(mark in tiers[0] for mark in code_marks)


def assert_random_state_untouched(checked: list[tuple[Callable, Callable]]) -> None:
    """Each (check, right answer): checking draws from no global generator."""
    state = torch.get_rng_state()
    for check, right in checked:
        check(right)
    assert torch.equal(torch.get_rng_state(), state)


def named_mistakes(table: list[tuple]) -> list:
    """(check, "Exercise NN.M", {message: wrong answer}) rows, one pytest
    parameter (check, exercise, message, wrong) per named mistake; every
    exercise names at least two. A row may end with `as_learners`, which wraps
    each wrong answer into the signature a learner's has (where the check's
    table holds them in the form its harness calls)."""
    assert all(len(row[2]) >= 2 for row in table)
    params = []
    for check, exercise, mistakes, *as_learners in table:
        for message, wrong in mistakes.items():
            if as_learners:
                wrong = as_learners[0](wrong)
            name = f"{exercise}: {message[:40]}"
            params.append(pytest.param(check, exercise, message, wrong, id=name))
    return params


def assert_mistake_named(check, exercise, message, wrong, capsys) -> None:
    verdict = check(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert f"❌ {exercise} " in out and message in out
    assert "Hint 1 of 3" in out
