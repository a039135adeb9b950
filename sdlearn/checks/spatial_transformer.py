"""Checks for chapter 04's spatial transformer exercises: the GEGLU gate, the
feed-forward around it and the SpatialTransformer's forward, which turns a
feature map into tokens and back.

The references are sdlearn's own `GEGLU`, `FeedForward` and
`SpatialTransformer`, which the test suite holds to diffusers number for number.
The learner's function gets the very same modules, with seeded weights far from
their initial values, and is bound to them as their own method
(`as_method`), as the later chapters run it. Every check names the usual
mistakes: each is a function computing what that mistake gives.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn import spatial_transformer
from sdlearn.checks import Case, Verdict, check, randn, seeded
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter


def as_method(fn: Callable) -> Callable:
    """`fn(self, ...)` called as the module's own method, as later chapters run it."""

    @functools.wraps(fn)
    def call(module, *args, **kwargs):
        return types.MethodType(fn, module)(*args, **kwargs)

    return call


def _seeded_cases(make, shapes, seed: int, extra=()) -> list[Case]:
    """A case per shape: `make(*shape)` -> module with seeded weights, input
    (B, T, D) of the shape's last three sizes, the module's output expected."""
    cases = []
    for i, shape in enumerate(shapes):
        *sizes, B, T, D = shape
        with torch.device("meta"):
            module = make(*sizes)
        module = seeded(module, seed + i)
        x = randn(B, T, D, seed=seed + 10 + i)
        with torch.no_grad():
            expected = module(x)
        cases.append(Case((module, x), expected))
    return cases


class GEGLU(spatial_transformer.GEGLU):
    """sdlearn's GEGLU with a one-line repr, so a failure message stays short."""

    def __repr__(self) -> str:
        return f"GEGLU({self.proj.in_features} -> {self.proj.out_features // 2})"


class FeedForward(spatial_transformer.FeedForward):
    """sdlearn's FeedForward with a one-line repr, for short failure messages."""

    def __repr__(self) -> str:
        return f"FeedForward(dim={self.net[2].out_features})"


class SpatialTransformer(spatial_transformer.SpatialTransformer):
    """sdlearn's SpatialTransformer with a one-line repr, for short messages."""

    def __repr__(self) -> str:
        kind = "Linear" if isinstance(self.proj_in, nn.Linear) else "1x1 conv"
        return (
            f"SpatialTransformer(channels={self.norm.num_channels}, "
            f"depth={len(self.transformer_blocks)}, proj_in={kind})"
        )


# --- Exercise 04.3: the GEGLU gate -------------------------------------------------

# (dim_in, dim_out, B, T, D = dim_in): an even T first, so that a chunk over the
# tokens runs (and is named) instead of failing
GEGLU_SHAPES = [(8, 12, 2, 6, 8), (16, 8, 1, 5, 16), (6, 10, 3, 4, 6)]


def _geglu(self, x, *, split_dim=-1, swap=False, gate=F.gelu):
    """GEGLU's forward, or what one of the usual mistakes makes of it."""
    value, gate_half = self.proj(x).chunk(2, dim=split_dim)
    if swap:
        value, gate_half = gate_half, value
    return value * gate(gate_half)


GEGLU_MISTAKES = {
    "value and gate are swapped: the first half is the value, the GELU of the "
    "second half gates it": functools.partial(_geglu, swap=True),
    "the chunk split the tokens, not the features: split the last axis, "
    "chunk(2, dim=-1)": functools.partial(_geglu, split_dim=1),
    "the gate used GELU's tanh approximation; SD's is the exact GELU, "
    "F.gelu(gate)": functools.partial(
        _geglu, gate=functools.partial(F.gelu, approximate="tanh")
    ),
    "the gate is a SiLU (SwiGLU, as in LLaMA); SD's gate is a GELU": (
        functools.partial(_geglu, gate=F.silu)
    ),
}

