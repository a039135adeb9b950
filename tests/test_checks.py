"""The exercise checks: right answers pass, wrong ones fail helpfully, none raise."""

import numpy as np
import torch
from einops import rearrange, reduce

from sdlearn.checks import Case, Verdict, check, tour
from sdlearn.shapes import image_grid


def unsolved(*args):
    raise NotImplementedError


def test_right_answers_pass(capsys):
    assert tour.check_to_tokens(lambda x: rearrange(x, "b c h w -> b (h w) c"))
    assert tour.check_image_grid(image_grid)

    def channel_stats(x):
        mean = reduce(x, "b c h w -> c", "mean")
        std = reduce((x - mean[:, None, None]) ** 2, "b c h w -> c", "mean").sqrt()
        return mean, std

    assert tour.check_channel_stats(channel_stats)
    assert capsys.readouterr().out.count("✅") == 3


def test_wrong_answers_fail_with_the_reason(capsys):
    # w-major instead of h-major token order: same shape, wrong values
    assert not tour.check_to_tokens(lambda x: rearrange(x, "b c h w -> b (w h) c"))
    out = capsys.readouterr().out
    assert "wrong values" in out and "max abs error" in out and "Hint:" in out

    assert not tour.check_to_tokens(lambda x: rearrange(x, "b c h w -> b c (h w)"))
    assert (
        "returned shape (2, 3, 20), expected shape (2, 20, 3)"
        in capsys.readouterr().out
    )

    # the unbiased std (N - 1) is close but not what was asked
    assert not tour.check_channel_stats(lambda x: (x.mean((0, 2, 3)), x.std((0, 2, 3))))
    assert "value 1" in capsys.readouterr().out


def test_unsolved_and_crashing_exercises_never_raise(capsys):
    verdict = tour.check_to_tokens(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    assert "not done yet" in capsys.readouterr().out

    assert not tour.check_image_grid(lambda images, rows: images.foo)
    out = capsys.readouterr().out
    assert "raised AttributeError" in out and "images.foo" in out


def test_check_compares_dtypes_nans_and_plain_values(capsys):
    x = torch.ones(2)
    assert not check("t", lambda: x.double(), [Case((), x)])
    assert (
        "dtype torch.float64, expected dtype torch.float32" in capsys.readouterr().out
    )
    assert not check("t", lambda: x * float("nan"), [Case((), x)])
    assert "NaN" in capsys.readouterr().out
    assert check("t", lambda a: a + 1, [Case((1,), 2), Case((2,), 3)])
    assert not check("t", lambda a: a, [Case((1,), 2)])
    assert check("t", lambda: np.eye(2), [Case((), np.eye(2))])


def test_verdict_shows_nothing_more_in_a_notebook():
    verdict = Verdict(True)
    assert verdict and not Verdict(False)
    assert verdict._ipython_display_() is None
    assert repr(verdict) == "Verdict(passed=True)"


def test_every_chapters_checks_module_offers_hint():
    # a failed check says `checks.hint("Exercise NN.M")`, and chapters import
    # their checks module as `checks`: every such module must have it
    import importlib
    import pkgutil

    import sdlearn.checks
    from sdlearn.checks import hint

    names = [m.name for m in pkgutil.iter_modules(sdlearn.checks.__path__)]
    missing = [
        name
        for name in names
        if name != "answers"
        and getattr(importlib.import_module(f"sdlearn.checks.{name}"), "hint", None)
        is not hint
    ]
    assert names and not missing


def test_an_error_points_at_the_learners_line_not_torchs(capsys):
    from sdlearn.checks import Case, check

    def project(x):
        weight = torch.ones(3, 5)
        return torch.nn.functional.linear(x, weight)  # 4 features in, 5 expected

    assert not check("Exercise 99.1", project, [Case((torch.ones(2, 4),), None)])
    out = capsys.readouterr().out
    assert "raised RuntimeError" in out
    assert "of your code: return torch.nn.functional.linear(x, weight)" in out


def test_tensors_inside_a_tuple_or_list_are_described_by_shape(capsys):
    from sdlearn.checks import _describe

    pair = (torch.ones(2, 3), torch.zeros(2, 3))
    levels = [torch.tensor(14.6), torch.tensor(8.0)]
    case = Case((pair, levels, "midpoint"), torch.zeros(2, 3))
    assert not check("t", lambda p, l, s: p[0], [case])
    out = capsys.readouterr().out
    assert "a tuple of 2 tensors of shape (2, 3) and dtype torch.float32" in out
    assert "a list of 2 tensors of shape () and dtype torch.float32" in out
    assert "tensor(" not in out and "14.6" not in out
    mixed = _describe((torch.ones(4), [torch.ones(1, dtype=torch.int64)], 3))
    assert mixed == (
        "a tuple (a tensor of shape (4,) and dtype torch.float32, a list of 1 "
        "tensor of shape (1,) and dtype torch.int64, int 3)"
    )
    assert _describe((1, 2)) == "tuple (1, 2)"  # no tensor: its values
