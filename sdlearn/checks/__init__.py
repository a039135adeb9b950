"""Auto-checks for the chapters' exercises.

A chapter calls one check after each exercise, e.g. `tour.check_to_tokens(to_tokens)`.
The check runs the learner's function on fixed inputs, compares the result with a
reference (torch itself or sdlearn's own implementation, which the test suite
holds to diffusers and transformers), and prints one clear verdict. A check never
raises: an unsolved exercise (`raise NotImplementedError`) prints a reminder, and
the chapter goes on with sdlearn's implementation, so skipping one breaks nothing.

Each chapter's checks live in a submodule named like the chapter's module:
`sdlearn.checks.tour` for chapter 00, `sdlearn.checks.attention` for chapter 01...
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdlearn.checks import answers


class Verdict:
    """What a check found: true when the exercise passed.

    The verdict has been printed already, so a notebook shows nothing more when
    a check is the last line of a cell.
    """

    def __init__(self, passed: bool) -> None:
        self.passed = passed

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"Verdict(passed={self.passed})"

    def _ipython_display_(self) -> None:
        pass


@dataclass
class Case:
    """One input to an exercise and the answer it should give.

    Args:
        args: positional arguments for the learner's function.
        expected: the reference result: a tensor, a tuple of tensors, or any
            value compared with `==`.
        kwargs: keyword arguments for the learner's function.
    """

    args: tuple
    expected: Any
    kwargs: dict = field(default_factory=dict)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, dict):  # a batch: its tensors by shape, not by value
        items = ", ".join(f"{key!r}: {_describe(v)}" for key, v in value.items())
        return f"a dict {{{items}}}"[:300]
    if isinstance(value, tuple | list) and _holds_tensors(value):  # by shape too
        kind = type(value).__name__
        forms = {(tuple(v.shape), v.dtype) for v in value if torch.is_tensor(v)}
        if len(forms) == 1 and all(torch.is_tensor(v) for v in value):
            (shape, dtype), many = forms.pop(), len(value) > 1
            tensors = f"{len(value)} tensors" if many else "1 tensor"
            return f"a {kind} of {tensors} of shape {shape} and dtype {dtype}"
        return f"a {kind} ({', '.join(_describe(v) for v in value)})"[:300]
    if isinstance(value, nn.Module) and "\n" in repr(value):  # not its layers
        widths = getattr(getattr(value, "config", None), "block_out_channels", None)
        if widths is not None:
            return f"a {type(value).__name__} of {len(widths)} levels {tuple(widths)}"
        return f"a {type(value).__name__}"
    if " at 0x" in repr(value):  # an object with no repr of its own: its kind
        return f"a {type(value).__name__}"
    return f"{type(value).__name__} {value!r}"[:200]


def _holds_tensors(value: Any) -> bool:
    """True when a tuple or list holds a tensor or a dict, at any depth."""
    if isinstance(value, tuple | list):
        return any(_holds_tensors(v) for v in value)
    return isinstance(value, torch.Tensor | dict)


def tensor_form_problem(
    actual: Any, expected: torch.Tensor, shape_hint: str = ""
) -> str | None:
    """None when `actual` is a tensor of `expected`'s shape and dtype, else what
    differs, in words; `shape_hint` explains the expected shape."""
    if not isinstance(actual, torch.Tensor):
        return f"returned {_describe(actual)}, expected {_describe(expected)}"
    if actual.shape != expected.shape:
        return (
            f"returned shape {tuple(actual.shape)}, "
            f"expected shape {tuple(expected.shape)}{shape_hint}"
        )
    if actual.dtype != expected.dtype:
        return f"returned dtype {actual.dtype}, expected dtype {expected.dtype}"
    return None


def compare_values(
    actual: Any, expected: Any, atol: float, rtol: float, equal_nan: bool = False
) -> str | None:
    """None when `actual` matches `expected`, else what is wrong, in words;
    `equal_nan`: NaN matches NaN (a known mistake that gives NaN)."""
    if isinstance(expected, np.ndarray):
        expected = torch.from_numpy(expected)
        if isinstance(actual, np.ndarray):
            actual = torch.from_numpy(actual)
    if isinstance(expected, tuple | list):
        if not isinstance(actual, tuple | list) or len(actual) != len(expected):
            return f"returned {_describe(actual)}, expected {len(expected)} values"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            problem = compare_values(a, e, atol, rtol, equal_nan)
            if problem:
                return f"value {i}: {problem}"
        return None
    if isinstance(expected, torch.Tensor):
        problem = tensor_form_problem(actual, expected)
        if problem:
            return problem
        if torch.isnan(actual).any() and not torch.isnan(expected).any():
            return "returned NaN values where the reference has none"
        try:
            torch.testing.assert_close(
                actual, expected, atol=atol, rtol=rtol, equal_nan=equal_nan
            )
        except AssertionError:
            error = (actual.double() - expected.double()).abs().max().item()
            return (
                f"has the right shape but the wrong values: max abs error {error:.3g} "
                f"(allowed {atol:g} + {rtol:g} * |expected|)"
            )
        return None
    if actual != expected:
        return f"returned {_describe(actual)}, expected {_describe(expected)}"
    return None


# failed tries per exercise, this session: how far into its hints to go
_FAILED_TRIES: dict[str, int] = {}
# the hints of every exercise checked so far, for `hint(name)`
_HINTS: dict[str, list[str]] = {}


def forget_tries() -> None:
    """Start every exercise's hints over, as a new session does."""
    _FAILED_TRIES.clear()


