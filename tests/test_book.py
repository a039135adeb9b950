"""The book builds offline, with warnings as errors, from stored outputs."""

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

from tools import build_book, check_book

ROOT = Path(__file__).resolve().parents[1]


def copy_book(tmp_path: Path) -> Path:
    """The book's sources, and the README's picture its landing page shows."""
    book = tmp_path / "book"
    shutil.copytree(
        ROOT / "book", book, ignore=shutil.ignore_patterns("_build", "solutions")
    )
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return book


def test_book_builds_offline_with_every_chapter(tmp_path):
    book = copy_book(tmp_path)
    assert build_book.main(["--book", str(book)]) == 0
    html = book / "_build" / "html"
    for path in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        page = (html / "solutions" / f"{path.stem}.html").read_text()
        assert "<img" in page, f"{path.name}: stored figures are missing"
        if "# BEGIN SOLUTION" in path.read_text():
            assert "tag_hide-input" in page, f"{path.name}: solutions are not collapsed"
            assert "Solution to exercise" in page, f"{path.name}: toggles unnamed"
            assert "BEGIN SOLUTION" not in page, f"{path.name}: markers shown"
        if "<!-- BEGIN SOLUTION -->" in path.read_text():
            assert "sd-dropdown" in page, f"{path.name}: answers are not folded"
        outside = re.findall(r"<script[^>]*src=\"(https?:[^\"]*)", page)
        assert not outside, f"{path.name}: scripts from outside the site: {outside}"
        assert 'alt="../_images' not in page, f"{path.name}: a figure lacks alt text"
    assert (html / "_static" / "mathjax" / "tex-chtml.js").exists()


def test_toc_must_list_every_solution(tmp_path, capsys):
    book = copy_book(tmp_path)
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    assert build_book.main(["--book", str(book)]) == 1
    assert "does not list ['solutions/00_tour'" in capsys.readouterr().err


def test_numbered_answers_fold_one_dropdown_each():
    markdown = (
        "## Questions\n\n1. Why?\n2. How?\n\n<!-- BEGIN SOLUTION -->\n"
        "*Answers.* 1. Because of 2 things. 2. With $x_t$.\n<!-- END SOLUTION -->"
    )
    folded = build_book.fold_answers(markdown)
    assert ":::{dropdown} Answer to question 1\nBecause of 2 things.\n:::" in folded
    assert ":::{dropdown} Answer to question 2\nWith $x_t$.\n:::" in folded
    assert "SOLUTION" not in folded


def test_an_answer_under_its_question_stays_in_the_list_item():
    markdown = "1. Why?\n<!-- BEGIN SOLUTION -->\nBecause.\n<!-- END SOLUTION -->\n"
    folded = build_book.fold_answers(markdown)
    assert "   :::{dropdown} Answer\n   Because.\n   :::" in folded


def test_the_browser_check_names_what_a_reader_would_see_wrong():
    site = "http://127.0.0.1:8000/"
    page = SimpleNamespace(
        events=[
            {
                "method": "Network.requestWillBeSent",
                "params": {"requestId": "1", "request": {"url": site + "a.js"}},
            },
            {
                "method": "Network.requestWillBeSent",
                "params": {"requestId": "2", "request": {"url": "https://cdn.x/m.js"}},
            },
            {
                "method": "Runtime.consoleAPICalled",
                "params": {"type": "error", "args": [{"value": "boom"}]},
            },
        ]
    )
    report = {
        "raw": ["\\(x_t\\)"],
        "broken": ["../_images/a.png"],
        "figures": [
            {"src": "wide.png", "natural": 1400, "shown": 1000},
            {"src": "ok.png", "natural": 800, "shown": 800},
        ],
        "code": [
            {"scroll": 900, "client": 800, "line": "x = 1"},
            {"scroll": 800, "client": 800, "line": "y = 2"},
        ],
    }
    problems = check_book.problems_of(page, site, report)
    assert problems == [
        "requests a resource outside the site: https://cdn.x/m.js",
        "console error: boom",
        "formula left unrendered: '\\\\(x_t\\\\)'",
        "image failed to load: ../_images/a.png",
        "figure shown at 71% of its width (1000 of 1400 px): wide.png",
        "code cut off (900 px in a 800 px box): 'x = 1'",
    ]
