"""The shapes dataset: the course's own captioned images, made procedurally.

Every model in the course trains on these pictures: one solid shape on a white
background, with a caption that says what is drawn. They cost no download, a CPU
renders thousands a second, and because we know exactly what each picture shows,
a generated image can be scored against its prompt without a learned judge.

Every shape is drawn filled; chapter 09 also teaches a style the base model
never sees, "hollow" (`NEW_STYLES`): the shape's band around a white hole.

A training split leaves out a fixed list of colour-shape combinations
(`HELD_OUT`), so we can ask whether a model composes "green" and "triangle"
having only ever seen green things and triangles apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Shapes the base model never sees: random scenes and the dataset draw from
# SHAPES unless asked for these; chapter 09 teaches them by fine-tuning.
NEW_SHAPES: tuple[str, ...] = ("diamond", "ring")
ALL_SHAPES: tuple[str, ...] = SHAPES + NEW_SHAPES

# A ring's band is this fraction of its outer radius wide.
RING_WIDTH = 0.5

# How a shape is filled: solid for the base model; "hollow" (a band around a
# white hole, a ring's band for every shape) is chapter 09's new style.
STYLES: tuple[str, ...] = ("filled",)
NEW_STYLES: tuple[str, ...] = ("hollow",)
ALL_STYLES: tuple[str, ...] = STYLES + NEW_STYLES

# Far apart in RGB (the closest pair, red and orange, differs by about 100), so a
# pixel's nearest colour in this table names the colour that was drawn.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 120, 0),
}

SIZES: tuple[str, ...] = ("small", "large")

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Colour-shape combinations that the "train" split never shows; one per shape,
# each colour still seen with the other shapes.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("green", "triangle"),
    ("purple", "circle"),
    ("orange", "square"),
)

# Where each position puts the shape's centre, as fractions of the image side (x, y).
CENTERS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}

# Half the width of a shape's bounding box, as a fraction of the image side.
_RADII: dict[str, float] = {"small": 0.11, "large": 0.19}

PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# Caption templates; every one is true of the picture, some leave details out.
TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} {where}",
    "a {color} {shape} {where}",
    "a {size} {color} {shape}",
    "a {color} {shape}",
    "{where} there is a {size} {color} {shape}",
)


@dataclass(frozen=True)
class Scene:
    """One picture of the dataset: a single shape and how it is placed.

    Args:
        shape: one of `ALL_SHAPES`.
        color: a key of `COLORS`.
        size: one of `SIZES`.
        position: one of `POSITIONS`.
        jitter: offset of the centre from the position's anchor, (dx, dy) as
            fractions of the image side, small enough that the position stays
            unambiguous.
        scale: multiplies the size's radius, close to 1.
        style: one of `ALL_STYLES`; a hollow circle is drawn as a ring.
    """

    shape: str
    color: str
    size: str
    position: str
    jitter: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    style: str = "filled"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, ALL_SHAPES),
            ("color", self.color, tuple(COLORS)),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
            ("style", self.style, ALL_STYLES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

    def center(self) -> tuple[float, float]:
        """The shape's centre (x, y) in fractions of the image side."""
        x, y = CENTERS[self.position]
        return x + self.jitter[0], y + self.jitter[1]

    def radius(self) -> float:
        """Half the side of the shape's bounding box, in fractions of the image."""
        return _RADII[self.size] * self.scale


