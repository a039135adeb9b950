"""Checks for chapter 01's attention exercises.

Every reference is sdlearn.attention's own code, which tests/test_attention.py
holds to torch's `F.scaled_dot_product_attention`, to diffusers' `Attention` and
to transformers' CLIP attention: the attention function with its masks, the
heads' split and merge, and `Attention.forward` on the same weights.

Each check knows the usual mistakes: a mistake is a function that makes it, run
on the same inputs, and a wrong answer equal to one is named. A passing answer
is kept under the part of the package it stands for, so that the chapter, and
chapter 06's pipeline, run it again.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange

from sdlearn import attention as sd
from sdlearn.checks import (
    Case,
    Verdict,
    answers,
    check,
    compare_values,
    randn,
    seeded,
)
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.checks.attention_mistakes import (
    causal_as,
    float_mask_as,
    masked_weights_after_softmax,
    scores,
)

ATOL, RTOL = 1e-5, 1.3e-6  # float32 tolerance, as torch.testing.assert_close


class Inputs:
    """The arguments of one case, described in a few words when a case fails
    (their own reprs are pages of numbers)."""

    def __init__(self, description: str, *args: Any, **kwargs: Any) -> None:
        self.description = description
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return self.description


def _shapes(**tensors: torch.Tensor) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())


def _qkv(seed: int, B: int, nh: int, Tq: int, Tk: int, hd: int, hd_v: int):
    q = randn(B, nh, Tq, hd, seed=3 * seed)
    k = randn(B, nh, Tk, hd, seed=3 * seed + 1)
    v = randn(B, nh, Tk, hd_v, seed=3 * seed + 2)
    return q, k, v


def _padding(lengths: list[int], T: int) -> torch.Tensor:
    """(B, T) bool: True for the first lengths[b] tokens of sequence b."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


# --- Exercise 01.1: attention from the formula --------------------------------

# (B, nh, Tq, Tk, hd, hd_v): Tq != Tk catches a softmax over the wrong axis;
# hd != Tk a scale by the wrong length; hd_v != hd a scale by the values' width.
ATTENTION_SHAPES = [(2, 3, 5, 7, 16, 16), (1, 2, 6, 6, 8, 8), (2, 1, 4, 9, 32, 12)]

NOT_SCALED = (
    "the scores are not scaled: divide Q K^T by sqrt(hd) before the softmax, so "
    "that they keep unit variance however wide the heads are"
)
NO_SQUARE_ROOT = (
    "the scores are divided by hd, not by its square root: sqrt(hd) is what "
    "brings their variance back to 1"
)
SOFTMAX_OVER_QUERIES = (
    "the softmax runs over the queries (dim=-2): it must run over the keys, the "
    "last axis, so that each query's weights sum to 1"
)
SCALED_BY_VALUES = (
    "the scores are scaled by the values' width: the scale is sqrt(hd), hd being "
    "the width of the queries and keys (q.shape[-1]), which the dot product sums over"
)

ATTENTION_MISTAKES: dict[str, Callable] = {
    NOT_SCALED: lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) @ v,
    NO_SQUARE_ROOT: lambda q, k, v: (
        (q @ k.transpose(-2, -1) / q.shape[-1]).softmax(-1) @ v
    ),
    SOFTMAX_OVER_QUERIES: lambda q, k, v: scores(q, k).softmax(-2) @ v,
    SCALED_BY_VALUES: lambda q, k, v: (
        (q @ k.transpose(-2, -1) / math.sqrt(v.shape[-1])).softmax(-1) @ v
    ),
}


def check_attention(fn: Callable) -> Verdict:
    """Exercise 01.1: softmax(Q K^T / sqrt(hd)) V, q, k, v of shape (B, nh, T, hd)."""
    cases = []
    for seed, shape in enumerate(ATTENTION_SHAPES):
        q, k, v = _qkv(seed, *shape)
        cases.append(Case((q, k, v), sd.scaled_dot_product_attention(q, k, v)))
    return check(
        "Exercise 01.1",
        fn,
        cases,
        hints=[
            "three steps: score every query against every key, turn each query's "
            "row of scores into weights that sum to 1, then average the values "
            "with those weights.",
            "the scores are the queries times the keys with the keys' last two "
            "axes swapped, (B, nh, Tq, Tk), divided by the square root of hd = "
            "q.shape[-1]; the softmax runs over the last axis, the keys; the "
            "weights then multiply v.",
            "scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), then "
            "return scores.softmax(dim=-1) @ v",
        ],
        mistakes=ATTENTION_MISTAKES,
    )


