"""Chapter 01's typical attention mistakes, made on purpose: a learner's wrong
answer that equals one of them is named (`sdlearn.checks.attention`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sdlearn import attention as sd
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter


def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The scaled scores, (B, nh, Tq, Tk)."""
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def masked_weights_after_softmax(q, k, v, mask=None, causal=False):
    """The mistake of masking the weights after the softmax: blocked weights
    are 0, the others no longer sum to 1."""
    weights = scores(q, k).softmax(-1)  # (B, nh, Tq, Tk)
    if causal:
        weights = weights * sd.causal_mask(q.shape[2], k.shape[2])
    if mask is not None:
        if mask.is_floating_point():
            raise ValueError("an additive mask: another mistake")
        weights = weights * mask
    return weights @ v


def float_mask_as(use: Callable) -> Callable:
    """The mistake of an additive float mask used as `use(mask)` makes it."""

    def wrong(q, k, v, mask=None, causal=False):
        if mask is None or not mask.is_floating_point():
            raise ValueError("no float mask here")
        return sd.scaled_dot_product_attention(q, k, v, use(mask), causal)

    return wrong


def causal_as(triangle: Callable) -> Callable:
    """The mistake of a causal mask made as `triangle(Tq, Tk)`."""

    def wrong(q, k, v, mask=None, causal=False):
        if not causal:
            raise ValueError("no causal mask here")
        allowed = triangle(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool))
        if mask is not None and mask.dtype != torch.bool:
            return sd.scaled_dot_product_attention(
                q, k, v, mask.masked_fill(~allowed, -math.inf)
            )
        mask = allowed if mask is None else allowed & mask
        return sd.scaled_dot_product_attention(q, k, v, mask)

    return wrong