def random_scene(
    rng: np.random.Generator,
    shapes: tuple[str, ...] = SHAPES,
    colors: tuple[str, ...] | None = None,
    styles: tuple[str, ...] = STYLES,
) -> Scene:
    """Draws a scene uniformly over shapes, colours, sizes, positions and styles.

    Args:
        rng: the numpy generator to draw from (the dataset seeds one per index).
        shapes: the shapes to choose from.
        colors: the colours to choose from; all of `COLORS` by default.
        styles: the styles to choose from; with one style nothing is drawn for
            it, so the base scenes are the same whether styles exist or not.

    Returns:
        A `Scene` with a small random jitter and scale.
    """
    colors = tuple(COLORS) if colors is None else colors
    scene = dict(
        shape=shapes[rng.integers(len(shapes))],
        color=colors[rng.integers(len(colors))],
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        jitter=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        scale=float(rng.uniform(0.9, 1.1)),
    )
    style = styles[rng.integers(len(styles))] if len(styles) > 1 else styles[0]
    return Scene(**scene, style=style)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Draws a scene: one shape on a plain white background, solid or hollow.

    Args:
        scene: what to draw.
        size: the side of the square image in pixels.

    Returns:
        uint8 array of shape (H, W, 3) with H = W = size. No anti-aliasing, so
        every pixel is either the background or exactly `COLORS[scene.color]`.
    """
    if size < 8:
        raise ValueError(f"expected an image size of at least 8 pixels, got {size}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy = (c * size for c in scene.center())
    r = scene.radius() * size
    fill = COLORS[scene.color]
    if scene.shape == "ring" or (scene.shape == "circle" and scene.style == "hollow"):
        # the circle's outline, RING_WIDTH of the radius wide, white inside
        width = max(2, round(r * RING_WIDTH))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=width)
        return np.array(image)
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return np.array(image)
    points, inradius = _polygon(scene.shape, cx, cy, r)
    draw.polygon(points, fill=fill)
    if scene.style == "hollow":
        # the same polygon shrunk about its centre (its incentre: these polygons
        # are regular) leaves a band of RING_WIDTH of the inradius, at least 2 px
        band = max(2.0, RING_WIDTH * inradius)
        k = max(0.0, 1 - band / inradius)
        mx, my = np.mean(points, axis=0)
        draw.polygon(
            [(mx + k * (x - mx), my + k * (y - my)) for x, y in points], fill=BACKGROUND
        )
    return np.array(image)  # a writable copy, so torch.from_numpy is safe


def _polygon(
    shape: str, cx: float, cy: float, r: float
) -> tuple[list[tuple[float, float]], float]:
    """The corners of a square, diamond or triangle drawn in the box of a circle
    of radius r about (cx, cy), in pixels, and the polygon's inradius."""
    if shape == "square":
        # a square of the circle's area would look smaller; same box reads better
        s = r * 0.9
        return [
            (cx - s, cy - s),
            (cx + s, cy - s),
            (cx + s, cy + s),
            (cx - s, cy + s),
        ], s
    if shape == "diamond":
        # a square on its corner, in the circle's box
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], r / math.sqrt(
            2
        )
    # an upward equilateral triangle of circumradius r, its centroid 0.15 r below
    # the centre so that it looks centred
    angles = (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 - 2 * math.pi / 3)
    points = [(cx + r * math.cos(a), cy - r * math.sin(a) + r * 0.15) for a in angles]
    return points, r / 2


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Describes a scene in words.

    Args:
        scene: what is drawn.
        rng: picks one of `TEMPLATES`; without it the fullest template is used.

    Returns:
        A caption like "a small blue square on the left" or "a red circle".
    """
    template = TEMPLATES[0] if rng is None else TEMPLATES[rng.integers(len(TEMPLATES))]
    text = template.format(
        size=scene.size,
        color=scene.color,
        # "a red hollow square": the style only when it is not the base one
        shape=scene.shape if scene.style in STYLES else f"{scene.style} {scene.shape}",
        where=PHRASES[scene.position],
    )
    return with_articles(text)


def with_articles(text: str) -> str:
    """Puts "an" before a vowel: "a orange square" -> "an orange square"."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def is_held_out(scene: Scene) -> bool:
    """True when the scene's colour-shape combination is left out of training."""
    return (scene.color, scene.shape) in HELD_OUT


