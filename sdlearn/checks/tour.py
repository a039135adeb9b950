"""Checks for chapter 00's einops exercises.

The references are written with plain view/permute/mean, not einops, so a check
compares two independent ways of saying the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sdlearn.checks import Case, Verdict, check, randn
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter


def check_to_tokens(fn: Callable) -> Verdict:
    """Exercise 00.1: (B, C, H, W) feature maps -> (B, H*W, C) tokens."""
    cases = []
    for seed, shape in enumerate([(2, 3, 4, 5), (1, 8, 2, 2), (3, 4, 1, 7)]):
        x = randn(*shape, seed=seed)
        B, C, H, W = shape
        cases.append(Case((x,), x.permute(0, 2, 3, 1).reshape(B, H * W, C)))
    return check(
        "Exercise 00.1",
        fn,
        cases,
        hint='rearrange(x, "b c h w -> b (h w) c"): channels go last, '
        "and h, w merge row by row.",
    )


def check_image_grid(fn: Callable) -> Verdict:
    """Exercise 00.2: (N, H, W, C) images -> one (rows*H, N/rows*W, C) grid."""
    rng = np.random.default_rng(0)
    cases = []
    for n, rows in [(6, 2), (4, 4), (8, 2)]:
        images = rng.integers(0, 256, size=(n, 5, 3, 3), dtype=np.uint8)
        cols = n // rows
        grid = images.reshape(rows, cols, 5, 3, 3).transpose(0, 2, 1, 3, 4)
        cases.append(Case((images, rows), grid.reshape(rows * 5, cols * 3, 3)))
    return check(
        "Exercise 00.2",
        fn,
        cases,
        hint='split the batch into (rows, cols) with "(r c) h w ch -> ...", '
        "then put r next to h and c next to w.",
    )


def check_channel_stats(fn: Callable) -> Verdict:
    """Exercise 00.3: per-channel mean and std over batch and space, shapes (C,)."""
    cases = []
    for seed, shape in enumerate([(4, 4, 8, 8), (2, 3, 5, 7)]):
        x = randn(*shape, seed=seed) * 3 + 1
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3), correction=0)
        cases.append(Case((x,), (mean, std)))
    return check(
        "Exercise 00.3",
        fn,
        cases,
        hint='reduce(x, "b c h w -> c", "mean") gives the mean; the std is the '
        "square root of the mean squared distance to it (divide by N, not N-1).",
        atol=1e-5,
        rtol=1e-5,
    )
