"""The learner's answers: kept when their check passes, run again later."""

import math

import pytest
import torch
from torch import nn

from sdlearn.checks import Case, answers, check, hint


def _scaled(x: torch.Tensor) -> torch.Tensor:
    return x / math.sqrt(x.shape[-1])


def _check_scaled(fn, name="Exercise 99.1", **options):
    x = torch.arange(12.0).reshape(3, 4)
    return check(
        name,
        fn,
        [Case((x,), _scaled(x))],
        hints=["the idea", "more of it", "the code"],
        mistakes={"you divided by the width, not its square root": lambda x: x / 4},
        **options,
    )


def test_a_passing_answer_is_kept_and_runs_again(answers_home, capsys):
    def my_scale(x):
        return x / math.sqrt(x.shape[-1])

    assert _check_scaled(my_scale, keep="toy:scale")
    assert "Kept in" in capsys.readouterr().out
    text = (answers_home / "toy.py").read_text()
    assert "def my_scale(x):" in text and "import torch" in text
    # a kernel restart later: the file alone brings it back
    again = answers.kept("toy")["scale"]
    x = torch.randn(2, 9)
    torch.testing.assert_close(again(x), _scaled(x))
    assert answers.is_learners(answers.use("toy:scale", _scaled, _check_scaled))
    # kept again: one block per part, the newest
    assert _check_scaled(my_scale, keep="toy:scale")
    assert (answers_home / "toy.py").read_text().count("# >>> scale ") == 1


def test_a_wrong_answer_is_not_kept_and_replaces_nothing(answers_home, capsys):
    def wrong(x):
        return x / x.shape[-1]

    assert not _check_scaled(wrong, keep="toy:scale")
    assert (
        not (answers_home / "toy.py").exists()
        or "wrong" not in (answers_home / "toy.py").read_text()
    )
    used = answers.use("toy:scale", _scaled)
    assert used is _scaled and not answers.is_learners(used)
    assert "the package's stands in" in capsys.readouterr().out


def test_a_failing_try_forgets_the_answer_that_passed(answers_home, capsys):
    def my_scale(x):
        return x / math.sqrt(x.shape[-1])

    assert _check_scaled(my_scale, keep="toy:scale")

    def my_scale(x):  # noqa: F811  (the learner edits the cell and runs it again)
        return x

    # still wrong: later chapters run the package's, not the code since changed
    assert not _check_scaled(my_scale, keep="toy:scale")
    assert answers.kept("toy") == {}


def test_a_kept_answer_that_no_longer_passes_is_not_used(answers_home, capsys):
    answers_home.mkdir(parents=True)
    (answers_home / "toy.py").write_text(
        answers.HEADER
        + "\n# >>> scale (Exercise 99.1): scale\ndef scale(x):\n    return x\n"
        + "# <<< scale\n"
    )
    assert answers.use("toy:scale", _scaled, _check_scaled) is _scaled
    assert "fails its check now" in capsys.readouterr().out


def test_an_untouched_exercise_gets_no_hint_and_tries_get_more(capsys):
    def untouched(x):
        raise NotImplementedError

    def wrong(x):
        return x * 2

    name = "Exercise 99.2"  # its own count of failed tries
    assert not _check_scaled(untouched, name)
    out = capsys.readouterr().out
    assert "not done yet" in out and "Hint" not in out
    assert not _check_scaled(wrong, name)
    assert "Hint 1 of 3: the idea" in capsys.readouterr().out
    assert not _check_scaled(wrong, name)
    assert "Hint 2 of 3: more of it" in capsys.readouterr().out
    hint(name)  # on request
    assert "Hint 3 of 3: the code" in capsys.readouterr().out


def test_a_known_mistake_is_named(capsys):
    assert not _check_scaled(lambda x: x / 4)
    assert "you divided by the width, not its square root" in capsys.readouterr().out


def test_bad_part_names_are_refused():
    with pytest.raises(ValueError, match="expected a part such as"):
        answers.keep("no colon", _scaled)


def test_install_forward_changes_this_model_only():
    def doubled(self, x):
        return 2 * x

    model = nn.Sequential(nn.Identity(), nn.Identity())
    other = nn.Identity()
    assert answers.install_forward(model, nn.Identity, doubled) == 2
    torch.testing.assert_close(model(torch.ones(2)), 4 * torch.ones(2))
    torch.testing.assert_close(other(torch.ones(2)), torch.ones(2))


def test_an_answer_calls_the_packages_version_of_what_is_not_kept(answers_home):
    # a kept forward that calls split_heads, which the learner has not kept:
    # the package's split_heads stands in
    def head_count(x, num_heads):
        return split_heads(x, num_heads).shape[1]  # noqa: F821  (the package's)

    answers.keep("attention:head_count", head_count)
    assert answers.kept("attention")["head_count"](torch.zeros(1, 3, 8), 2) == 2


def test_a_file_that_no_longer_runs_is_reported(answers_home, capsys):
    def scale(x):
        return x

    answers.keep("toy2:scale", scale)
    path = answers_home / "toy2.py"
    path.write_text(path.read_text() + "\nthis is not python\n")
    assert answers.kept("toy2") == {}
    assert "toy2.py does not run (NameError" in capsys.readouterr().out


def test_two_parts_with_the_same_function_name_keep_their_own(answers_home):
    def forward(self, x):
        return x + 1

    answers.keep("toy:One.forward", forward)

    def forward(self, x):  # noqa: F811  (another class's forward, same name)
        return x + 2

    answers.keep("toy:Two.forward", forward)
    answers.keep("toy:Two.forward", forward)  # kept again: no gap grows
    kept = answers.kept("toy")
    assert kept["One.forward"](None, 0) == 1 and kept["Two.forward"](None, 0) == 2
    assert "\n\n\n\n" not in (answers_home / "toy.py").read_text()


def test_checking_a_kept_answer_again_leaves_the_file_as_it_was(answers_home):
    import inspect

    def my_scale(x):
        return x / math.sqrt(x.shape[-1])

    assert _check_scaled(my_scale, keep="toy:scale")

    def other(x):
        return x

    answers.keep("toy:other", other)
    before = (answers_home / "toy.py").read_text()
    for _ in range(2):  # a later chapter's answers.use re-checks it
        used = answers.use(
            "toy:scale", _scaled, lambda fn: _check_scaled(fn, keep="toy:scale")
        )
        assert answers.is_learners(used)
    assert (answers_home / "toy.py").read_text() == before
    # and a kept function's source is its own, read from the file
    assert inspect.getsource(answers.kept("toy")["other"]).startswith("def other(x):")