# --- Exercise 01.2: the attention function with masks ---------------------------


def _mask_cases() -> list[Case]:
    """Every kind of mask the package takes, one per case, the hardest last."""
    g = torch.Generator().manual_seed(101)
    # padding that hides some keys of every sequence: inverted, it hides not all
    padding = _padding([3, 5], 7)[:, None, None, :]  # (B, 1, 1, Tk)
    allowed = torch.rand(2, 1, 5, 7, generator=g) > 0.5  # (B, 1, Tq, Tk)
    allowed[..., 0], allowed[..., -1] = True, False  # every row sees some, not all
    bias = 2 * torch.randn(2, 3, 5, 7, generator=g)  # (B, nh, Tq, Tk)
    bias[..., 2] = -math.inf
    causal_padding = _padding([4, 6], 6)[:, None, None, :]  # (B, 1, 1, T)
    nothing = torch.rand(1, 1, 4, 5, generator=g) > 0.4  # (B, 1, Tq, Tk)
    nothing[..., 0], nothing[:, :, 2] = True, False  # query 2 may attend to nothing
    cases = []
    for seed, (description, shape, mask, causal) in enumerate(
        [
            ("no mask", (2, 3, 5, 7, 16, 12), None, False),
            ("causal=True", (2, 2, 6, 6, 8, 8), None, True),
            (
                "a boolean padding mask (B, 1, 1, Tk)",
                (2, 3, 5, 7, 16, 16),
                padding,
                False,
            ),
            ("a boolean mask (B, 1, Tq, Tk)", (2, 3, 5, 7, 8, 8), allowed, False),
            ("an additive float mask (B, nh, Tq, Tk)", (2, 3, 5, 7, 8, 8), bias, False),
            (
                "causal=True and a boolean padding mask (B, 1, 1, T)",
                (2, 2, 6, 6, 8, 8),
                causal_padding,
                True,
            ),
            (
                "causal=True with fewer queries than keys",
                (1, 2, 4, 6, 8, 8),
                None,
                True,
            ),
            (
                "a boolean mask (B, 1, Tq, Tk) that hides every key from query 2",
                (1, 2, 4, 5, 8, 8),
                nothing,
                False,
            ),
        ]
    ):
        q, k, v = _qkv(100 + seed, *shape)
        expected = sd.scaled_dot_product_attention(q, k, v, mask, causal)
        kwargs = {"mask": mask, "causal": causal} if mask is not None or causal else {}
        text = f"for {_shapes(q=q, k=k, v=v)}, {description}"
        cases.append(Case((Inputs(text, q, k, v, **kwargs),), expected))
    return cases


MASK_AFTER_SOFTMAX = (
    "the mask is applied after the softmax: the blocked weights are 0, but the "
    "others no longer sum to 1; set the blocked scores to -inf before the softmax"
)
FLOAT_MASK_NOT_ADDED = (
    "a float mask was left out, or turned into booleans (its nonzero values all "
    "become True): a float mask is additive, add it to the scores (scores + "
    "mask) before the softmax; only a boolean mask blocks where it is False"
)
INVERTED_MASK = (
    "the boolean mask is inverted: True means a query MAY attend, so block the "
    "scores where the mask is False"
)
UPSIDE_DOWN = (
    "the causal mask is upside down: query i sees keys 0..i, the lower triangle "
    "(tril), not keys i..Tk-1"
)
BOTTOM_RIGHT = (
    "the causal mask is aligned to the bottom-right corner: like torch's "
    "is_causal, query i sees keys 0..i also when Tq != Tk (tril of a (Tq, Tk) "
    "matrix of ones, diagonal 0)"
)
CAUSAL_IGNORED = (
    "causal=True was ignored: query i sees keys 0..i only, on top of any mask"
)
MASK_IGNORED = (
    "the mask was ignored: block where a boolean mask is False, add a float one"
)
FULLY_MASKED_NAN = (
    "a query whose keys are all masked got NaN (the softmax of a row of -inf is "
    "0 / 0): give it zeros, as the package and torch do, e.g. by setting the NaN "
    "weights to 0"
)
NAN_ELSEWHERE = (
    "returned NaN where the reference has none: the softmax of a row of -inf is "
    "NaN. Does a mask hide every key of some query? (causal: query i sees keys "
    "0..i, itself included)"
)

