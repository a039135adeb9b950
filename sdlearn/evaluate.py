"""Does a generated image show what its prompt says? A judge without learning.

Every picture of the shapes dataset is one solid shape on white, so a few lines of
numpy can read a picture back into words: which pixels are drawn, which colour
most of them are, what shape and where. Comparing those words with the prompt
gives an accuracy per attribute, the course's measure of a text-to-image model:

    description = describe(image)  # {"color": "red", "shape": "circle", ...}
    score(image, "a small red circle on the left")  # {"color": True, ...}

Each rule is a measurement you can print and check, and each threshold was
chosen from measurements on rendered scenes (ranges in the comments below).
The rules assume what the dataset draws: one upright, axis-aligned shape.

`evaluation_prompts` fixes the prompts to generate from, `summarize` and
`format_table` turn many scores into the table a chapter shows. This module
never runs a model: a command that evaluates one is a loop of
`pipeline(prompt) -> score(image, prompt)` around these functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image

from sdlearn.image_measures import (
    as_pixels,
    dominant_color,
    enclosed,
    largest_component,
    standardized_moment,
)
from sdlearn.shapes import (
    ALL_SHAPES,
    ALL_STYLES,
    BACKGROUND,
    CENTERS,
    COLORS,
    HELD_OUT,
    NEW_SHAPES,
    NEW_STYLES,
    PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    Scene,
    caption,
)

# A pixel belongs to the drawing when it is this far (Euclidean, in 0-255 RGB)
# from the white background. The palette's nearest colour to white is yellow, 238
# away, so a pixel counts once it is ~40% of the way from white to its colour:
# blurred edges split about evenly, and an off-white background (225, 225, 225)
# stays background. Gaussian noise of std 20 on white reaches 100 (5 std of a
# 3-d normal's length) in about one pixel in 70,000.
FOREGROUND_DISTANCE = 100.0

# The drawing must cover this fraction of the image to count as found. The
# smallest shapes the dataset draws (small triangles, scale 0.9) cover at least
# 0.016 of the image, measured at 32 and 64 px; specks of noise cover far less.
MIN_AREA = 0.005

# A triangle has more pixels near its base than near its apex, so the rows of its
# pixels are skewed towards the apex (third moment / std^3, y pointing down):
# -0.57 in theory, circles and squares 0 by symmetry. Measured on 1500 random
# scenes each: triangles -0.67 to -0.50 clean at 32 and 64 px, at most -0.38 at
# 64 px with noise (std 20/255) and a 3 x 3 blur; circles and squares exactly 0
# clean, -0.06 to 0.05 with noise and blur.
TRIANGLE_SKEWNESS = -0.25

# Seen along its sides a square's pixels spread evenly (a flat profile, kurtosis
# 1.8) while seen along its diagonals they pile up in the middle (a tent,
# kurtosis 2.4); a circle looks the same from every direction (2.0 both ways).
# The gap (diagonal kurtosis - axis kurtosis) is 0.6 for a square, 0 for a
# circle. Measured: squares 0.60 to 0.63 clean at 32 and 64 px, 0.34 to 0.62 with
# noise and blur at 64 px; circles -0.23 to 0.01 clean, -0.24 to 0.04 with noise.
SQUARE_KURTOSIS_GAP = 0.2

# The size is read from the radius the shape's area implies (for its shape, see
# _AREA_OVER_RADIUS2), in fractions of the image side. Drawn radii are
# 0.099-0.121 (small) and 0.171-0.209 (large); pixels and blur inflate small
# shapes. Measured: small 0.100-0.150 clean at 32 and 64 px, up to 0.154 with
# noise and blur at 64 px; large 0.174-0.241 clean, 0.182-0.240 with noise.
LARGE_RADIUS = 0.165

# A diamond (a square on its corner) is a square seen along its diagonals: its
# kurtosis gap is that of a square with the sign flipped, -0.6 clean at 64 px.
# Counted as a diamond below -0.3, where circles (0, -0.24 at worst with noise)
# never go.
DIAMOND_KURTOSIS_GAP = -0.3

# A ring encloses white: its hole is (1 - RING_WIDTH)^2 = 25% of the disc it
# fills, a solid shape's is 0. Counted as a ring from 8% of the disc on, so that
# a blurred or thin ring still counts and a speck of white inside a shape does not.
# A hollow shape's hole is 25% too (measured on 600 random scenes at 64 px:
# 17-39% for small shapes, 25-34% for large ones); the same threshold tells it
# from a filled one.
RING_HOLE = 0.08

# Area / radius^2 of each shape as shapes.render draws it: a circle of radius r,
# a square of half-side 0.9 r, an equilateral triangle with circumradius r.
_AREA_OVER_RADIUS2: dict[str, float] = {
    "circle": math.pi,
    "square": 1.8**2,
    "triangle": 3 * math.sqrt(3) / 4,
    "diamond": 2.0,
}

# Prompt words that carry no attribute: articles and the "there is" of
# "on the left there is a red circle".
_FILLER = ("a", "an", "there", "is")

# The rows of `format_table`'s table: the keys of `evaluation_prompts`.
SINGLE = "single-object"
HELD_OUT_COMBOS = "held-out combos"

# Column headers of `format_table`, by score key.
_HEADERS: dict[str, str] = {
    "color": "colour",
    "shape": "shape",
    "position": "position",
    "size": "size",
    "style": "style",
    "color_and_shape": "colour+shape",
    "all": "all",
    "n": "n",
}

_SCORE_KEYS = (
    "color",
    "shape",
    "position",
    "size",
    "style",
    "color_and_shape",
    "all",
)


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """Reads what a prompt asks for, for every caption template of the dataset.

    Args:
        prompt: a caption like "a small red circle on the left", "an orange
            square", "a blue hollow square" or "at the top there is a large blue
            triangle"; case, extra spaces and a final full stop do not matter.

    Returns:
        {"color", "shape", "size", "position", "style"}: words of `COLORS`,
        `ALL_SHAPES`, `SIZES`, `POSITIONS` and `ALL_STYLES`; "size", "position"
        and "style" are None when the prompt leaves them out.

    Raises:
        ValueError: a word outside the dataset's vocabulary, an attribute named
            twice, or a colour or shape missing.
    """
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    found: dict[str, str | None] = {
        "color": None,
        "shape": None,
        "size": None,
        "position": None,
        "style": None,
    }
    for position, phrase in PHRASES.items():
        pattern = rf"\b{re.escape(phrase)}\b"
        if re.search(pattern, text):
            if found["position"] is not None:
                raise ValueError(f"prompt {prompt!r} names two positions")
            found["position"] = position
            text = re.sub(pattern, " ", text)
    for word in text.split():
        if word in _FILLER:
            continue
        for key, vocabulary in (
            ("color", COLORS),
            ("shape", ALL_SHAPES),
            ("size", SIZES),
            ("style", ALL_STYLES),
        ):
            if word in vocabulary:
                if found[key] is not None:
                    raise ValueError(f"prompt {prompt!r} names two {key}s")
                found[key] = word
                break
        else:
            raise ValueError(
                f"unknown word {word!r} in prompt {prompt!r}; expected the words of "
                f"shapes.TEMPLATES with colours {tuple(COLORS)}, shapes {ALL_SHAPES}, "
                f"sizes {SIZES}, positions {POSITIONS} and styles {ALL_STYLES}"
            )
    for key in ("color", "shape"):
        if found[key] is None:
            raise ValueError(f"prompt {prompt!r} names no {key}")
    return found


def describe(image: np.ndarray | Image.Image, shapes: tuple[str, ...] = SHAPES) -> dict:
    """Reads a picture back into the words of the dataset.

    Args:
        image: uint8 array of shape (H, W, 3), as `shapes.render` and pipelines
            return, or a PIL image. Turn (3, H, W) tensors in [-1, 1] into this
            form with `shapes.to_image`. Square images of 32 px and more: the
            thresholds were measured at 32 and 64 px. On 1000 random scenes it
            reads every attribute right at 64 px, clean or with noise and a
            3 x 3 blur; at 32 px with that blur it still gets colour and
            position right (>= 99.9%) but only 92% of shapes and 99% of sizes;
            at 16 px, clean, only 88% of sizes.
        shapes: the shapes to tell apart; with "ring" (`shapes.NEW_SHAPES`), a
            drawing that encloses white is a ring, with "diamond" one whose
            kurtosis gap is strongly negative a diamond. The base shapes by default,
            so that the base model's scores do not depend on it. Without "ring",
            a drawing that encloses white is a hollow shape (a hollow circle and
            a ring are the same drawing), read from the area its outline fills.

    Returns:
        A dict with
        - "found": whether anything is drawn; when False the four words are None;
        - "color", "shape", "position", "size", "style": words of `COLORS`,
          `SHAPES`, `POSITIONS`, `SIZES`, `ALL_STYLES` (a ring is "filled": its
          hole is its shape's);
        - the measurements behind them: "area" (fraction of the image),
          "center" ((x, y) in fractions of the image side), "color_share" (the
          fraction of the shape's inner pixels that voted for "color"),
          "skewness" and "kurtosis_gap" (see the module's constants), "radius",
          "hole" (the white it encloses, as a fraction of the disc it fills).
    """
    pixels = as_pixels(image)
    H, W, _ = pixels.shape
    distance = np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float64), axis=-1)
    # noise or a stray blob elsewhere must not move the centre or bend the shape
    mask = largest_component(distance > FOREGROUND_DISTANCE)  # (H, W)
    area = float(mask.mean())
    if area < MIN_AREA:
        words = ("color", "shape", "position", "size", "style")
        return {"found": False, **dict.fromkeys(words), "area": area}

    # 1. colour: a vote of the inner pixels, since blurred edges mix with white
    # (half-white red is nearer orange than red)
    color, share = dominant_color(pixels, mask)

    # 2. shape: moments of the pixel coordinates of the area the outline fills
    form = _read_shape(mask, shapes)
    shape, ring, hole = form["shape"], form["shape"] == "ring", form["hole"]

    # 3. position: the anchor nearest the centre of the area it fills
    center = form["center"]
    position = min(POSITIONS, key=lambda p: math.dist(center, CENTERS[p]))

    # 4. size: the radius that this shape would need to cover the area it fills
    # (a ring's or a hollow shape's hole included)
    filled = area / (1 - hole)
    radius = math.sqrt(filled / _AREA_OVER_RADIUS2["circle" if ring else shape])
    size = "large" if radius > LARGE_RADIUS else "small"

    return {
        "found": True,
        "color": color,
        "shape": shape,
        "position": position,
        "size": size,
        "style": form["style"],
        "area": area,
        "center": center,
        "color_share": share,
        "skewness": form["skewness"],
        "kurtosis_gap": form["kurtosis_gap"],
        "radius": radius,
        "hole": hole,
    }


def _read_shape(mask: np.ndarray, shapes: tuple[str, ...]) -> dict:
    """The shape and style of the drawing `mask`, from moments of the pixel
    coordinates (which noise barely moves) of the area its outline fills, and,
    for rings and hollow shapes, the white it encloses; with the measurements
    behind them and the centre of that area, (x, y) in fractions of the side."""
    H, W = mask.shape
    inside = enclosed(mask)
    white = float(inside.sum())
    hole = white / (float(mask.sum()) + white)
    ys, xs = np.nonzero(mask | inside)
    x = (xs + 0.5) / W
    y = (ys + 0.5) / H
    skewness = standardized_moment(y, 3)
    diagonal = (standardized_moment(x + y, 4) + standardized_moment(x - y, 4)) / 2
    axes = (standardized_moment(x, 4) + standardized_moment(y, 4)) / 2
    kurtosis_gap = diagonal - axes
    ring = "ring" in shapes and hole > RING_HOLE
    style = "hollow" if hole > RING_HOLE and not ring else "filled"
    if ring:
        shape = "ring"
    elif skewness < TRIANGLE_SKEWNESS:
        shape = "triangle"
    elif "diamond" in shapes and kurtosis_gap < DIAMOND_KURTOSIS_GAP:
        shape = "diamond"
    elif kurtosis_gap > SQUARE_KURTOSIS_GAP:
        shape = "square"
    else:
        shape = "circle"
    return {
        "shape": shape,
        "style": style,
        "skewness": skewness,
        "kurtosis_gap": kurtosis_gap,
        "hole": hole,
        "center": (float(x.mean()), float(y.mean())),
    }


def score(
    image: np.ndarray | Image.Image,
    prompt: str,
    shapes: tuple[str, ...] = SHAPES,
    styles: tuple[str, ...] = STYLES,
) -> dict[str, bool | None]:
    """Whether an image shows what its prompt asks for, attribute by attribute.

    Args:
        image: uint8 array (H, W, 3) or PIL image, see `describe`.
        prompt: a caption in the form of `shapes.TEMPLATES`, see `parse_prompt`.
        shapes: the shapes `describe` tells apart; a prompt that names a new
            shape adds it.
        styles: the styles told apart: with the base style alone (the
            default), the style is scored only when the prompt names one; with
            "hollow" among them (`shapes.ALL_STYLES`), a prompt that names no
            style asks for a filled shape.

    Returns:
        {"color", "shape", "position", "size", "style", "color_and_shape",
        "all"}: True when the image shows what the prompt names; "position",
        "size" and "style" are None when the prompt does not name them (see
        `styles`), and "all" checks only what it names. An image where nothing
        is found matches nothing.
    """
    wanted = parse_prompt(prompt)
    if wanted["shape"] not in shapes:
        shapes = (*shapes, wanted["shape"])
    if wanted["style"] is None and len(styles) > 1:
        wanted["style"] = STYLES[0]
    seen = describe(image, shapes)
    result: dict[str, bool | None] = {}
    for key in ("color", "shape", "position", "size", "style"):
        result[key] = None if wanted[key] is None else seen[key] == wanted[key]
    result["color_and_shape"] = bool(result["color"] and result["shape"])
    result["all"] = all(v for v in result.values() if v is not None)
    return result


def evaluation_prompts(per_pair: int = 2) -> dict[str, list[str]]:
    """The fixed prompts a text-to-image model is evaluated on.

    Both sets use the fullest caption template, "a {size} {color} {shape}
    {where}", so every prompt names all four attributes. Sizes and positions are
    dealt in turn (small left, large right, small top, ...), so each pair gets
    different ones and the set as a whole covers them evenly.

    Args:
        per_pair: prompts per colour-shape pair of the training split, 1 to 10
            (there are 2 sizes x 5 positions).

    Returns:
        {"single-object": 15 * per_pair prompts of the 15 colour-shape pairs that
        training shows, every colour, shape, size and position among them;
        "held-out combos": 30 prompts, the 3 pairs of `HELD_OUT` at every size
        and position}.
    """
    placements = len(SIZES) * len(POSITIONS)
    if not 1 <= per_pair <= placements:
        raise ValueError(
            f"expected per_pair between 1 and {placements}, got {per_pair}"
        )
    return {
        SINGLE: _prompts(_seen_pairs(), per_pair),
        HELD_OUT_COMBOS: _prompts(list(HELD_OUT), placements),
    }


def concept_prompts(concept: str = "diamond") -> list[str]:
    """Prompts of a shape or a style the base model never saw (`shapes.NEW_SHAPES`,
    `shapes.NEW_STYLES`).

    Returns:
        30 prompts in the fullest template: a new shape in every colour, each
        at 5 placements; a new style on the 15 colour-shape pairs that training
        shows ("a small red hollow circle on the left"), each at 2 placements;
        sizes and positions dealt in turn as in `evaluation_prompts`.
    """
    if concept in NEW_SHAPES:
        return _prompts([(color, concept) for color in COLORS], 5)
    if concept in NEW_STYLES:
        return _prompts(_seen_pairs(), 2, style=concept)
    raise ValueError(
        f"expected a new shape of {NEW_SHAPES} or a new style of {NEW_STYLES}, "
        f"got {concept!r}"
    )


def reword(text: str, wording: dict[str, str]) -> str:
    """Replace whole words: reword("a red diamond", {"diamond": "sks"}) ->
    "a red sks" (the captions and prompts of a fine-tuned concept's token)."""
    for word, new in wording.items():
        text = re.sub(rf"\b{re.escape(word)}\b", new, text)
    return text


def flat_metrics(summaries: dict[str, dict]) -> dict[str, float]:
    """`evaluate_pipeline`'s summaries as one flat dict, as records keep them:
    {"single-object color": 100.0, ...}, without the counts and the attributes
    no prompt of a set named."""
    return {
        f"{name} {key}": value
        for name, scores in summaries.items()
        for key, value in scores.items()
        if key != "n" and value is not None
    }


def summarize(rows: Iterable[dict[str, bool | None]]) -> dict[str, float | None]:
    """Accuracies over many scores, in percent.

    Args:
        rows: dicts returned by `score`.

    Returns:
        {"color", "shape", "position", "size", "color_and_shape", "all": percent
        of the rows where it holds, among the rows that name it (None if none
        does), "n": the number of rows}.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("expected at least one score to summarize, got none")
    summary: dict[str, float | None] = {}
    for key in _SCORE_KEYS:
        values = [row[key] for row in rows if row.get(key) is not None]
        summary[key] = 100 * sum(values) / len(values) if values else None
    summary["n"] = len(rows)
    return summary


def format_table(
    summaries: dict[str, dict[str, float | None]],
    columns: tuple[str, ...] = ("color", "shape", "position", "color_and_shape", "n"),
) -> str:
    """A markdown table of accuracies, one row per set of prompts.

    Args:
        summaries: row name (e.g. "single-object", "held-out combos") -> the dict
            `summarize` returned for it.
        columns: which keys of the summaries to show, in order.

    Returns:
        The table as text, percentages with one decimal, "-" where a set names
        no such attribute.
    """
    unknown = [c for c in columns if c not in _HEADERS]
    if unknown:
        raise ValueError(
            f"unknown columns {unknown}; expected some of {tuple(_HEADERS)}"
        )
    lines = [
        "| prompts | " + " | ".join(_HEADERS[c] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, summary in summaries.items():
        cells = []
        for c in columns:
            value = summary[c]
            if value is None:
                cells.append("-")
            elif c == "n":
                cells.append(str(int(value)))
            else:
                cells.append(f"{value:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seen_pairs() -> list[tuple[str, str]]:
    """The 15 (color, shape) pairs of the base shapes that training shows."""
    return [
        (color, shape)
        for color in COLORS
        for shape in SHAPES
        if (color, shape) not in HELD_OUT
    ]


def _prompts(
    pairs: list[tuple[str, str]], per_pair: int, style: str = STYLES[0]
) -> list[str]:
    """Captions of `per_pair` placements for each (color, shape), dealt in turn."""
    prompts = []
    for i, (color, shape) in enumerate(pairs):
        for j in range(per_pair):
            # 2 sizes and 5 positions are coprime, so 10 consecutive turns give
            # all 10 placements, and consecutive pairs continue where we left off
            turn = i * per_pair + j
            scene = Scene(
                shape=shape,
                color=color,
                size=SIZES[turn % len(SIZES)],
                position=POSITIONS[turn % len(POSITIONS)],
                style=style,
            )
            prompts.append(caption(scene))  # the fullest template
    return prompts


def evaluate_pipeline(
    pipeline,
    seeds: int = 4,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    progress: bool = False,
    prompt_sets: dict[str, list[str]] | None = None,
    shapes: tuple[str, ...] = SHAPES,
    wording: dict[str, str] | None = None,
    styles: tuple[str, ...] = STYLES,
) -> tuple[dict[str, dict], dict[str, list]]:
    """Draw every evaluation prompt with several seeds and score the images.

    Args:
        pipeline: a `StableDiffusionPipeline` (anything called like one, with
            `output_type="np"`); passed in so that this module never imports it.
        seeds: images per prompt; seed s draws all prompts of a set as one batch
            from `torch.Generator().manual_seed(s)`.
        guidance_scale: classifier-free guidance scale.
        num_inference_steps: denoising steps.
        progress: show the pipeline's progress bar.
        prompt_sets: {name: prompts} to draw; `evaluation_prompts()` by default.
        shapes: the shapes the scorer tells apart (see `describe`); pass
            `shapes.ALL_SHAPES` to count a ring drawn for a circle as wrong.
        styles: the styles the scorer tells apart (see `score`); pass
            `shapes.ALL_STYLES` to count a hollow shape drawn for a filled one
            as wrong.
        wording: words the pipeline is given instead of the prompt's, e.g.
            {"diamond": "<diamond>"} for a learned token; images are scored
            against the prompt as written.

    Returns:
        summaries: per prompt set (SINGLE, HELD_OUT_COMBOS by default), `summarize`'s
            accuracies over all its images;
        images: per prompt set, uint8 arrays (seeds, prompts, H, W, 3).
    """
    previous = pipeline.progress
    pipeline.progress = progress
    summaries, images = {}, {}
    try:
        sets = evaluation_prompts() if prompt_sets is None else prompt_sets
        for name, prompts in sets.items():
            rows, drawn = [], []
            drawn_prompts = [reword(p, wording or {}) for p in prompts]
            for seed in range(seeds):
                output = pipeline(
                    drawn_prompts,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="np",
                )
                batch = (output.images * 255).round().astype(np.uint8)
                rows += [
                    score(image, p, shapes, styles)
                    for image, p in zip(batch, prompts, strict=True)
                ]
                drawn.append(batch)
            summaries[name] = summarize(rows)
            images[name] = np.stack(drawn)  # (seeds, prompts, H, W, 3)
    finally:
        pipeline.progress = previous
    return summaries, images
