"""How long each chapter takes a learner: an estimate, printed as a table.

The estimate, as the README states it: reading the markdown at 150 words a
minute and the code at 40 lines a minute, 10 minutes for each exercise (each
`# BEGIN SOLUTION` region of the solution), plus the notebook's own run time
(from the stored outputs' execution timestamps), rounded up to 15 minutes. It
measures the text, not learners: a learner trial is what would.

Usage:
    python tools/chapter_times.py
"""

from __future__ import annotations

import math
import re
import sys
from datetime import datetime
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))

from notebooks import CODE_BEGIN  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS_PER_MINUTE = 150
CODE_LINES_PER_MINUTE = 40
MINUTES_PER_EXERCISE = 10


def run_seconds(nb) -> float:
    """Seconds from the first cell's start to the last cell's end, as stored."""
    times = []
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("execution", {})
        for key in ("iopub.execute_input", "shell.execute_reply"):
            if key in meta:
                times.append(datetime.fromisoformat(meta[key].replace("Z", "+00:00")))
    return (max(times) - min(times)).total_seconds() if times else 0.0


def minutes(path: Path) -> tuple[int, int, float]:
    """(estimated minutes, exercises, run seconds) of one solution notebook."""
    nb = nbformat.read(path, as_version=4)
    words = code = exercises = 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            words += len(re.findall(r"\w+", cell.source))
        elif cell.cell_type == "code":
            code += sum(1 for line in cell.source.splitlines() if line.strip())
            exercises += sum(
                1 for line in cell.source.splitlines() if CODE_BEGIN.match(line)
            )
    seconds = run_seconds(nb)
    total = words / WORDS_PER_MINUTE + code / CODE_LINES_PER_MINUTE
    total += MINUTES_PER_EXERCISE * exercises + seconds / 60
    return 15 * math.ceil(total / 15), exercises, seconds


def shown(total: int) -> str:
    hours, rest = divmod(total, 60)
    return (
        f"{rest} min"
        if not hours
        else f"{hours} h {rest:02d}"
        if rest
        else f"{hours} h"
    )


def main() -> int:
    grand = 0
    print("| chapter | exercises | notebook run | estimate |")
    print("|---|---:|---:|---:|")
    for path in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        total, exercises, seconds = minutes(path)
        grand += total
        print(f"| {path.stem} | {exercises} | {seconds:.0f} s | {shown(total)} |")
    print(f"| all | | | {shown(grand)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
