"""Checks for chapter 01's attention exercises.

The references are torch's own `F.scaled_dot_product_attention` for the attention
exercises, and plain unflatten/permute/flatten for the heads, so a check
compares the learner's code with an independent way of computing the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F

from sdlearn.checks import Case, Verdict, check, randn

# (B, nh, Tq, Tk, hd, hd_v): Tq != Tk catches a transpose or a softmax over the
# wrong axis; hd != Tk catches a scale by the wrong length; hd_v != hd catches a
# scale by the values' width.
ATTENTION_SHAPES = [(2, 3, 5, 7, 16, 16), (1, 2, 6, 6, 8, 8), (2, 1, 4, 9, 32, 12)]
# self-attention: a causal mask needs as many queries as keys
CAUSAL_SHAPES = [(2, 3, 6, 16), (1, 2, 9, 8), (3, 1, 4, 4)]
# (B, T, D, nh)
HEAD_SHAPES = [(2, 5, 12, 3), (1, 7, 8, 2), (3, 4, 6, 6)]


def _qkv(seed: int, B: int, nh: int, Tq: int, Tk: int, hd: int, hd_v: int):
    q = randn(B, nh, Tq, hd, seed=3 * seed)
    k = randn(B, nh, Tk, hd, seed=3 * seed + 1)
    v = randn(B, nh, Tk, hd_v, seed=3 * seed + 2)
    return q, k, v


def check_attention(fn: Callable) -> Verdict:
    """Exercise 01.1: softmax(Q K^T / sqrt(hd)) V, q, k, v of shape (B, nh, T, hd)."""
    cases = []
    for seed, shape in enumerate(ATTENTION_SHAPES):
        q, k, v = _qkv(seed, *shape)
        cases.append(Case((q, k, v), F.scaled_dot_product_attention(q, k, v)))
    return check(
        "Exercise 01.1",
        fn,
        cases,
        hint="scores = q @ k.transpose(-2, -1) / sqrt(hd) with hd = q.shape[-1] "
        "has shape (B, nh, Tq, Tk); softmax over the last axis (the keys), "
        "then multiply by v.",
    )


def check_causal_attention(fn: Callable) -> Verdict:
    """Exercise 01.2: attention where query i sees only keys 0..i."""
    cases = []
    for seed, (B, nh, T, hd) in enumerate(CAUSAL_SHAPES):
        q, k, v = _qkv(10 + seed, B, nh, T, T, hd, hd)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        cases.append(Case((q, k, v), expected))
    return check(
        "Exercise 01.2",
        fn,
        cases,
        hint="allowed = torch.ones(T, T, dtype=torch.bool).tril() is True on and "
        "below the diagonal (query i, keys 0..i); set the scores where it is "
        "False to -inf *before* the softmax.",
    )


def check_split_heads(fn: Callable) -> Verdict:
    """Exercise 01.3: (B, T, D) -> (B, nh, T, hd), head h holding features h*hd.."""
    cases = []
    for seed, (B, T, D, nh) in enumerate(HEAD_SHAPES):
        x = randn(B, T, D, seed=20 + seed)
        expected = x.unflatten(-1, (nh, D // nh)).permute(0, 2, 1, 3)
        cases.append(Case((x, nh), expected))
    return check(
        "Exercise 01.3",
        fn,
        cases,
        hint="first cut D into (nh, hd): x.view(B, T, nh, hd); then swap the "
        "T and nh axes with .transpose(1, 2). Viewing straight to (B, nh, T, hd) "
        "has the right shape but mixes up the tokens.",
    )


def check_merge_heads(fn: Callable) -> Verdict:
    """Exercise 01.4: (B, nh, T, hd) -> (B, T, nh*hd), the inverse of split_heads."""
    cases = []
    for seed, (B, T, D, nh) in enumerate(HEAD_SHAPES):
        x = randn(B, nh, T, D // nh, seed=30 + seed)
        cases.append(Case((x,), x.permute(0, 2, 1, 3).flatten(2)))
    return check(
        "Exercise 01.4",
        fn,
        cases,
        hint="swap nh and T back first with .transpose(1, 2), then join (nh, hd) "
        "into one axis with .reshape(B, T, nh * hd); .view fails there because "
        "the transposed tensor is not contiguous.",
    )
