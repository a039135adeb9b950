"""Draw the README's picture with the shipped tiny model.

Top: images the shipped tiny Stable Diffusion draws, each under its prompt; the
last three are colour-shape pairs it never saw in training. Bottom: one image
appearing step by step (the decoded guess of the clean image at some steps).
Also writes the book's small site icon from the same model.

Usage:
    python tools/make_readme_figure.py [--out docs/sdlearn.png]
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from sdlearn.pipeline import StableDiffusionPipeline
from sdlearn.pipeline_io import from_pretrained
from sdlearn.shapes import HELD_OUT, to_image

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a large red circle on the left",
    "a small blue square at the top",
    "a yellow triangle on the right",
    "a large green square at the bottom",
    "a small purple triangle in the center",
    # the held-out pairs: never together in the training captions
    "a large green triangle on the right",
    "a purple circle at the top",
    "an orange square on the left",
]
FILM_PROMPT = "a large orange circle at the bottom"
FILM_STEPS = (0, 4, 8, 12, 16, 24, 49)  # of 50 DDPM steps
SEED = 0


def held_out(prompt: str) -> bool:
    return any(f"{color} {shape}" in prompt for color, shape in HELD_OUT)


def draw(pipe: StableDiffusionPipeline) -> plt.Figure:
    generator = torch.Generator().manual_seed(SEED)
    images = pipe(PROMPTS, generator=generator, output_type="pt").images
    frames = {}

    def keep(step, timestep, latents, pred_original_sample):
        if step in FILM_STEPS:
            frames[step] = pipe.decode_latents(pred_original_sample)[0]

    pipe(FILM_PROMPT, generator=torch.Generator().manual_seed(SEED), callback=keep)

    fig = plt.figure(figsize=(8.4, 3.5), dpi=100)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.3, 1])
    top.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.3, wspace=0.08)
    bottom.subplots_adjust(left=0.06, right=0.94, top=0.84, bottom=0.12, wspace=0.08)
    axes = top.subplots(1, len(PROMPTS))
    for ax, prompt, image in zip(axes, PROMPTS, images, strict=True):
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        color = "#b45309" if held_out(prompt) else "black"
        ax.set_xlabel(textwrap.fill(prompt, 14), fontsize=7.5, color=color)
        ax.set_xticks([])
        ax.set_yticks([])
    top.suptitle(
        "Prompts in, 64x64 images out; in orange, colour-shape pairs it never saw",
        fontsize=9.5,
    )
    axes = bottom.subplots(1, len(FILM_STEPS))
    for ax, step in zip(axes, FILM_STEPS, strict=True):
        ax.imshow(to_image(frames[step]), interpolation="nearest")
        ax.set_xlabel(f"step {step + 1}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    bottom.suptitle(
        f'"{FILM_PROMPT}": the model\'s guess of the final image at steps 1 to 50',
        fontsize=9.5,
    )
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "sdlearn.png")
    parser.add_argument(
        "--icon", type=Path, default=ROOT / "book" / "_static" / "favicon.png"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    pipe = from_pretrained()
    fig = draw(pipe)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(
        args.out,
        dpi=100,
        bbox_inches="tight",
        pad_inches=0.05,
        pil_kwargs={"optimize": True},
    )
    icon = pipe(
        "a large red circle in the center",
        generator=torch.Generator().manual_seed(SEED),
        height=64,
        width=64,
    ).images[0]
    icon.resize((32, 32)).save(args.icon, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB) and {args.icon}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
