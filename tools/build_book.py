"""Build the book offline from the solution notebooks' stored outputs.

Copies solutions/ into book/solutions/ (ignored by git), checks that the table
of contents lists every solution notebook, and runs jupyter-book 1.x with
warnings as errors. The HTML lands in book/_build/html.

Usage:
    python tools/build_book.py [--book DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
        shutil.copy2(path, target / path.name)

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