# A mistake that cannot run on a case (an inverted float mask) raises and is
# passed over; one that gives the right numbers there is never matched.
MASK_MISTAKES: dict[str, Callable] = {
    NOT_SCALED: lambda q, k, v, mask=None, causal=False: (
        sd.scaled_dot_product_attention(q * math.sqrt(q.shape[-1]), k, v, mask, causal)
    ),
    MASK_AFTER_SOFTMAX: masked_weights_after_softmax,
    FLOAT_MASK_NOT_ADDED: float_mask_as(lambda mask: None),
    INVERTED_MASK: lambda q, k, v, mask=None, causal=False: (
        sd.scaled_dot_product_attention(q, k, v, ~mask, causal)
    ),
    UPSIDE_DOWN: causal_as(torch.triu),
    BOTTOM_RIGHT: causal_as(lambda m: m.tril(diagonal=m.shape[1] - m.shape[0])),
    CAUSAL_IGNORED: lambda q, k, v, mask=None, causal=False: (
        sd.scaled_dot_product_attention(q, k, v, mask)
    ),
    MASK_IGNORED: lambda q, k, v, mask=None, causal=False: (
        sd.scaled_dot_product_attention(q, k, v, None, causal)
    ),
}


def _unpacked(fn: Callable) -> Callable:
    """The learner's function, called with the arguments an `Inputs` holds."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> Any:
        return fn(*inputs.args, **inputs.kwargs)

    return call


def _mask_problem(actual: Any, case: Case) -> str | None:
    expected = case.expected
    if (
        isinstance(actual, torch.Tensor)
        and actual.shape == expected.shape
        and torch.isnan(actual).any()
    ):
        nan_rows = torch.isnan(actual).any(dim=-1)  # (B, nh, Tq)
        empty_rows = (expected == 0).all(dim=-1)  # (B, nh, Tq): fully masked
        if bool((nan_rows <= empty_rows).all()):
            return FULLY_MASKED_NAN
        return NAN_ELSEWHERE
    return compare_values(actual, expected, ATOL, RTOL)


def check_scaled_dot_product_attention(fn: Callable) -> Verdict:
    """Exercise 01.2: attention with a boolean or additive mask and a causal flag,
    as `sdlearn.attention.scaled_dot_product_attention`; kept as
    "attention:scaled_dot_product_attention"."""
    return check(
        "Exercise 01.2",
        _unpacked(fn),
        _mask_cases(),
        hints=[
            "masks act on the scores, before the softmax: a blocked score becomes "
            "-inf, its weight exactly 0, and the other weights still sum to 1.",
            "a boolean mask is True where a query may attend, so block where it "
            "is False; a float mask is added to the scores; causal=True blocks "
            "key j > i for query i, on top of any mask, with a (Tq, Tk) lower "
            "triangle; a row with every key blocked is NaN after the softmax and "
            "must become zeros.",
            "scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]); if causal: "
            "scores = scores.masked_fill(~torch.ones(Tq, Tk, dtype=torch.bool)"
            '.tril(), float("-inf")); a boolean mask: scores.masked_fill(~mask, '
            'float("-inf")); a float one: scores + mask; then '
            "scores.softmax(dim=-1).nan_to_num(0.0) @ v",
        ],
        compare=_mask_problem,
        mistakes={m: _unpacked(wrong) for m, wrong in MASK_MISTAKES.items()},
        keep="attention:scaled_dot_product_attention",
    )


# --- Exercises 01.3 and 01.4: split and merge the heads -------------------------

# (B, T, D, nh): nh != hd catches heads interleaved; T != nh a missing transpose
HEAD_SHAPES = [(2, 5, 12, 3), (1, 7, 8, 2), (3, 4, 6, 6)]

VIEWED_STRAIGHT = (
    "the tensor was viewed straight to (B, nh, T, hd): the right shape, but each "
    "'head' holds a run of whole tokens. First cut D into (nh, hd), giving "
    "(B, T, nh, hd), then swap the T and nh axes"
)
SPLIT_INTERLEAVED = (
    "the heads are interleaved: head h must hold the consecutive features "
    "h*hd .. (h+1)*hd - 1, not every nh-th feature; D is (nh hd), heads first"
)
NOT_SWAPPED = (
    "the features are cut into heads but the axes are not swapped: (B, T, nh, hd) "
    "must become (B, nh, T, hd), so that each head is a sequence of T tokens"
)

SPLIT_MISTAKES: dict[str, Callable] = {
    VIEWED_STRAIGHT: lambda x, nh: x.reshape(x.shape[0], nh, x.shape[1], -1),
    SPLIT_INTERLEAVED: lambda x, nh: rearrange(x, "B T (hd nh) -> B nh T hd", nh=nh),
    NOT_SWAPPED: lambda x, nh: x.reshape(x.shape[0], x.shape[1], nh, -1),
}


def check_split_heads(fn: Callable) -> Verdict:
    """Exercise 01.3: (B, T, D) -> (B, nh, T, hd), head h holding features h*hd..;
    kept as "attention:split_heads"."""
    cases = []
    for seed, (B, T, D, nh) in enumerate(HEAD_SHAPES):
        x = randn(B, T, D, seed=20 + seed)
        cases.append(Case((x, nh), sd.split_heads(x, nh)))
    return check(
        "Exercise 01.3",
        fn,
        cases,
        hints=[
            "cut each token's D features into nh consecutive slices of hd = D / nh, "
            "then make the heads an axis in front of the tokens.",
            "two moves: split the last axis into (nh, hd), which gives "
            "(B, T, nh, hd), then swap axes 1 and 2. einops can say both at once, "
            "with the axes named.",
            "x.view(B, T, num_heads, D // num_heads).transpose(1, 2), or "
            'rearrange(x, "B T (nh hd) -> B nh T hd", nh=num_heads)',
        ],
        mistakes=SPLIT_MISTAKES,
        keep="attention:split_heads",
    )


MERGED_UNSWAPPED = (
    "the heads were joined without swapping the axes back, which mixes up the "
    "tokens: (B, nh, T, hd) must become (B, T, nh, hd) first"
)
MERGE_INTERLEAVED = (
    "the heads are interleaved: each token's slices go side by side, head 0's hd "
    "features first, then head 1's: (nh hd), the inverse of split_heads"
)
NOT_JOINED = (
    "the axes are swapped back but the heads not joined: return (B, T, nh*hd), "
    "one vector per token"
)

MERGE_MISTAKES: dict[str, Callable] = {
    MERGED_UNSWAPPED: lambda x: x.reshape(x.shape[0], x.shape[2], -1),
    MERGE_INTERLEAVED: lambda x: rearrange(x, "B nh T hd -> B T (hd nh)"),
    NOT_JOINED: lambda x: x.transpose(1, 2),
}


def check_merge_heads(fn: Callable) -> Verdict:
    """Exercise 01.4: (B, nh, T, hd) -> (B, T, nh*hd), the inverse of split_heads;
    kept as "attention:merge_heads"."""
    cases = []
    for seed, (B, T, D, nh) in enumerate(HEAD_SHAPES):
        x = randn(B, nh, T, D // nh, seed=30 + seed)
        cases.append(Case((x,), sd.merge_heads(x)))
    return check(
        "Exercise 01.4",
        fn,
        cases,
        hints=[
            "undo split_heads step by step, in the reverse order.",
            "swap the nh and T axes back, then join the last two axes (nh, hd) into "
            "one. After a transpose the tensor is not contiguous, so `view` refuses "
            "to join axes; `reshape` copies when it must.",
            "x.transpose(1, 2).reshape(B, T, nh * hd), or "
            'rearrange(x, "B nh T hd -> B T (nh hd)")',
        ],
        mistakes=MERGE_MISTAKES,
        keep="attention:merge_heads",
    )


# --- Exercise 01.5: the multi-head layer's forward ------------------------------


def _layer_cases() -> list[Case]:
    """Self-attention as in the UNet, cross-attention, CLIP's causal attention
    with biases and padding, and both kinds of mask Attention.forward takes."""
    cases = []

    def add(description: str, layer: sd.Attention, x, context=None, **kwargs):
        with torch.no_grad():
            expected = sd.Attention.forward(layer, x, context, **kwargs)
        named = {"hidden_states": x, "encoder_hidden_states": context, **kwargs}
        text = f"for {description}: {layer.heads} heads of width {layer.dim_head}"
        for name, value in named.items():
            if isinstance(value, torch.Tensor):
                text += f", {name} {tuple(value.shape)} {str(value.dtype)[6:]}"
            elif name == "causal":
                text += f", causal={value}"
        cases.append(Case((Inputs(text, layer, x, context, **kwargs),), expected))

    def layer(seed: int, *args: Any, **kwargs: Any) -> sd.Attention:
        with torch.device("meta"):
            module = sd.Attention(*args, **kwargs)
        return seeded(module, seed)

    unet_self = layer(40, 12, heads=3, dim_head=4)
    add("self-attention", unet_self, randn(2, 5, 12, seed=41))
    # widths that match, so that keys taken from hidden_states still run
    same_width = layer(42, 12, cross_attention_dim=12, heads=2, dim_head=6)
    x, context = randn(2, 5, 12, seed=43), randn(2, 7, 12, seed=44)
    add("cross-attention", same_width, x, context)
    # the UNet's: a context of another width, nh * hd != D
    unet_cross = layer(45, 12, cross_attention_dim=10, heads=2, dim_head=8)
    x, context = randn(2, 5, 12, seed=46), randn(2, 7, 10, seed=47)
    add("cross-attention", unet_cross, x, context)
    clip = layer(48, 16, heads=4, dim_head=4, bias=True)
    add("CLIP's self-attention", clip, randn(2, 6, 16, seed=49), causal=True)
    add(
        "CLIP's self-attention with padding",
        clip,
        randn(2, 6, 16, seed=50),
        attention_mask=_padding([4, 6], 6),
        causal=True,
    )
    add(
        "cross-attention with padded context",
        unet_cross,
        x,
        context,
        attention_mask=_padding([5, 7], 7),
    )
    bias = 2 * randn(2, 5, 7, seed=51)  # (B, T, S)
    bias[:, :, 3] = -math.inf
    x, context = randn(2, 5, 12, seed=52), randn(2, 7, 12, seed=53)
    add(
        "cross-attention with a mask per query",
        same_width,
        x,
        context,
        attention_mask=bias,
    )
    # a mask that has its four axes already (as chapter 03's causal one): as it is
    four_axes = randn(2, 1, 5, 7, seed=54) > -0.5  # (B, 1, T, S)
    four_axes[..., 0] = True  # every query sees a key
    add(
        "cross-attention with a (B, 1, T, S) mask",
        same_width,
        x,
        context,
        attention_mask=four_axes,
    )
    return cases


def _bound(fn: Callable) -> Callable:
    """The learner's forward, run as the method of the case's layer."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> Any:
        layer, hidden_states, context = inputs.args
        forward = types.MethodType(fn, layer)
        with torch.no_grad():
            return forward(hidden_states, context, **inputs.kwargs)

    return call


