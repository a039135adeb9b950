"""The book builds offline, with warnings as errors, from stored outputs."""

import shutil
from pathlib import Path

from tools import build_book

ROOT = Path(__file__).resolve().parents[1]


def test_book_builds_offline_with_every_chapter(tmp_path):
    book = tmp_path / "book"
    shutil.copytree(
        ROOT / "book", book, ignore=shutil.ignore_patterns("_build", "solutions")
    )
    assert build_book.main(["--book", str(book)]) == 0
    html = book / "_build" / "html"
    for path in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        page = (html / "solutions" / f"{path.stem}.html").read_text()
        assert "<img" in page, f"{path.name}: stored figures are missing"
        if "# BEGIN SOLUTION" in path.read_text():
            assert "tag_hide-input" in page, f"{path.name}: solutions are not collapsed"


def test_toc_must_list_every_solution(tmp_path, capsys):
    book = tmp_path / "book"
    shutil.copytree(
        ROOT / "book", book, ignore=shutil.ignore_patterns("_build", "solutions")
    )
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    assert build_book.main(["--book", str(book)]) == 1
    assert "does not list ['solutions/00_tour'" in capsys.readouterr().err
