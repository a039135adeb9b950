"""The command line: what it writes and how it refuses bad arguments."""

import json
import subprocess
import sys

from PIL import Image
from safetensors.torch import load_file

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


def test_train_vae_writes_weights_and_a_record(tmp_path, capsys):
    out = tmp_path / "vae"
    flags = ["--steps", "3", "--batch-size", "2", "--eval-images", "4"]
    flags += ["--out", str(out), "--no-progress"]
    assert main(["train", "vae", *flags, "--bf16", "off"]) == 0
    assert "vae: " in capsys.readouterr().out
    record = json.loads((out / "vae.json").read_text())
    assert record["train_config"]["steps"] == 3
    assert record["command"].startswith("sdlearn train vae --steps 3 --batch-size 2")
    assert record["model_config"]["scaling_factor"] > 0
    assert {"loss", "mse", "kl", "held_out_psnr_db"} <= set(record["metrics"])
    state_dict = load_file(out / "vae.safetensors")
    assert "encoder.conv_in.weight" in state_dict
    # an interrupted run continues from its checkpoint; other settings are refused
    assert main(["train", "vae", *flags, "--bf16", "off", "--resume"]) == 0
    assert main(["train", "vae", *flags, "--lr", "1", "--resume"]) == 1
    assert "resume with the same ones" in capsys.readouterr().err
