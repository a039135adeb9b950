"""The learner's answers, kept: what a passing exercise wrote runs again later.

When a check passes, it keeps the learner's function: its source goes into a
file of the learner's own, one per package module, `~/.sdlearn/answers/
attention.py` for chapter 01's answers (under the folder `SDLEARN_HOME` names,
if it is set). Each answer is kept under the part of the package it stands for,
"attention:Attention.forward", so that a later chapter asks for the part, not
for an exercise number. That file is not in the repository and not in the
installed package, and it survives a kernel restart. Where an answer is kept and
still passes its check, later chapters run it; where it is not, the package's
version stands in, with a one-line notice, so that a chapter always runs to the
end.

This is nbdev's export and d2l's `#@save`, with a check in front: only code
that gave the reference's numbers is kept.

The file is the learner's own code, read back with `exec`, never unpickled.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import re
import textwrap
import types
from collections.abc import Callable
from pathlib import Path

from torch import nn

# what every kept file starts with: the names exercises use
HEADER = '''"""Your answers to the sdlearn exercises, kept when their checks passed.

Later chapters run this code. Change it in the chapter's notebook: a check that
passes again replaces its block here.
"""

from __future__ import annotations  # the answers' type hints are never evaluated

import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn
'''
# one kept answer: "# >>> Attention.forward (Exercise 01.5): attention_forward"
BLOCK = re.compile(
    r"^# >>> (?P<part>[\w.]+) \((?P<exercise>[^)]*)\): (?P<name>\w+)\n"
    r"(?P<source>.*?)^# <<< (?P=part)\n",
    flags=re.S | re.M,
)
PART = re.compile(r"(?P<module>\w+):(?P<part>\w+(?:\.\w+)?)")


def home() -> Path:
    """The folder of the kept answers: $SDLEARN_HOME/answers, by default
    ~/.sdlearn/answers."""
    root = os.environ.get("SDLEARN_HOME") or Path.home() / ".sdlearn"
    return Path(root) / "answers"


def _split(part: str) -> tuple[Path, str]:
    """ "attention:Attention.forward" -> (the answers file, "Attention.forward")."""
    match = PART.fullmatch(part)
    if match is None:
        raise ValueError(
            f"expected a part such as 'attention:Attention.forward' (the package "
            f"module, a colon, the function or Class.method), got {part!r}"
        )
    return home() / f"{match['module']}.py", match["part"]


def shown(path: Path) -> str:
    """A kept file's path as a learner reads it, the same on every machine:
    "~/.sdlearn/answers/attention.py", or "$SDLEARN_HOME/answers/..."."""
    root = "$SDLEARN_HOME" if os.environ.get("SDLEARN_HOME") else "~/.sdlearn"
    return f"{root}/answers/{path.name}"


# the solutions' answer markers (tools/notebooks.py), which a kept answer leaves out
MARKER = re.compile(r"^\s*# (BEGIN|END) SOLUTION\s*$")


def source_of(fn: Callable) -> str:
    """The source of a function the learner wrote, dedented, without the
    solutions' answer markers."""
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
    return "\n".join(line for line in source.splitlines() if not MARKER.match(line))


def _without(text: str, name: str) -> str:
    text = BLOCK.sub(lambda m: "" if m["part"] == name else m[0], text)
    return re.sub(r"\n{4,}", "\n\n\n", text)  # no gap left behind


def keep(part: str, fn: Callable, exercise: str = "") -> Path:
    """Write `fn`'s source into the learner's answers file, replacing the block
    an earlier answer for the same part left there.

    Args:
        part: what it is in the package: "attention:Attention.forward" (a
            method, written as a function taking `self`) or
            "attention:scaled_dot_product_attention".
        fn: the learner's function.
        exercise: "Exercise 01.5", as the chapter numbers it.

    Returns:
        the file written.
    """
    path, name = _split(part)
    text = _without(path.read_text() if path.exists() else HEADER, name)
    block = f"# >>> {name} ({exercise}): {fn.__name__}\n{source_of(fn).rstrip()}"
    text = text.rstrip("\n") + f"\n\n\n{block}\n# <<< {name}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a crash never leaves half a file
    return path


def forget(part: str) -> bool:
    """Remove a kept answer (a check that fails again calls this); true when
    there was one."""
    path, name = _split(part)
    if not path.exists():
        return False
    text = path.read_text()
    path.write_text(_without(text, name))
    return any(m["part"] == name for m in BLOCK.finditer(text))