def hint(name: str) -> None:
    """Print the next hint of an exercise ("Exercise 01.1"), on request."""
    tiers = _HINTS.get(name, [])
    if not tiers:
        print(f"{name} has no hints (run its check first).")
        return
    _FAILED_TRIES[name] = _FAILED_TRIES.get(name, 0) + 1
    _print_hint(name)


def _print_hint(name: str) -> None:
    tiers = _HINTS.get(name, [])
    tries = _FAILED_TRIES.get(name, 0)
    if not tiers or tries == 0:
        return
    level = min(tries, len(tiers))
    label = "Hint" if len(tiers) == 1 else f"Hint {level} of {len(tiers)}"
    print(f"   {label}: {tiers[level - 1]}")
    if level < len(tiers):
        print(f'   (another failed try, or checks.hint("{name}"), shows the next)')


def _named_mistake(
    actual: Any,
    case: Case,
    mistakes: Mapping[str, Callable],
    atol: float,
    rtol: float,
) -> str | None:
    """The message of the first known mistake whose result `actual` equals
    (NaN where it gives NaN: a division by zero is a mistake too)."""
    for message, wrong in mistakes.items():
        try:
            expected = wrong(*case.args, **case.kwargs)
        except Exception:  # a mistake that cannot run on this case
            continue
        if compare_values(actual, expected, atol, rtol, equal_nan=True) is None:
            return message
    return None


def check(
    name: str,
    fn: Callable,
    cases: Sequence[Case],
    hint: str = "",
    atol: float = 1e-5,
    rtol: float = 1.3e-6,
    compare: Callable[[Any, Case], str | None] | None = None,
    *,
    hints: Sequence[str] = (),
    mistakes: Mapping[str, Callable] | None = None,
    keep: str | None = None,
) -> Verdict:
    """Runs `fn` on every case and prints whether it matches the reference.

    An untouched exercise (`raise NotImplementedError`) gets a reminder and no
    hint. A wrong answer is named when it is a known mistake, and each failed
    try shows one hint more: the idea first, code last.

    Args:
        name: the exercise, as the chapter numbers it, e.g. "Exercise 00.1".
        fn: the learner's function.
        cases: inputs with the expected results.
        hint: one hint (older checks); `hints` takes tiers.
        atol, rtol: tolerances for tensors, as in `torch.testing.assert_close`.
        compare: `(actual, case) -> problem or None`, for an exercise whose
            mistakes are best described another way than by a max error.
        hints: hints in tiers, shown one more per failed try.
        mistakes: {what the mistake is: a function that makes it}, run on the
            same arguments; a wrong answer equal to one of them is named.
        keep: the part of the package `fn` stands for, "attention:Attention.forward"
            (module, colon, function or Class.method): a passing `fn` is kept
            in the learner's answers file, and later chapters run it
            (`checks.answers`); a failing one is not, and an earlier answer
            to it is forgotten: the learner's answer is still wrong.

    Returns:
        A `Verdict`, true when every case matches. Never raises.
    """
    _HINTS[name] = list(hints) or ([hint] if hint else [])
    what = f"{name} ({getattr(fn, '__name__', 'your function')})"

    def failed(message: str) -> Verdict:
        print(message)
        _FAILED_TRIES[name] = _FAILED_TRIES.get(name, 0) + 1
        _print_hint(name)
        # still wrong: the package's version stands in later, not an earlier
        # answer the learner has since changed
        if keep is not None and not answers.is_replaying() and answers.forget(keep):
            print("   Your earlier answer, kept when it passed, is set aside: the")
            print("   package's version stands in until this check passes again.")
        return Verdict(False)

    for i, case in enumerate(cases):
        try:
            actual = fn(*case.args, **case.kwargs)
        except NotImplementedError:
            print(f"⏳ {what} is not done yet: replace `raise NotImplementedError`.")
            return Verdict(False)
        except Exception as error:  # the learner's code may fail in any way
            return failed(
                f"❌ {what} raised {type(error).__name__}: {error}\n   {_where(error)}"
            )
        if compare is None:
            problem = compare_values(actual, case.expected, atol, rtol)
        else:
            problem = compare(actual, case)
        if problem and mistakes:
            problem = _named_mistake(actual, case, mistakes, atol, rtol) or problem
        if problem:
            inputs = ", ".join(_describe(a) for a in case.args)
            return failed(
                f"❌ {what} on case {i + 1} of {len(cases)} ({inputs}): {problem}."
            )
    print(f"✅ {what} matches the reference on {len(cases)} cases.")
    if keep is not None and not answers.is_replaying():
        _keep(keep, fn, name)
    return Verdict(True)


