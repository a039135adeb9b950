"""The command line: what it writes and how it refuses bad arguments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdlearn.cli import main
from sdlearn.pipeline_io import from_pretrained, save_pretrained
from tests.helpers import random_pipeline


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
    # what a UNet on these latents could draw at best: base and new shapes, and
    # the base shapes in the new style
    read_right = {f"{c}_read_right" for c in ("base", "diamond", "ring", "hollow")}
    assert read_right <= set(record["metrics"])
    state_dict = load_file(out / "vae.safetensors")
    assert "encoder.conv_in.weight" in state_dict
    # an interrupted run continues from its checkpoint; other settings are refused
    assert main(["train", "vae", *flags, "--bf16", "off", "--resume"]) == 0
    assert main(["train", "vae", *flags, "--lr", "1", "--resume"]) == 1
    assert "resume with the same ones" in capsys.readouterr().err
    # all shapes by default, the new ones too; or the base ones only: recorded
    # in the command that repeats the run
    assert "--shapes all" in record["command"] and record["shapes"] == "all"
    base_shapes = tmp_path / "vae_base"
    argv = ["train", "vae", "--steps", "2", "--batch-size", "2", "--eval-images", "2"]
    argv += ["--shapes", "base", "--out", str(base_shapes), "--no-progress"]
    assert main(argv) == 0
    record = json.loads((base_shapes / "vae.json").read_text())
    assert "--shapes base" in record["command"] and record["shapes"] == "base"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random pipeline saved as a diffusers folder."""
    return save_pretrained(random_pipeline(), tmp_path_factory.mktemp("pipe") / "sd")


def test_generate_writes_pngs_and_prints_their_paths(checkpoint, tmp_path, capsys):
    out = tmp_path / "red.png"
    flags = ["--checkpoint", str(checkpoint), "--steps", "3", "--no-progress"]
    assert main(["generate", "a red circle", *flags, "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out)]
    ddim = tmp_path / "ddim.png"
    assert (
        main(
            [
                "generate",
                "a red circle",
                *flags,
                "--scheduler",
                "ddim",
                "--out",
                str(ddim),
            ]
        )
        == 0
    )
    capsys.readouterr()
    with Image.open(out) as a, Image.open(ddim) as b:  # another sampler, same size
        assert a.size == b.size and a.tobytes() != b.tobytes()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (16, 16)
    # img2img and inpainting from files, two images
    mask = tmp_path / "mask.png"
    Image.new("L", (16, 16), 255).save(mask)
    two = tmp_path / "two.png"
    args = ["--image", str(out), "--strength", "0.5", "--mask", str(mask)]
    assert (
        main(
            [
                "generate",
                "a blue square",
                *flags,
                *args,
                "--num-images",
                "2",
                "--out",
                str(two),
            ]
        )
        == 0
    )
    paths = capsys.readouterr().out.split()
    assert paths == [str(tmp_path / "two_0.png"), str(tmp_path / "two_1.png")]


@pytest.mark.parametrize(
    ("sampler", "settings"),
    [
        (["euler"], {"_class_name": "EulerDiscreteScheduler"}),
        (
            ["euler", "--karras"],
            {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True},
        ),
        (["euler_a"], {"_class_name": "EulerAncestralDiscreteScheduler"}),
        (
            ["dpmpp_2m", "--karras"],
            {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
        ),
    ],
)
def test_generate_with_each_sampler(checkpoint, tmp_path, capsys, sampler, settings):
    """The CLI's image is the pipeline's with that sampler on the same schedule."""
    import torch

    from sdlearn.schedulers import with_sampler

    out = tmp_path / "out.png"
    flags = ["--checkpoint", str(checkpoint), "--steps", "4", "--no-progress"]
    argv = ["generate", "a red circle", *flags, "--scheduler", *sampler]
    assert main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out)]
    pipe = from_pretrained(checkpoint)
    pipe.progress = False
    settings = dict(settings)
    pipe.scheduler = with_sampler(
        pipe.scheduler, settings.pop("_class_name"), **settings
    )
    expected = pipe(
        "a red circle",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    with Image.open(out) as image:
        assert image.tobytes() == expected.tobytes()


def test_karras_needs_a_sampler_that_has_it(checkpoint, capsys):
    flags = ["--checkpoint", str(checkpoint), "--steps", "2", "--no-progress"]
    assert main(["generate", "a red circle", *flags, "--karras"]) == 1
    assert "--karras needs a sampler with Karras sigmas" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "expected a positive integer, got 0"),
        (["--image", "IMAGE", "--strength", "1.5"], r"strength in (0, 1]"),
        (["--height", "18", "--width", "16"], "multiples of"),
        (["--image", "missing.png"], "missing.png does not exist"),
        (["--mask", "IMAGE"], "--mask needs --image"),
    ],
)
def test_generate_refuses_bad_arguments_in_one_line(
    checkpoint, tmp_path, capsys, args, message
):
    image = tmp_path / "image.png"
    Image.new("RGB", (16, 16), "white").save(image)
    args = [str(image) if a == "IMAGE" else a for a in args]
    argv = ["generate", "a red circle", "--checkpoint", str(checkpoint)]
    argv += ["--steps", "2", "--out", str(tmp_path / "out.png"), *args]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own checks
        code = exit_.code
    stderr = capsys.readouterr().err
    assert code != 0
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 or "usage:" in stderr


