"""The unsolved chapters, run as a learner first opens them.

Each chapter runs top to bottom with every exercise untouched: the package's
version stands in for each, so the chapter reaches its end. And nothing it
prints gives an answer away: no line of an exercise's solution may appear in
its outputs (a hint printed before any try, a listing of the answer, a check
that shows the expected code).

These run every chapter (a few minutes), so they are marked `notebooks` and
run by `make test-notebooks`, not by `make test-fast`.
"""

import re
import shutil
from pathlib import Path

import nbformat
import pytest

from tools.notebooks import CODE_BEGIN, CODE_END, output_text

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
# solution lines too short or too common to give anything away
TRIVIAL = re.compile(r"^(return|pass|else:|\)|\]|\}|[\w.]+|#.*|.{0,11})$")

pytestmark = pytest.mark.notebooks


def solution_lines(path: Path) -> set[str]:
    """The lines of every exercise's answer in a solution notebook, stripped,
    without the ones too short or too common to tell anything."""
    lines, inside = set(), False
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            if CODE_BEGIN.match(line):
                inside = True
            elif CODE_END.match(line):
                inside = False
            elif inside and not TRIVIAL.match(line.strip()):
                lines.add(line.strip())
    return lines


def spoilers(outputs: str, answers: set[str]) -> list[str]:
    """The answer lines that `outputs` shows."""
    return sorted(line for line in answers if line in outputs)


def test_spoilers_are_found():
    answers = {"weights = scores.softmax(dim=-1)", "return weights @ v"}
    assert spoilers("Hint: weights = scores.softmax(dim=-1)\n", answers) == [
        "weights = scores.softmax(dim=-1)"
    ]
    assert spoilers("✅ Exercise 01.1 (attention) matches", answers) == []
    assert not TRIVIAL.match("scores = q @ k.transpose(-2, -1)")
    assert TRIVIAL.match("return x") and TRIVIAL.match(")")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_an_unsolved_chapter_runs_to_the_end_and_gives_nothing_away(
    chapter, tmp_path, monkeypatch
):
    from nbclient import NotebookClient

    # a copy in a folder of its own: what the chapter writes (runs/) is left there
    work = tmp_path / "chapters"
    work.mkdir()
    shutil.copy(chapter, work / chapter.name)
    monkeypatch.setenv("SDLEARN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's sdlearn
    nb = nbformat.read(work / chapter.name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": work}}
    ).execute()  # raises CellExecutionError where a cell fails
    shown = "\n".join(output_text(c) for c in nb.cells if c.cell_type == "code")
    answers = solution_lines(ROOT / "solutions" / chapter.name)
    assert spoilers(shown, answers) == [], f"{chapter.name} shows answer lines"