def _forward(
    inputs: Inputs,
    *,
    keys_from_queries: bool = False,
    swap: bool = False,
    heads_of_width_heads: bool = False,
    to_out: bool = True,
    drop: tuple[str, ...] = (),
) -> torch.Tensor:
    """`Attention.forward` on a case's inputs, with one choice made another way:
    keys from the queries' tokens, queries and keys swapped, dim_head heads,
    no to_out, or the arguments named in `drop` not passed on."""
    layer, queries, context = inputs.args
    kwargs = {k: v for k, v in inputs.kwargs.items() if k not in drop}
    mask, causal = kwargs.get("attention_mask"), kwargs.get("causal", False)
    if context is None or keys_from_queries:
        context = queries
    if swap:
        queries, context = context, queries
    if mask is not None:  # (B, S) or (B, T, S) -> (B, 1, 1 or T, S)
        mask = mask[:, None, None] if mask.ndim == 2 else mask[:, None]
    heads = layer.dim_head if heads_of_width_heads else layer.heads
    with torch.no_grad():
        q = sd.split_heads(layer.to_q(queries), heads)
        k = sd.split_heads(layer.to_k(context), heads)
        v = sd.split_heads(layer.to_v(context), heads)
        out = sd.merge_heads(sd.scaled_dot_product_attention(q, k, v, mask, causal))
        return layer.to_out[1](layer.to_out[0](out)) if to_out else out