GEGLU_HINTS = [
    "One projection makes twice the width you need. Split it into two halves: "
    "one carries the values, the other, through a GELU, says how much of each "
    "value passes.",
    "self.proj(x) is (B, T, 2 * dim_out). Split it in two along the last axis: "
    "the first half is the value, the second the gate. Return value * "
    "GELU(gate), elementwise.",
    "value, gate = self.proj(x).chunk(2, dim=-1); return value * F.gelu(gate).",
]


def check_geglu_forward(fn: Callable) -> Verdict:
    """Exercise 04.3: `geglu_forward(self, x)`, GEGLU.forward."""
    cases = _seeded_cases(GEGLU, GEGLU_SHAPES, 500)
    with torch.no_grad():
        return check(
            "Exercise 04.3",
            as_method(fn),
            cases,
            hints=GEGLU_HINTS,
            mistakes=GEGLU_MISTAKES,
            keep="spatial_transformer:GEGLU.forward",
        )


# --- Exercise 04.4: the feed-forward -----------------------------------------------

# (dim, B, T, D = dim)
FEED_FORWARD_SHAPES = [(8, 2, 5, 8), (12, 1, 7, 12), (4, 3, 2, 4)]


def _feed_forward(self, x, *, activation=None, residual=False):
    """FeedForward's forward, or what one of the usual mistakes makes of it."""
    h = self.net[0](x)  # (B, T, 4D)
    if activation is not None:
        h = activation(h)
    h = self.net[2](self.net[1](h))  # (B, T, D)
    return x + h if residual else h


FEED_FORWARD_MISTAKES = {
    "an activation after the GEGLU: its gate already is the non-linearity, "
    "net[2] reads its output as it is": functools.partial(
        _feed_forward, activation=F.gelu
    ),
    "the residual was added here; the TransformerBlock adds it, "
    "x + ff(norm3(x)), so the feed-forward returns its output alone": (
        functools.partial(_feed_forward, residual=True)
    ),
    "the projection back to D is missing: net[2] maps the 4 x D hidden width "
    "back to D": lambda self, x: self.net[0](x),
}

FEED_FORWARD_HINTS = [
    "Each token on its own: widen it through the gated layer, then project it "
    "back to its width.",
    "self.net holds three layers, in order: net[0] the GEGLU (D -> 4D), net[1] "
    "a dropout (a no-op here), net[2] a Linear (4D -> D). Run them one after "
    "the other; nothing else.",
    "h = self.net[0](x); h = self.net[1](h); return self.net[2](h).",
]


def check_feed_forward(fn: Callable) -> Verdict:
    """Exercise 04.4: `feed_forward(self, x)`, FeedForward.forward."""
    cases = _seeded_cases(FeedForward, FEED_FORWARD_SHAPES, 520)
    with torch.no_grad():
        return check(
            "Exercise 04.4",
            as_method(fn),
            cases,
            atol=1e-5,
            rtol=1e-5,
            hints=FEED_FORWARD_HINTS,
            mistakes=FEED_FORWARD_MISTAKES,
            keep="spatial_transformer:FeedForward.forward",
        )


# --- Exercise 04.6: the spatial transformer ----------------------------------------

# (C, nh, context width, depth, groups, linear projections, x shape, S): H != W
# catches a transposed map, depth 2 a single block, both kinds of proj_in run
SPATIAL_CASES = [
    (16, 2, 12, 1, 4, False, (2, 16, 3, 5), 4),
    (16, 4, 8, 2, 4, True, (1, 16, 4, 4), 6),
    (24, 3, 24, 1, 8, False, (3, 24, 2, 3), 5),
]


def _project(projection: nn.Module, h: torch.Tensor, on_map: bool) -> torch.Tensor:
    """proj_in or proj_out where a learner runs it: a 1x1 convolution on the
    map, a Linear on the tokens; `h` is whichever `on_map` says."""
    is_conv = isinstance(projection, nn.Conv2d)
    return projection(h) if is_conv == on_map else h


