"""Chapter 00: a map of Stable Diffusion and the course's shape legend."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# One legend for every shape comment in the course's code and chapters.
SHAPE_LEGEND: dict[str, str] = {
    "B": "batch: images (or prompts) processed together",
    "C": "channels: 3 for RGB pixels, 4 for SD latents, 320-1280 inside the UNet",
    "H, W": "height and width (of pixels, or of latents: H/8, W/8 of the image)",
    "T": "tokens: 77 text tokens, or H*W pixel tokens inside attention",
    "S": "tokens of the context that cross-attention reads (the text's T)",
    "D": "width of a token: 768 for SD 1.x's text encoder",
    "nh": "attention heads",
    "hd": "head dim: D = nh * hd",
}

# The four parts, what goes in and what comes out, for a 512x512 SD 1.x image.
PARTS: dict[str, str] = {
    "tokenizer": "prompt (str) -> token ids (B, 77)",
    "text encoder": "token ids (B, 77) -> text embeddings (B, 77, 768)",
    "UNet": "latents (B, 4, 64, 64), t, text (B, 77, 768) -> noise (B, 4, 64, 64)",
    "scheduler": "noise prediction, latents x_t -> latents x_{t-1}",
    "VAE decoder": "latents (B, 4, 64, 64) -> image (B, 3, 512, 512)",
}


def _box(ax: Axes, xy: tuple[float, float], text: str, color: str) -> None:
    x, y = xy
    ax.add_patch(
        FancyBboxPatch(
            (x - 0.08, y - 0.07),
            0.16,
            0.14,
            boxstyle="round,pad=0.01",
            facecolor=color,
            edgecolor="black",
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=9)


def _arrow(
    ax: Axes,
    a: tuple[float, float],
    b: tuple[float, float],
    label: str = "",
    curve: float = 0.0,
) -> None:
    ax.add_patch(
        FancyArrowPatch(
            a,
            b,
            arrowstyle="-|>",
            mutation_scale=12,
            color="black",
            connectionstyle=f"arc3,rad={curve}",
        )
    )
    if label:
        mx, my = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
        ax.text(mx, my + 0.03, label, ha="center", fontsize=8, color="dimgray")


def draw_pipeline(ax: Axes | None = None) -> Axes:
    """Draws how data flows through Stable Diffusion's four parts.

    Args:
        ax: where to draw; a new figure when None.

    Returns:
        The axes drawn on.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 4.2))
    text, model, loop = "#dbeafe", "#fde68a", "#dcfce7"
    _box(ax, (0.1, 0.8), '"a red circle"', "white")
    _box(ax, (0.45, 0.8), "tokenizer", text)
    _box(ax, (0.8, 0.8), "text encoder\n(CLIP)", text)
    _box(ax, (0.1, 0.3), "noise\nx_T ~ N(0, I)", "white")
    _box(ax, (0.5, 0.3), "UNet\npredicts noise", model)
    _box(ax, (0.88, 0.3), "scheduler\nx_t -> x_{t-1}", loop)
    _box(ax, (1.2, 0.62), "VAE\ndecoder", model)
    _arrow(ax, (0.19, 0.8), (0.36, 0.8), "str")
    _arrow(ax, (0.54, 0.8), (0.71, 0.8), "ids (B, 77)")
    _arrow(ax, (0.76, 0.72), (0.54, 0.38))
    ax.text(0.72, 0.55, "text (B, 77, 768)", fontsize=8, color="dimgray")
    _arrow(ax, (0.19, 0.3), (0.41, 0.3), "latents (B, 4, 64, 64)")
    _arrow(ax, (0.59, 0.3), (0.79, 0.3), "noise (B, 4, 64, 64)")
    _arrow(ax, (0.86, 0.22), (0.52, 0.22), curve=-0.4)
    ax.text(0.69, 0.03, "x_{t-1}: repeat for every timestep", ha="center", fontsize=8)
    _arrow(ax, (0.97, 0.34), (1.12, 0.56), "x_0")
    ax.text(1.2, 0.42, "image\n(B, 3, 512, 512)", ha="center", fontsize=8)
    ax.set_xlim(0, 1.3)
    ax.set_ylim(0, 1)
    ax.set_axis_off()
    ax.set_title("Stable Diffusion: text in, image out")
    return ax
