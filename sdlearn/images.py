"""Chapter 06: images in and out of the pipeline.

What people hand a pipeline (a PIL image, a uint8 array, a tensor) becomes the
VAE's input, (1, 3, H, W) in [-1, 1], or a mask, (1, 1, H, W) in {0, 1}; what
the VAE decodes becomes what they asked for: PIL images, arrays or tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

ImageInput = Image.Image | np.ndarray | torch.Tensor


def to_pixels(image: ImageInput) -> torch.Tensor:
    """An RGB image as (1, 3, H, W) float in [-1, 1], the VAE's input.

    Args:
        image: a PIL image, a uint8 array (H, W, 3), or a tensor (3, H, W) or
            (B, 3, H, W) already in [-1, 1].
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 array of shape (H, W, 3), got {image.dtype} "
                f"{image.shape}"
            )
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
        return (pixels * 2 - 1)[None]  # (1, 3, H, W)
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(
                f"expected an image tensor of shape (3, H, W) or (B, 3, H, W) in "
                f"[-1, 1], got {tuple(image.shape)}"
            )
        return image.float()
    raise ValueError(
        f"expected a PIL image, a uint8 array or a tensor, got {type(image).__name__}"
    )


def to_mask(mask: ImageInput) -> torch.Tensor:
    """A mask as (1, 1, H, W) float: 1 (white) where to repaint, 0 where to keep.

    Grey values are rounded to 0 or 1 at 0.5, as diffusers binarises masks.

    Args:
        mask: a PIL image (any mode), an array (H, W) or (H, W, C) of uint8 or
            of floats in [0, 1], or a tensor (H, W), (1, H, W) or (B, 1, H, W)
            in [0, 1].
    """
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        values = mask.astype(np.float32) / (255 if mask.dtype == np.uint8 else 1)
        if values.ndim == 3:
            values = values.mean(axis=-1)
        mask = torch.from_numpy(values)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"expected a mask as a PIL image, an array or a tensor, got "
            f"{type(mask).__name__}"
        )
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[1] != 1:
        raise ValueError(
            f"expected a mask of shape (H, W) or (B, 1, H, W), got {tuple(mask.shape)}"
        )
    return (mask.float() >= 0.5).float()


def postprocess(images: torch.Tensor, output_type: str) -> Any:
    """Decoded images (B, 3, H, W) in about [-1, 1] to the output type.

    "pt": a tensor (B, 3, H, W) in [0, 1]; "np": a float array (B, H, W, 3) in
    [0, 1], as diffusers returns it; "pil": a list of PIL images.
    """
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]
