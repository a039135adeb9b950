"""Build the book offline from the solution notebooks' stored outputs.

Copies solutions/ into book/solutions/ (ignored by git), checks that the table
of contents lists every solution notebook, and runs jupyter-book 1.x with
warnings as errors. The HTML lands in book/_build/html.

The copies are made for reading; the notebooks themselves are not changed:
- a solution's toggle says "Solution to exercise NN.M", and the
  `# BEGIN SOLUTION` / `# END SOLUTION` lines are left out of the copy;
- written answers fold into dropdowns, one per question where they are numbered;
- every figure gets alt text: its title as the code sets it, or else the first
  sentence of the text above it.

Usage:
    python -m tools.build_book [--book DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from tools.notebooks import CODE_BEGIN, CODE_END, MD_SOLUTION, SOLUTION_TAG

ROOT = Path(__file__).resolve().parents[1]
EXERCISE = re.compile(r"^#+ Exercise (\d+\.\d+)", flags=re.MULTILINE)
# the first string literal given to a figure's title, f-strings included
TITLE = re.compile(
    r"""(?:suptitle|set_title|plt\.title|title=)\(?\s*f?("[^"\n]+"|'[^'\n]+')"""
)
ANSWERS = "*Answers.*"


def plain(text: str) -> str:
    """Text for an alt attribute: no f-string fields, markdown or line breaks."""
    text = re.sub(r"\{[^{}]*\}", "…", text).replace("\\n", " ")
    text = re.sub(r"[`*$\\]", "", text)
    return " ".join(text.split())


def figure_alt(source: str, text_above: str) -> str:
    """What a figure shows: the code's title for it, or the text above it."""
    titles = [plain(t[1:-1]) for t in TITLE.findall(source)]
    titles = [t for t in titles if len(t.replace("…", "")) > 8]
    if titles:
        return max(titles, key=len)
    prose = [line for line in text_above.splitlines() if not line.startswith("#")]
    sentence = re.split(r"(?<=[.:!?])\s", plain(" ".join(prose)), maxsplit=1)[0]
    return sentence[:200] or "a figure made by the code above"


def numbered_answers(body: str) -> list[str]:
    """Splits "*Answers.* 1. ... 2. ..." into its answers; [body] otherwise."""
    if not body.startswith(ANSWERS + " 1. "):
        return [body]
    rest = body[len(ANSWERS + " 1. ") :]
    answers = []
    k = 2
    while match := re.search(rf"(?<=[.?!)]) {k}\. ", rest):
        answers.append(rest[: match.start()])
        rest = rest[match.end() :]
        k += 1
    return [*answers, rest]


def fold_answers(markdown: str) -> str:
    """Each written answer becomes a dropdown, indented into its list item."""

    def dropdown(match: re.Match) -> str:
        # an answer right under its question (no blank line) stays in its item
        before = markdown[: match.start()]
        item = before.endswith("\n") and not before.endswith("\n\n")
        item = item and re.match(r"\d+\. ", before[:-1].rsplit("\n", 1)[-1])
        indent = "   " if item else ""
        body = match.group(0).removeprefix("<!-- BEGIN SOLUTION -->")
        body = body.removesuffix("<!-- END SOLUTION -->").strip()
        answers = numbered_answers(body)
        blocks = []
        for k, answer in enumerate(answers, start=1):
            title = f"Answer to question {k}" if len(answers) > 1 else "Answer"
            lines = [f":::{{dropdown}} {title}", *answer.strip().splitlines(), ":::"]
            blocks.append("\n".join(indent + line if line else line for line in lines))
        return "\n\n" + "\n\n".join(blocks) + "\n"

    return MD_SOLUTION.sub(dropdown, markdown)


def for_reading(nb) -> None:
    """Edits a copy of a solution notebook for the book (see the module's doc)."""
    exercise, text_above = None, ""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            exercises = EXERCISE.findall(cell.source)
            exercise = exercises[-1] if exercises else exercise
            text_above = cell.source
            cell.source = fold_answers(cell.source)
            continue
        options = {}
        if SOLUTION_TAG in cell.metadata.get("tags", []):
            lines = cell.source.splitlines()
            markers = [
                line for line in lines if CODE_BEGIN.match(line) or CODE_END.match(line)
            ]
            cell.source = "\n".join(line for line in lines if line not in markers)
            name = f"Solution to exercise {exercise}" if exercise else "Solution"
            options["code_prompt_show"] = name
            options["code_prompt_hide"] = f"Hide: {name[0].lower()}{name[1:]}"
        if any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])):
            options["image"] = {"alt": figure_alt(cell.source, text_above)}
        if options:
            cell.metadata["mystnb"] = options


def listed_in_toc(book: Path) -> set[str]:
    """The `file:` entries of the book's _toc.yml."""
    entries = set()
    for line in (book / "_toc.yml").read_text().splitlines():
        line = line.strip().removeprefix("- ")
        if line.startswith("file:"):
            entries.add(line.removeprefix("file:").strip())
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book", type=Path, default=ROOT / "book")
    args = parser.parse_args(argv)
    book: Path = args.book

    solutions = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
    missing = {f"solutions/{p.stem}" for p in solutions} - listed_in_toc(book)
    if missing:
        print(f"book/_toc.yml does not list {sorted(missing)}", file=sys.stderr)
        return 1
    target = book / "solutions"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for path in solutions:
        nb = nbformat.read(path, as_version=4)
        for_reading(nb)
        nbformat.write(nb, target / path.name)
    # a fresh build: no file of an earlier one (a removed script) stays behind
    shutil.rmtree(book / "_build", ignore_errors=True)

    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [
        str(jupyter_book),
        "build",
        str(book),
        "--warningiserror",
        "--keep-going",
    ]
    result = subprocess.run(command)
    if result.returncode == 0:
        print(f"book: {book / '_build' / 'html' / 'index.html'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