# code that is not the learner's: this package, and Python's and torch's own
_LIBRARIES = (str(Path(__file__).parents[1]), sys.prefix, sys.base_prefix)


def _where(error: Exception) -> str:
    """Where `error` came from, in the learner's code: the last line of theirs
    it passed through (not torch's or the package's), and the library line
    that raised it when that is another."""
    frames = traceback.extract_tb(error.__traceback__)
    theirs = [f for f in frames if not f.filename.startswith(_LIBRARIES)]
    if not theirs:  # raised on what the learner's code returned
        last = frames[-1]
        return f"in {Path(last.filename).name}, line {last.lineno}: {last.line}"
    frame, last = theirs[-1], frames[-1]
    where = f"at line {frame.lineno} of your code: {frame.line}"
    if last is not frame:
        library = f"{Path(last.filename).name}, line {last.lineno}"
        where += f"\n   (raised in {library}: {last.line})"
    return where


def _keep(part: str, fn: Callable, exercise: str) -> None:
    """Keep a passing answer, and say where; never raises."""
    try:
        path = answers.keep(part, fn, exercise=exercise)
        print(f"   Kept in {answers.shown(path)}: later chapters run your code.")
    except (OSError, TypeError) as error:  # no source (a lambda), no disk
        print(f"   (not kept: {error})")


def harnessed(runner: Callable, fn: Callable) -> Callable:
    """`runner(fn, *case.args)` as a function named like `fn`, whose
    `__wrapped__` is `fn`: a check can run the learner's function inside a
    harness (a fake clock, a merge and unmerge) and still keep the learner's
    own code when it passes."""

    def run(*args):
        return runner(fn, *args)

    run.__name__ = getattr(fn, "__name__", "your function")
    run.__wrapped__ = fn
    return run


def named_slips(
    slipped: Callable, table: Mapping[str, str], runner: Callable | None = None
) -> dict[str, Callable]:
    """A check's `mistakes` from a table {what the mistake is: slip}: each one
    `slipped(..., slip=slip)`, the reference written with that one slip, run
    inside `runner` (as `harnessed`) where the check runs the learner's so."""
    mistakes = {}
    for message, slip in table.items():
        wrong = functools.partial(slipped, slip=slip)
        mistakes[message] = wrong if runner is None else harnessed(runner, wrong)
    return mistakes


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """A reproducible standard normal tensor for check inputs."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def seeded(module: nn.Module, seed: int) -> nn.Module:
    """`module` with seeded weights near unit scale, in eval mode.

    Built on the meta device and filled from its own generator, so a check never
    draws from the notebook's global random state.
    """
    g = torch.Generator().manual_seed(seed)
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=g)
            if parameter.ndim > 1:  # convolutions: fan-in scaling
                parameter.copy_(noise * parameter[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.3 * noise)
            else:
                parameter.copy_(0.3 * noise)
    return module.eval()