class ShapesDataset(Dataset):
    """Captioned shapes images, deterministic by seed and index.

    Item i is drawn from `np.random.default_rng([seed, i])`, so it does not
    depend on which other items were read, on workers or on order.

    Args:
        split: "train" leaves out `HELD_OUT` combinations, "held_out" has only
            them, "all" has everything.
        length: the number of items.
        image_size: side of the square images in pixels.
        seed: selects the whole sequence of scenes.
        random_captions: pick a caption template at random (for training) or
            always the fullest one.
        shapes: the shapes to draw from (not for "held_out"); `SHAPES` by
            default, e.g. ("diamond",) for a new concept of `NEW_SHAPES`.
        styles: the styles to draw from (not for "held_out"); `STYLES` by
            default, ("hollow",) for the new style of `NEW_STYLES`.

    Items are dicts with "pixel_values" (3, H, W) float in [-1, 1], "caption"
    (str), and the integer labels "shape", "color", "size", "position", "style"
    (indices into ALL_SHAPES, list(COLORS), SIZES, POSITIONS, ALL_STYLES).
    """

    SPLITS = ("train", "held_out", "all")

    def __init__(
        self,
        split: str = "train",
        length: int = 10_000,
        image_size: int = 64,
        seed: int = 0,
        random_captions: bool = True,
        shapes: tuple[str, ...] = SHAPES,
        styles: tuple[str, ...] = STYLES,
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {self.SPLITS}")
        if length < 1:
            raise ValueError(f"expected a positive length, got {length}")
        self.split = split
        self.length = length
        self.image_size = image_size
        self.seed = seed
        self.random_captions = random_captions
        unknown = [shape for shape in shapes if shape not in ALL_SHAPES]
        if unknown or not shapes:
            raise ValueError(f"expected shapes among {ALL_SHAPES}, got {shapes}")
        self.shapes = tuple(shapes)
        unknown = [style for style in styles if style not in ALL_STYLES]
        if unknown or not styles:
            raise ValueError(f"expected styles among {ALL_STYLES}, got {styles}")
        self.styles = tuple(styles)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The scene of item `index`, drawn until it belongs to the split."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        rng = np.random.default_rng([self.seed, index])
        if self.split == "held_out":
            color, shape = HELD_OUT[rng.integers(len(HELD_OUT))]
            return random_scene(rng, shapes=(shape,), colors=(color,))
        scene = random_scene(rng, shapes=self.shapes, styles=self.styles)
        while self.split == "train" and is_held_out(scene):
            scene = random_scene(rng, shapes=self.shapes, styles=self.styles)
        return scene

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        rng = np.random.default_rng([self.seed, index, 1])
        image = render(scene, self.image_size)
        pixels = (
            torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
        )  # (3, H, W)
        return {
            "pixel_values": pixels,
            "caption": caption(scene, rng if self.random_captions else None),
            "shape": ALL_SHAPES.index(scene.shape),
            "color": list(COLORS).index(scene.color),
            "size": SIZES.index(scene.size),
            "position": POSITIONS.index(scene.position),
            "style": ALL_STYLES.index(scene.style),
        }


def to_image(pixels: torch.Tensor) -> np.ndarray:
    """Turns (3, H, W) or (B, 3, H, W) pixels in [-1, 1] into uint8 (…, H, W, 3)."""
    if pixels.dim() not in (3, 4) or pixels.shape[-3] != 3:
        raise ValueError(
            "expected pixels of shape (3, H, W) or (B, 3, H, W), "
            f"got {tuple(pixels.shape)}"
        )
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()  # (..., H, W, 3)


def image_grid(images: np.ndarray | torch.Tensor, rows: int) -> np.ndarray:
    """Tiles a batch of images into one picture, row by row.

    Args:
        images: (N, H, W, C) images; N must be a multiple of `rows`.
        rows: the number of rows of the grid.

    Returns:
        (rows * H, N / rows * W, C) array.
    """
    if images.ndim != 4 or rows < 1 or images.shape[0] % rows:
        raise ValueError(
            f"expected images of shape (N, H, W, C) with N a multiple of rows={rows}, "
            f"got {tuple(images.shape)}"
        )
    grid = rearrange(images, "(r c) h w ch -> (r h) (c w) ch", r=rows)
    return np.asarray(grid)