KEYS_FROM_HIDDEN = (
    "the keys and values come from hidden_states although encoder_hidden_states "
    "is given: in cross-attention they come from the context, the queries from "
    "hidden_states"
)
QUERIES_FROM_CONTEXT = (
    "the queries come from encoder_hidden_states: the queries are hidden_states "
    "(one output token per query), the keys and values come from the context"
)
HEADS_SWAPPED = (
    "the tokens are split into dim_head heads of width heads: the number of "
    "heads is self.heads"
)
NO_TO_OUT = (
    "to_out is missing: the merged heads still go through self.to_out[0] (a "
    "Linear that mixes the heads) and self.to_out[1] (dropout)"
)
# the kept answers the kept forward calls, by the names it calls them
CALLED_BY_FORWARD = ("split_heads", "scaled_dot_product_attention", "merge_heads")

MASK_NOT_PASSED = "attention_mask was not passed on to the attention function"
CAUSAL_NOT_PASSED = "causal was not passed on to the attention function"

FORWARD_MISTAKES: dict[str, Callable] = {
    KEYS_FROM_HIDDEN: functools.partial(_forward, keys_from_queries=True),
    QUERIES_FROM_CONTEXT: functools.partial(_forward, swap=True),
    HEADS_SWAPPED: functools.partial(_forward, heads_of_width_heads=True),
    NO_TO_OUT: functools.partial(_forward, to_out=False),
    MASK_NOT_PASSED: functools.partial(_forward, drop=("attention_mask",)),
    CAUSAL_NOT_PASSED: functools.partial(_forward, drop=("causal",)),
}


