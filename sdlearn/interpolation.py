"""Chapter 02: walking between two latents on a sphere.

A straight line between two points, `(1 - w) a + w b`, cuts through the inside
of the sphere they lie near: half-way between two independent Gaussian noises it
is only 1/sqrt(2) as long as either, a vector the model never met. Spherical
linear interpolation (slerp, Shoemake 1985) walks along the arc between them
instead, at a constant angular speed, and keeps the length where the two
lengths agree. Chapter 02 walks between two VAE latents with it; it serves
noises (seeds) as well.
"""

from __future__ import annotations

import torch


def slerp(
    a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, threshold: float = 0.9995
) -> torch.Tensor:
    """Spherical linear interpolation from `a` to `b`, one result per weight.

    slerp(a, b, w) = (sin((1 - w) θ) a + sin(w θ) b) / sin θ, with θ the angle
    between a and b seen as two long vectors.

    Args:
        a, b: tensors of the same shape, e.g. latents (C, h, w).
        weights: (N,), 0 gives `a` and 1 gives `b`.
        threshold: when |cos θ| is above it, a and b are nearly parallel and sin θ
            nearly 0: the straight line is then as good, and safe.

    Returns:
        (N, *a.shape).
    """
    if a.shape != b.shape:
        raise ValueError(
            f"expected a and b of the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if weights.ndim != 1:
        raise ValueError(f"expected weights of shape (N,), got {tuple(weights.shape)}")
    w = weights.to(a.dtype).reshape(-1, *([1] * a.ndim))  # (N, 1, ..., 1)
    cos = (a * b).sum() / (a.norm() * b.norm())  # of the angle between a and b
    if cos.abs() > threshold:
        return (1 - w) * a + w * b  # (N, *a.shape)
    theta = torch.acos(cos)
    along_a = torch.sin((1 - w) * theta) / torch.sin(theta)  # (N, 1, ..., 1)
    along_b = torch.sin(w * theta) / torch.sin(theta)
    return along_a * a + along_b * b  # (N, *a.shape)