# answers files whose package module is not sdlearn.<name>
PACKAGE_MODULES = {
    "ddpm": "sdlearn.schedulers.ddpm",
    "schedule": "sdlearn.schedulers.common",
    "ddim": "sdlearn.schedulers.ddim",
    "euler": "sdlearn.schedulers.euler",
    "euler_ancestral": "sdlearn.schedulers.euler_ancestral",
    "sigmas": "sdlearn.schedulers.sigmas",
    "dpm_solver": "sdlearn.schedulers.dpm_solver",
    "sigma_sampling": "sdlearn.schedulers.sigma_sampling",
}


def kept(module: str) -> dict[str, Callable]:
    """The learner's kept functions of package module `module`, by part
    ("Attention.forward").

    The file runs as a module of its own, on top of the package module's
    names: one answer can call another ("Attention.forward" calls the kept
    attention function), and where the other is not kept, the package's stands
    in. A file that no longer runs (a line edited by hand) is reported, and
    nothing of it is used.
    """
    path = home() / f"{module}.py"
    if not path.exists():
        return {}
    text = path.read_text()
    namespace = types.ModuleType(f"sdlearn_answers_{module}")
    try:
        name = PACKAGE_MODULES.get(module, f"sdlearn.{module}")
        package = vars(importlib.import_module(name))
    except ModuleNotFoundError:  # answers of no package module: on their own
        package = {}
    namespace.__dict__.update({k: v for k, v in package.items() if k[:2] != "__"})
    namespace.__file__ = str(path)
    found = {}
    try:
        # the header, then block by block: two parts whose functions share a
        # name (two `forward`s) each keep their own
        exec(compile(BLOCK.sub("", text), str(path), "exec"), namespace.__dict__)
        for block in BLOCK.finditer(text):
            # padded to its place in the file, so that its line numbers (in a
            # traceback, in inspect.getsource) are the file's
            padded = "\n" * text[: block.start("source")].count("\n") + block["source"]
            exec(compile(padded, str(path), "exec"), namespace.__dict__)
            found[block["part"]] = namespace.__dict__.get(block["name"])
    except Exception as error:  # the learner's file: anything can be wrong in it
        print(
            f"ℹ️ {shown(path)} does not run ({type(error).__name__}: {error}); "
            "none of its answers are used"
        )
        return {}
    return {part: fn for part, fn in found.items() if fn is not None}


def use(
    part: str,
    fallback: Callable,
    check: Callable[[Callable], object] | None = None,
) -> Callable:
    """The learner's answer for `part` if it is kept and passes `check` again,
    else `fallback`, the package's version; a one-line notice says which.

    Args:
        part: "attention:Attention.forward".
        fallback: the package's function (for a method, the class's forward).
        check: the exercise's check, run again quietly on the kept code.

    Returns:
        the function to use; `is_learners(fn)` tells which it is.
    """
    path, name = _split(part)
    answer = kept(PART.fullmatch(part)["module"]).get(name)
    if answer is None:
        print(f"ℹ️ {name}: no answer of yours is kept; the package's stands in")
        return fallback
    if check is not None:
        with contextlib.redirect_stdout(io.StringIO()) as printed, replaying():
            passed = bool(check(answer))
        if not passed:
            # the check's verdict says why: often a name the notebook had and
            # the answers file has not
            why = next(
                (line for line in printed.getvalue().splitlines() if "❌" in line),
                "",
            )
            print(
                f"ℹ️ {name}: your kept answer in {shown(path)} fails its check "
                f"now; the package's stands in. {why[:300]}"
            )
            return fallback
    answer.__sdlearn_learners__ = True
    print(f"{YOURS} {name}: your answer runs from here on")
    return answer


# the start of use's notice when the learner's answer is used
YOURS = "▶"
_REPLAYING = [False]


@contextlib.contextmanager
def replaying():
    """While a kept answer is checked again, the check neither keeps nor
    forgets anything: the file stays as the learner's own checks left it."""
    _REPLAYING[0] = True
    try:
        yield
    finally:
        _REPLAYING[0] = False


def is_replaying() -> bool:
    """Whether a check now runs a kept answer again (see `replaying`)."""
    return _REPLAYING[0]


def is_learners(fn: Callable) -> bool:
    """Whether `use` returned the learner's code (not the package's)."""
    return getattr(fn, "__sdlearn_learners__", False)


def install_forward(model: nn.Module, cls: type, forward: Callable) -> int:
    """Make every `cls` module inside `model` run `forward` (a function taking
    `self`, as the learner wrote it), on this model only: the package's class
    is not touched.

    Returns:
        how many modules now run it.
    """
    count = 0
    for module in model.modules():
        if type(module) is cls:
            module.forward = types.MethodType(forward, module)
            count += 1
    return count