def check_attention_forward(fn: Callable) -> Verdict:
    """Exercise 01.5: `Attention.forward`, written as a function taking `self`;
    kept as "attention:Attention.forward". The kept forward calls the kept
    attention function and heads by name, so a pass says which are not kept."""
    verdict = check(
        "Exercise 01.5",
        _bound(fn),
        _layer_cases(),
        hints=[
            "five steps: project the tokens to queries, keys and values, split "
            "them into heads, attend, merge the heads, project back out. The keys "
            "and values come from encoder_hidden_states when it is given, else "
            "from hidden_states.",
            "q from self.to_q(hidden_states), k and v from self.to_k and self.to_v "
            "of the context, each split into self.heads heads; a (B, S) mask "
            "becomes (B, 1, 1, S) and a (B, T, S) one (B, 1, T, S), so that it "
            "broadcasts over the heads; pass it and causal to your attention "
            "function; merge, then self.to_out[0] and self.to_out[1].",
            "context = hidden_states if encoder_hidden_states is None else "
            "encoder_hidden_states; q = split_heads(self.to_q(hidden_states), "
            "self.heads), k and v alike from context; mask = attention_mask[:, None, "
            "None] for 2 dims, attention_mask[:, None] for 3, as it is for 4; out = "
            "merge_heads("
            "scaled_dot_product_attention(q, k, v, mask, causal)); return "
            "self.to_out[1](self.to_out[0](out))",
        ],
        mistakes=FORWARD_MISTAKES,
        keep="attention:Attention.forward",
    )
    if verdict:
        kept = answers.kept("attention")
        missing = [name for name in CALLED_BY_FORWARD if name not in kept]
        if missing:
            print(
                f"   Your forward calls {', '.join(missing)}, not kept yet: until "
                "their checks pass, later chapters run the package's forward."
            )
    return verdict
