"""The one-source notebook generator: package -> solutions -> chapters."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from tools import notebooks
from tools.notebooks import NotebookError, build_chapter, build_solution

ROOT = Path(__file__).resolve().parents[1]


def test_repository_has_no_drift():
    assert notebooks.drift(ROOT) == []


@pytest.fixture
def repo_copy(tmp_path):
    for folder in ("sdlearn", "solutions", "chapters"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    return tmp_path


def test_check_fails_when_a_package_line_changes(repo_copy, capsys):
    module = repo_copy / "sdlearn" / "shapes.py"
    text = module.read_text()
    line = '    grid = rearrange(images, "(r c) h w ch -> (r h) (c w) ch", r=rows)\n'
    assert line in text
    module.write_text(text.replace(line, line + "    grid = grid.copy()\n"))

    assert notebooks.main(["check", "--root", str(repo_copy)]) == 1
    err = capsys.readouterr().err
    assert "solutions/00_tour.ipynb cell" in err
    assert "sdlearn/shapes.py::image_grid" in err
    assert "chapters/00_tour.ipynb cell" in err

    # regenerating brings both forms back in line
    assert notebooks.main(["build", "--root", str(repo_copy)]) == 0
    assert notebooks.main(["check", "--root", str(repo_copy)]) == 0


def test_check_fails_when_a_chapter_is_edited_by_hand(repo_copy, capsys):
    path = repo_copy / "chapters" / "00_tour.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source += "\nprint('edited')"
    nbformat.write(nb, path)
    assert notebooks.main(["check", "--root", str(repo_copy)]) == 1
    assert "chapters/00_tour.ipynb cell 1 differs" in capsys.readouterr().err


def _exercise_notebook(package_header="# sdlearn/shapes.py::image_grid"):
    nb = new_notebook()
    solved = new_code_cell(
        "def f(x):\n    y = 1\n"
        "    # BEGIN SOLUTION\n    return x + y\n    # END SOLUTION\n"
        "\n\ncheck(f)",
        execution_count=3,
        outputs=[new_output("stream", name="stdout", text="✅ passed\n")],
    )
    nb.cells = [
        new_markdown_cell("Why?\n<!-- BEGIN SOLUTION -->Because.<!-- END SOLUTION -->"),
        solved,
        new_code_cell(package_header + "\nstale text"),
    ]
    return nb


def test_solutions_get_package_code_and_collapsed_answers():
    solution = build_solution(_exercise_notebook(), ROOT, "nb")
    assert "hide-input" in solution.cells[1].metadata["tags"]
    source = solution.cells[2].source
    assert source.startswith("# sdlearn/shapes.py::image_grid\ndef image_grid(")
    assert "stale text" not in source
    assert source.split("\n", 1)[1] in (ROOT / "sdlearn" / "shapes.py").read_text()


def test_chapters_stub_answers_and_clear_outputs():
    chapter = build_chapter(build_solution(_exercise_notebook(), ROOT, "nb"))
    code = chapter.cells[1]
    assert code.source == (
        "def f(x):\n    y = 1\n"
        "    # TODO: your code here\n    raise NotImplementedError\n"
        "\n\ncheck(f)"
    )
    assert code.outputs == [] and code.execution_count is None
    assert "tags" not in code.metadata
    assert chapter.cells[0].source == "Why?\n*Your answer here.*"
    assert "Because" not in nbformat.writes(chapter)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("# BEGIN SOLUTION\nx = 1\n# END SOLUTION", "inside a function"),
        ("def f():\n    # BEGIN SOLUTION\n    pass", "never closed"),
        ("def f():\n    pass\n    # END SOLUTION", "without a begin"),
    ],
)
def test_malformed_solution_regions_are_refused(source, message):
    nb = new_notebook()
    nb.cells = [new_code_cell(source)]
    with pytest.raises(NotebookError, match=f"nb cell 0: .*{message}"):
        build_solution(nb, ROOT, "nb")


def test_unknown_package_objects_are_named():
    with pytest.raises(NotebookError, match="nb cell 2: sdlearn/shapes.py has no"):
        build_solution(_exercise_notebook("# sdlearn/shapes.py::nothing"), ROOT, "nb")
    with pytest.raises(NotebookError, match="sdlearn/nowhere.py does not exist"):
        build_solution(_exercise_notebook("# sdlearn/nowhere.py::f"), ROOT, "nb")


def test_every_chapter_leaves_its_exercises_unsolved():
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        text = path.read_text()
        assert "BEGIN SOLUTION" not in text, path
        solution = (ROOT / "solutions" / path.name).read_text()
        assert solution.count("# BEGIN SOLUTION") == text.count(
            "raise NotImplementedError"
        )


def test_stored_outputs_print_no_floating_point_noise():
    # a difference's digits change with the CPU, the threads and the versions:
    # a chapter prints the bound it asserts, so nbval compares the same text
    # on every machine
    assert notebooks.noisy_outputs(ROOT) == []


@pytest.mark.parametrize(
    "line",
    [
        "text to image: max abs difference 7e-06 (pixels in [0, 1])",
        "max |merged - unmerged output| = 9.54e-07",
        "max |DDPM - Euler ancestral| = 5.7e-06 (latents of std 1.11)",
        "   posterior mean: max abs difference 7.6e-06",
        "max abs error 0.00003",
    ],
)
def test_noise_is_found(line):
    assert notebooks.noise_in(f"a line before\n{line}\n") == [line.strip()]


@pytest.mark.parametrize(
    "line",
    [
        "text to image: every pixel within 1e-4 of diffusers' (pixels in [0, 1])",
        "causal: equal within float32 tolerance (atol 1e-5, rtol 1.3e-6)",
        "wrong values: max abs error 4.43 (allowed 1e-05 + 1.3e-06 * |expected|)",
        "training: 2000 steps of 16 images, lr 0.002, KL weight 1e-06, 9 min",
        "50 steps, every sample: max abs difference 0.0",
        "max abs difference below 1e-05",
    ],
)
def test_bounds_and_other_numbers_are_not_noise(line):
    assert notebooks.noise_in(line) == []


def test_check_names_a_noisy_output(repo_copy, capsys):
    path = repo_copy / "solutions" / "00_tour.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.outputs = [new_output("stream", name="stdout", text="max abs diff: 6e-06\n")]
    nbformat.write(nb, path)
    assert notebooks.main(["check", "--root", str(repo_copy)]) == 1
    err = capsys.readouterr().err
    assert "solutions/00_tour.ipynb cell" in err and "6e-06" in err


def test_a_listing_can_show_one_method():
    # the constructor alone, when the learner writes the forward
    nb = build_solution(
        _exercise_notebook("# sdlearn/attention.py::Attention.__init__"), ROOT, "nb"
    )
    listing = nb.cells[2].source
    assert listing.splitlines()[1].startswith("def __init__(")
    assert "def forward(" not in listing
    with pytest.raises(NotebookError, match="has no method in Attention 'nothing'"):
        build_solution(
            _exercise_notebook("# sdlearn/attention.py::Attention.nothing"), ROOT, "nb"
        )


def test_contributing_shows_the_lines_each_chapter_asks_for(repo_copy, capsys):
    shutil.copy(ROOT / "CONTRIBUTING.md", repo_copy / "CONTRIBUTING.md")
    assert notebooks.lines_drift(repo_copy) == []
    written, listed = notebooks.course_lines(repo_copy)["01_attention"]
    assert written > 0 and listed > 0
    # a chapter that asks for one line more makes the table stale
    path = repo_copy / "solutions" / "01_attention.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "# END SOLUTION" in c.source)
    cell.source = cell.source.replace("# END SOLUTION", "x = 1\n    # END SOLUTION", 1)
    nbformat.write(nb, path)
    assert notebooks.course_lines(repo_copy)["01_attention"][0] == written + 1
    assert notebooks.lines_drift(repo_copy) == [
        "CONTRIBUTING.md's table of lines is stale"
    ]


def test_every_check_passes_in_the_stored_solutions():
    # nbval compares a run with the stored outputs: a solution whose check
    # failed when it was stored would fail the same way and still match
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            for output in cell.get("outputs", []):
                text = output.get("text", "")
                assert "❌" not in text and "⏳" not in text, (path.name, i, text)
