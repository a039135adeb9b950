"""The command line: what it writes and how it refuses bad arguments."""

import subprocess
import sys

from PIL import Image

from sdlearn.cli import main


def test_tour_writes_a_grid_png(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["tour", "--out", str(out), "--rows", "2", "--cols", "3"]) == 0
    assert "text encoder" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > image.height


def test_bad_arguments_exit_non_zero_with_a_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sdlearn.cli", "tour", "--rows", "0"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "expected a positive integer, got 0" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "sdlearn.cli", "nonsense"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "invalid choice" in result.stderr
