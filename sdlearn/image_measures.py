"""Chapter 07: the numpy measurements the scorer of `sdlearn.evaluate` reads.

Which pixels are drawn (the largest 8-connected region of a mask), the white a
drawing encloses, the palette colour most of its pixels are nearest to, and the
standardized moments (skewness, kurtosis) of its pixels' coordinates: enough to
read one flat-coloured shape on white back into words, with no model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdlearn.shapes import COLORS


def as_pixels(image: np.ndarray | Image.Image) -> np.ndarray:
    """An image as float64 RGB values 0-255, shape (H, W, 3)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(
            "expected a uint8 numpy array of shape (H, W, 3) or a PIL image, got "
            f"{type(image).__name__} of dtype {getattr(image, 'dtype', None)}; "
            "turn (3, H, W) tensors in [-1, 1] into images with shapes.to_image"
        )
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image of shape (H, W, 3), got {image.shape}")
    return image.astype(np.float64)


def enclosed(mask: np.ndarray) -> np.ndarray:
    """The background pixels that `mask` walls off from the image's border."""
    outside = ~mask
    # flood the background in from the border, 4-connected, until it stops
    reached = np.zeros_like(mask)
    reached[0, :], reached[-1, :] = outside[0, :], outside[-1, :]
    reached[:, 0] |= outside[:, 0]
    reached[:, -1] |= outside[:, -1]
    while True:
        padded = np.pad(reached, 1)
        grown = outside & (
            reached
            | padded[:-2, 1:-1]
            | padded[2:, 1:-1]
            | padded[1:-1, :-2]
            | padded[1:-1, 2:]
        )
        if np.array_equal(grown, reached):
            return outside & ~reached
        reached = grown


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean (H, W) mask.

    8-connected, because `enclosed` floods the background 4-connected: a line
    one pixel wide that runs diagonally (the side of a thin triangle) is one
    piece and walls the background off. With 4-connected pieces it broke into
    steps, of which only the largest was kept, while the background still could
    not pass it (digital topology pairs 8 with 4 for this reason).
    """
    H, W = mask.shape
    # every pixel starts with its own label, then takes the smallest label among
    # its 8 neighbours until nothing changes: each region ends with one label
    none = H * W
    labels = np.where(mask, np.arange(H * W).reshape(H, W), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)  # (H + 2, W + 2)
        smallest = np.minimum.reduce(
            [padded[i : i + H, j : j + W] for i in range(3) for j in range(3)]
        )
        smallest = np.where(mask, smallest, none)
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    if not mask.any():
        return mask
    counts = np.bincount(labels[mask])
    return labels == counts.argmax()


def dominant_color(pixels: np.ndarray, mask: np.ndarray) -> tuple[str, float]:
    """The palette colour most pixels of the mask are nearest to, and its share."""
    padded = np.pad(mask, 1, constant_values=False)  # (H + 2, W + 2)
    inner = (
        mask
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    voters = pixels[inner if inner.any() else mask]  # (N, 3); tiny shapes: all
    palette = np.array(list(COLORS.values()), dtype=np.float64)  # (K, 3)
    nearest = np.linalg.norm(voters[:, None] - palette[None], axis=-1).argmin(1)  # (N,)
    votes = np.bincount(nearest, minlength=len(palette))
    return list(COLORS)[votes.argmax()], float(votes.max() / votes.sum())


def standardized_moment(values: np.ndarray, order: int) -> float:
    """E[(v - mean)^order] / std^order: skewness for 3, kurtosis for 4."""
    centred = values - values.mean()
    variance = float(np.mean(centred**2))
    if variance == 0:  # a single row or column of pixels has no spread to measure
        return 0.0
    return float(np.mean(centred**order) / variance ** (order / 2))