def test_evaluate_prints_a_table_and_writes_a_grid(checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--seeds", "1"]
    argv += ["--steps", "2", "--guidance", "7.5", "1", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for row in ("single-object, guidance 7.5", "held-out combos, guidance 1"):
        assert f"| {row} |" in printed
    assert "one image, 2 steps with guidance" in printed
    with Image.open(out) as image:  # 2 guidance scales x 2 prompt sets, 30 each
        assert image.size == (30 * 16, 4 * 16)


def test_train_unet_takes_the_noise_schedule(tmp_path, capsys):
    out = tmp_path / "unet"
    flags = ["--steps", "2", "--batch-size", "4", "--images", "8", "--eval-images", "1"]
    flags += ["--num-train-timesteps", "100", "--beta-schedule", "linear"]
    assert main(["train", "unet", *flags, "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "unet.json").read_text())
    assert record["scheduler_config"]["num_train_timesteps"] == 100
    assert record["scheduler_config"]["beta_schedule"] == "linear"
    assert "--beta-schedule linear" in record["command"]
    assert "unet:" in capsys.readouterr().out


def test_train_textual_inversion_then_generate_with_the_embedding(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "ti"
    argv = ["train", "textual-inversion", "--steps", "2", "--batch-size", "2"]
    argv += ["--images", "4", "--eval-images", "0", "--token", "<dia>"]
    assert main([*argv, "--initializer", "square", "--out", str(out)]) == 0
    record = json.loads((out / "textual-inversion.json").read_text())
    assert record["token"] == "<dia>" and record["trainable_parameters"] == 64
    # the command that repeats the run quotes the token for the shell
    assert "--token '<dia>'" in record["command"]
    assert "wrote" in capsys.readouterr().out
    embedding = out / "learned_embeds.safetensors"
    pngs = {}
    for name, extra in {"base": [], "token": ["--embedding", str(embedding)]}.items():
        png = tmp_path / f"{name}.png"
        flags = ["--steps", "2", "--no-progress", "--out", str(png)]
        assert main(["generate", "a red <dia>", *flags, *extra]) == 0
        with Image.open(png) as image:
            pngs[name] = image.tobytes()
    assert pngs["base"] != pngs["token"]
    assert main(["generate", "a red <dia>", "--embedding", str(tmp_path / "no")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_train_unet_then_generate_from_its_run_folder(tmp_path, capsys):

    run = tmp_path / "runs" / "t"
    flags = ["--steps", "2", "--batch-size", "4", "--images", "8", "--eval-images", "0"]
    assert main(["train", "unet", *flags, "--out", str(run), "--no-progress"]) == 0
    png = tmp_path / "red.png"
    argv = ["generate", "a red circle", "--checkpoint", str(run), "--steps", "2"]
    assert main([*argv, "--no-progress", "--out", str(png)]) == 0
    with Image.open(png) as image:
        assert image.size == (64, 64)
    # the run's UNet with the VAE and text encoder it was trained on: the shipped
    assert f"unet from {run}" in capsys.readouterr().err
    pipe = from_pretrained(run)
    assert pipe.sources == {"vae": "shipped", "clip": "shipped", "unet": str(run)}
    trained = load_file(run / "unet.safetensors")
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in trained.items())


def test_a_unet_run_finds_the_parts_it_was_trained_on(tmp_path):
    import shutil

    from sdlearn.pipeline_io import tiny_part_folders
    from sdlearn.weights import SHIPPED_DIR

    # `sdlearn train all` leaves runs/vae, runs/clip, runs/unet; the UNet's
    # record says its parts are in the folder above it
    runs = tmp_path / "runs"
    for part in ("vae", "clip", "unet"):
        (runs / part).mkdir(parents=True)
        for suffix in (".safetensors", ".json"):
            shutil.copy(SHIPPED_DIR / f"{part}{suffix}", runs / part)
    record = json.loads((runs / "unet" / "unet.json").read_text())
    (runs / "unet" / "unet.json").write_text(json.dumps({**record, "parts_dir": ".."}))
    expected = {part: runs / "unet" / ".." / part for part in ("vae", "clip")}
    assert tiny_part_folders(runs / "unet") == {**expected, "unet": runs / "unet"}
    assert tiny_part_folders(runs) == {p: runs / p for p in ("vae", "clip", "unet")}
    shutil.rmtree(runs / "vae")
    with pytest.raises(FileNotFoundError, match="no vae.safetensors any more"):
        tiny_part_folders(runs / "unet")


def test_each_training_stage_has_its_own_help_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "lora", "--help"])
    assert exit_.value.code == 0
    lora = capsys.readouterr().out
    assert "--kl-weight" not in lora and "--beta-schedule" not in lora
    assert "--rank RANK" in lora and "(default: 8)" in lora  # the rank
    assert "--steps STEPS" in lora and "(default: 1200)" in lora
    # the recipe the shipped adapter was made with
    assert "lora-diamond:\n    sdlearn train lora --steps" in lora
    with pytest.raises(SystemExit):
        main(["train", "vae", "--help"])
    vae = capsys.readouterr().out
    assert "--kl-weight" in vae and "(default: 1e-06)" in vae
    assert "--rank" not in vae and "--concept" not in vae
    # an option of another stage is refused, not ignored
    with pytest.raises(SystemExit):
        main(["train", "lora", "--kl-weight", "1"])
    assert "unrecognized arguments: --kl-weight" in capsys.readouterr().err


def test_ship_is_refused_where_the_package_is_installed(monkeypatch, tmp_path, capsys):
    from sdlearn import stages
    from sdlearn.weights import SHIPPED_DIR

    before = (SHIPPED_DIR / "clip.safetensors").read_bytes()
    monkeypatch.setattr(stages, "source_checkout", lambda: None)
    argv = ["train", "clip", "--steps", "1", "--out", str(tmp_path / "c"), "--ship"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "only a maintainer does, in a source checkout" in err
    assert str(SHIPPED_DIR / "clip.safetensors") in err
    assert not (tmp_path / "c").exists()  # refused before any training
    with pytest.raises(ValueError, match="lora-diamond.safetensors"):
        stages.check_can_ship([Path("lora-diamond.safetensors")])
    assert (SHIPPED_DIR / "clip.safetensors").read_bytes() == before


def test_generate_chooses_device_and_dtype(tmp_path, capsys):
    out = tmp_path / "bf16.png"
    argv = ["generate", "a red circle", "--steps", "2", "--no-progress"]
    assert main([*argv, "--dtype", "bfloat16", "--out", str(out)]) == 0
    assert out.is_file()
    assert main([*argv, "--dtype", "float16", "--device", "cpu"]) == 1
    assert "float16 on a CPU is slow or unsupported" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*argv, "--device", "cuda"]) == 1
        err = capsys.readouterr().err
        assert "device cuda was asked for, but this machine has only" in err


def test_shipped_fine_tunes_by_name(tmp_path, capsys):
    argv = ["generate", "a red diamond", "--steps", "2", "--no-progress"]
    assert main([*argv, "--lora", "diamond", "--out", str(tmp_path / "l.png")]) == 0
    db = ["--checkpoint", "dreambooth-ring", "--out", str(tmp_path / "d.png")]
    assert main([*argv, *db]) == 0
    assert main([*argv, "--lora", "nothing"]) == 1
    assert "no shipped lora is named so (shipped: diamond)" in capsys.readouterr().err
    assert main([*argv, "--checkpoint", "nothing"]) == 1
    assert "dreambooth-ring" in capsys.readouterr().err


def test_generate_fast_says_what_it_turned_on(tmp_path, capsys):
    out = tmp_path / "fast.png"
    argv = ["generate", "a red circle", "--no-progress", "--out", str(out)]
    assert main([*argv, "--fast", "--dtype", "float32", "--steps", "3"]) == 0
    assert out.is_file()
    err = capsys.readouterr().err
    assert "fast: weights in float32; DDIMScheduler, 3 steps" in err  # --steps
    assert "50% of the outermost tokens merged" in err
    assert main([*argv, "--compile"]) == 1
    assert "--compile needs --fast" in capsys.readouterr().err
    assert main([*argv, "--merge", "0.25"]) == 1
    assert "--merge needs --fast" in capsys.readouterr().err
    fast = [*argv, "--fast", "--dtype", "float32", "--steps", "2"]
    assert main([*fast, "--merge", "0"]) == 0
    assert "merged" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*fast, "--merge", "0.9"])
    assert "expected 0 to 0.75, got 0.9" in capsys.readouterr().err