def _spatial(self, x, context, *, mistake=""):
    """The SpatialTransformer's forward, or what one of the usual mistakes
    makes of it."""
    B, C, H, W = x.shape
    h = x if mistake == "no norm" else self.norm(x)
    if mistake != "no proj_in":
        h = _project(self.proj_in, h, on_map=True)
    if mistake == "reshape":
        h = h.reshape(B, H * W, C)  # (B, T, C), pixels and channels mixed
    else:
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, T, C)
    if mistake != "no proj_in":
        h = _project(self.proj_in, h, on_map=False)
    for block in self.transformer_blocks:
        h = block(h, context)
    if mistake != "no proj_out":
        h = _project(self.proj_out, h, on_map=False)
    if mistake == "reshape":
        h = h.reshape(B, C, H, W)
    else:
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
    if mistake != "no proj_out":
        h = _project(self.proj_out, h, on_map=True)
    if mistake == "no residual":
        return h
    return (self.norm(x) if mistake == "normed residual" else x) + h


def _spatial_mistake(mistake: str) -> Callable:
    return functools.partial(_spatial, mistake=mistake)


SPATIAL_MISTAKES = {
    "the residual added the normalised map; add x, the input from before the "
    "GroupNorm, so that the map keeps its own features and scale": (
        _spatial_mistake("normed residual")
    ),
    "the input is not added back: the block returns x + its output": (
        _spatial_mistake("no residual")
    ),
    "the tokens came from a reshape without a permute: (B, C, H, W).reshape(B, "
    "H * W, C) mixes channels and pixels; move C last first, "
    "rearrange(h, 'B C H W -> B (H W) C'), and back the same way": (
        _spatial_mistake("reshape")
    ),
    "proj_out is missing: the tokens go through proj_out on their way back": (
        _spatial_mistake("no proj_out")
    ),
    "proj_in is missing: the normalised map goes through proj_in on its way "
    "in": _spatial_mistake("no proj_in"),
    "the GroupNorm is missing: self.norm(x) comes first": _spatial_mistake("no norm"),
}

SPATIAL_HINTS = [
    "Three moves. Normalise the map and make its pixels tokens of width C; run "
    "the transformer blocks on them with the text; make them a map again and "
    "add the input. proj_in comes right after the norm, proj_out right before "
    "the residual.",
    "self.norm(x) first. (B, C, H, W) -> (B, H*W, C) needs C moved last: a "
    "permute (or einops' rearrange), not a bare reshape. proj_in is a 1x1 "
    "convolution (run it on the map, before the tokens) or a Linear (run it on "
    "the tokens): isinstance(self.proj_in, nn.Conv2d) tells which. Each block "
    "of self.transformer_blocks takes (tokens, context). proj_out mirrors "
    "proj_in. The residual adds x, from before the norm.",
    "h = self.norm(x); if conv: h = self.proj_in(h); h = rearrange(h, 'B C H W "
    "-> B (H W) C'); else: the rearrange, then self.proj_in(h); for block in "
    "self.transformer_blocks: h = block(h, context); then proj_out and "
    "rearrange(h, 'B (H W) C -> B C H W', H=H, W=W) in the mirror order; "
    "return x + h.",
]


def _spatial_cases() -> list[Case]:
    cases = []
    for seed, case in enumerate(SPATIAL_CASES):
        channels, heads, c_dim, depth, groups, linear, shape, S = case
        with torch.device("meta"):
            module = SpatialTransformer(
                channels,
                heads,
                c_dim,
                depth=depth,
                groups=groups,
                use_linear_projection=linear,
            )
        module = seeded(module, 540 + seed)
        x = randn(*shape, seed=550 + seed)
        context = randn(shape[0], S, c_dim, seed=560 + seed)
        with torch.no_grad():
            expected = module(x, context)
        cases.append(Case((module, x, context), expected))
    return cases


def check_spatial_transformer_forward(fn: Callable) -> Verdict:
    """Exercise 04.6: `spatial_transformer_forward(self, x, context)`,
    SpatialTransformer.forward."""
    with torch.no_grad():
        return check(
            "Exercise 04.6",
            as_method(fn),
            _spatial_cases(),
            atol=1e-4,  # transformer blocks of unit-scale seeded weights
            rtol=1e-5,
            hints=SPATIAL_HINTS,
            mistakes=SPATIAL_MISTAKES,
            keep="spatial_transformer:SpatialTransformer.forward",
        )
