"""Checks for chapter 04's UNet block exercises: the forward passes of the down
block (which pushes the skips), the mid block and the up block (which pops
them).

The references are sdlearn's own `DownBlock`, `MidBlock` and `UpBlock`, which the
test suite holds to diffusers' blocks through the whole UNet. The learner's
function gets the very same blocks, with seeded weights, bound as their own
method. A block's skips are part of its answer: the check compares the maps a
down block pushes, and how many an up block pops, as well as what it returns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from sdlearn import unet
from sdlearn.checks import Case, Verdict, check, compare_values, randn, seeded
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.checks.spatial_transformer import as_method

# the blocks' config: norms of 4 groups, text tokens (B, S, 12)
TEXT = (3, 12)  # (S, D_text)


def _config(layers: int = 1) -> unet.UNetConfig:
    return unet.UNetConfig(
        block_out_channels=(8,),
        layers_per_block=layers,
        cross_attention_levels=(True,),
        num_heads=(1,),
        cross_attention_dim=TEXT[1],
        norm_num_groups=4,
    )


def _describe_block(block) -> str:
    kinds = [
        name
        for name in ("attentions", "downsamplers", "upsamplers")
        if getattr(block, name, None) is not None
    ]
    return (
        f"{type(block).__name__}({len(block.resnets)} ResnetBlocks"
        + "".join(f", {kind}" for kind in kinds)
        + ")"
    )


class DownBlock(unet.DownBlock):
    """sdlearn's DownBlock with a one-line repr, for short failure messages."""

    __repr__ = _describe_block


class MidBlock(unet.MidBlock):
    """sdlearn's MidBlock with a one-line repr, for short failure messages."""

    __repr__ = _describe_block


class UpBlock(unet.UpBlock):
    """sdlearn's UpBlock with a one-line repr, for short failure messages."""

    __repr__ = _describe_block


class Skips(list):
    """A skip stack with a one-line repr, for short failure messages."""

    def __repr__(self) -> str:
        return f"({len(self)} feature maps)"


def _inputs(shape, time_dim: int, seed: int):
    """x of `shape`, a time embedding and text tokens of the same batch."""
    B = shape[0]
    x = randn(*shape, seed=seed)
    temb = randn(B, time_dim, seed=seed + 1)
    context = randn(B, *TEXT, seed=seed + 2)
    return x, temb, context


# --- Exercise 04.7: the down block ---------------------------------------------------

# (layers, C_in, C_out, cross-attention, downsample, x shape): H != W, a level
# without attention, the coarsest level without a downsampler
DOWN_CASES = [
    (2, 8, 16, True, True, (2, 8, 6, 4)),
    (1, 16, 16, False, True, (1, 16, 4, 4)),
    (2, 16, 24, True, False, (2, 16, 3, 5)),
]


def _pushing(forward: Callable) -> Callable:
    """`forward(block, x, temb, context, skips)` run with an empty skip list:
    (its output, the maps it pushed)."""

    @functools.wraps(forward)
    def run(block, x, temb, context):
        skips = []
        out = forward(block, x, temb, context, skips)
        return out, skips

    return run


def _down(self, x, temb, context, skips, *, mistake=""):
    """The down block's forward, or what one of the usual mistakes makes of it."""
    for i, resnet in enumerate(self.resnets):
        if mistake == "push input":
            skips.append(x)
        x = resnet(x, temb)
        if mistake == "push before attention":
            skips.append(x)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
        if mistake in ("", "no downsample push"):
            skips.append(x)
    if self.downsamplers is not None:
        x = self.downsamplers[0](x)
        if mistake != "no downsample push":
            skips.append(x)
    return x


def _down_mistake(mistake: str) -> Callable:
    return _pushing(functools.partial(_down, mistake=mistake))


DOWN_MISTAKES = {
    "a feature map was pushed before its SpatialTransformer ran: push what the "
    "layer gives, after the attention": _down_mistake("push before attention"),
    "each ResnetBlock's input was pushed; push its output (after the "
    "SpatialTransformer, where there is one)": _down_mistake("push input"),
    "the downsampler's output was not pushed: the way up reads it too, which "
    "is why it has one ResnetBlock more per level": _down_mistake("no downsample push"),
}

DOWN_HINTS = [
    "Run the layers in order and remember what each gives: every feature map "
    "the way up will need goes onto `skips`.",
    "For each ResnetBlock i: resnet(x, temb), then attentions[i](x, context) "
    "when the block has attentions (self.attentions is not None), then push x. "
    "After the loop, when there is a downsampler (self.downsamplers is not "
    "None), run downsamplers[0] and push again. Return x.",
    "for i, resnet in enumerate(self.resnets): x = resnet(x, temb); if "
    "self.attentions is not None: x = self.attentions[i](x, context); "
    "skips.append(x). Then if self.downsamplers is not None: x = "
    "self.downsamplers[0](x); skips.append(x). return x.",
]


def _compare_pushes(actual, case: Case) -> str | None:
    """What differs between (output, pushed maps) and the reference's, in words."""
    expected_out, expected_skips = case.expected
    out, skips = actual
    problem = compare_values(out, expected_out, ATOL, RTOL)
    if problem:
        return f"the block's output {problem}"
    if len(skips) != len(expected_skips):
        return (
            f"pushed {len(skips)} feature maps, expected {len(expected_skips)}: one "
            "per ResnetBlock (after its SpatialTransformer, where there is one) "
            "and one after the downsampler"
        )
    for i, (skip, expected) in enumerate(zip(skips, expected_skips, strict=True)):
        problem = compare_values(skip, expected, ATOL, RTOL)
        if problem:
            return f"pushed map {i + 1} of {len(skips)} {problem}"
    return None


# blocks of unit-scale seeded weights lose a few float32 digits
ATOL, RTOL = 1e-4, 1e-5


def check_down_block_forward(fn: Callable) -> Verdict:
    """Exercise 04.7: `down_block_forward(self, x, temb, context, skips)`,
    DownBlock.forward."""
    cases = []
    for seed, (layers, c_in, c_out, cross, down, shape) in enumerate(DOWN_CASES):
        config = _config(layers)
        with torch.device("meta"):
            block = DownBlock(config, c_in, c_out, 2, cross, down)
        block = seeded(block, 600 + seed)
        inputs = (block, *_inputs(shape, config.time_embed_dim, 610 + 3 * seed))
        with torch.no_grad():
            cases.append(Case(inputs, _pushing(unet.DownBlock.forward)(*inputs)))
    with torch.no_grad():
        return check(
            "Exercise 04.7",
            _pushing(fn),
            cases,
            atol=ATOL,
            rtol=RTOL,
            compare=_compare_pushes,
            hints=DOWN_HINTS,
            mistakes=DOWN_MISTAKES,
            keep="unet:DownBlock.forward",
        )


# --- Exercise 04.8: the mid block ----------------------------------------------------

# (C, nh, x shape)
MID_CASES = [(16, 2, (2, 16, 4, 4)), (24, 3, (1, 24, 2, 3))]


def _mid(self, x, temb, context, *, order=("resnet", "attention", "resnet")):
    """The mid block's forward, or what one of the usual mistakes makes of it."""
    resnets = iter(self.resnets)
    for step in order:
        x = (
            next(resnets)(x, temb)
            if step == "resnet"
            else self.attentions[0](x, context)
        )
    return x


MID_MISTAKES = {
    "the SpatialTransformer is missing: ResnetBlock, SpatialTransformer, "
    "ResnetBlock": functools.partial(_mid, order=("resnet", "resnet")),
    "the SpatialTransformer ran after both ResnetBlocks; it sits between them": (
        functools.partial(_mid, order=("resnet", "resnet", "attention"))
    ),
    "the SpatialTransformer ran first; it sits between the two ResnetBlocks": (
        functools.partial(_mid, order=("attention", "resnet", "resnet"))
    ),
}

MID_HINTS = [
    "Three layers, one after the other, at the coarsest resolution: a "
    "ResnetBlock, a SpatialTransformer, a ResnetBlock.",
    "self.resnets holds the two ResnetBlocks (each takes x and temb), "
    "self.attentions the one SpatialTransformer (it takes x and context).",
    "x = self.resnets[0](x, temb); x = self.attentions[0](x, context); return "
    "self.resnets[1](x, temb).",
]


def check_mid_block_forward(fn: Callable) -> Verdict:
    """Exercise 04.8: `mid_block_forward(self, x, temb, context)`, MidBlock.forward."""
    cases = []
    for seed, (channels, heads, shape) in enumerate(MID_CASES):
        config = _config()
        with torch.device("meta"):
            block = MidBlock(config, channels, heads)
        block = seeded(block, 630 + seed)
        inputs = (block, *_inputs(shape, config.time_embed_dim, 640 + 3 * seed))
        with torch.no_grad():
            cases.append(Case(inputs, block(*inputs[1:])))
    with torch.no_grad():
        return check(
            "Exercise 04.8",
            as_method(fn),
            cases,
            atol=ATOL,
            rtol=RTOL,
            hints=MID_HINTS,
            mistakes=MID_MISTAKES,
            keep="unet:MidBlock.forward",
        )


# --- Exercise 04.9: the up block -----------------------------------------------------

# (C_in, skip channels in the order popped, C_out, cross-attention, upsample,
# x shape). The first pops skips all alike, so that popping them in the wrong
# order still runs and gives wrong numbers rather than an error
UP_CASES = [
    (8, [8, 8, 8], 8, True, True, (2, 8, 3, 4)),
    (24, [24, 16], 16, False, True, (1, 24, 4, 4)),
    (16, [16, 16, 8], 16, True, False, (2, 16, 4, 6)),
]


def _popping(forward: Callable) -> Callable:
    """`forward(block, x, temb, context, skips)` run on a copy of the stack:
    (its output, how many maps it left)."""

    @functools.wraps(forward)
    def run(block, x, temb, context, skips):
        stack = list(skips)
        out = forward(block, x, temb, context, stack)
        return out, len(stack)

    return run


def _up(self, x, temb, context, skips, *, fifo=False, skip_first=False):
    """The up block's forward, or what one of the usual mistakes makes of it."""
    for i, resnet in enumerate(self.resnets):
        skip = skips.pop(0) if fifo else skips.pop()
        x = torch.cat([skip, x] if skip_first else [x, skip], dim=1)
        x = resnet(x, temb)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
    if self.upsamplers is not None:
        x = self.upsamplers[0](x)
    return x


UP_MISTAKES = {
    "the skips came back first-in, first-out: pop the last map pushed first "
    "(skips.pop(), not skips.pop(0))": _popping(functools.partial(_up, fifo=True)),
    "the skip came first in the concatenation: x first, then the skip, "
    "torch.cat([x, skip], dim=1), the order the weights were trained on": (
        _popping(functools.partial(_up, skip_first=True))
    ),
}

UP_HINTS = [
    "The mirror of the down block: before each ResnetBlock, take back the last "
    "feature map pushed and set it beside x, channel by channel.",
    "For each ResnetBlock i: skips.pop() gives the skip; torch.cat of x and "
    "the skip on the channel axis (dim=1), x first; then resnet(x, temb) and, "
    "where the block has attentions, attentions[i](x, context). After the "
    "loop, upsamplers[0] when there is one (self.upsamplers is not None).",
    "for i, resnet in enumerate(self.resnets): x = torch.cat([x, skips.pop()], "
    "dim=1); x = resnet(x, temb); if self.attentions is not None: x = "
    "self.attentions[i](x, context). Then if self.upsamplers is not None: x = "
    "self.upsamplers[0](x). return x.",
]


def _compare_pops(actual, case: Case) -> str | None:
    out, left = actual
    problem = compare_values(out, case.expected[0], ATOL, RTOL)
    if problem:
        return f"the block's output {problem}"
    if left != case.expected[1]:
        popped = len(case.args[4]) - left
        return (
            f"popped {popped} feature maps, expected {len(case.args[4])}: one "
            "before each ResnetBlock"
        )
    return None


def check_up_block_forward(fn: Callable) -> Verdict:
    """Exercise 04.9: `up_block_forward(self, x, temb, context, skips)`,
    UpBlock.forward."""
    cases = []
    for seed, (c_in, pops, c_out, cross, up, shape) in enumerate(UP_CASES):
        config = _config()
        with torch.device("meta"):
            block = UpBlock(config, c_in, pops, c_out, 2, cross, up)
        block = seeded(block, 660 + seed)
        x, temb, context = _inputs(shape, config.time_embed_dim, 670 + 4 * seed)
        B, _, H, W = shape
        # the stack's top is the end of the list: the first popped is last
        skips = [randn(B, c, H, W, seed=680 + 4 * seed + i) for i, c in enumerate(pops)]
        inputs = (block, x, temb, context, Skips(skips[::-1]))
        with torch.no_grad():
            cases.append(Case(inputs, _popping(unet.UpBlock.forward)(*inputs)))
    with torch.no_grad():
        return check(
            "Exercise 04.9",
            _popping(fn),
            cases,
            atol=ATOL,
            rtol=RTOL,
            compare=_compare_pops,
            hints=UP_HINTS,
            mistakes=UP_MISTAKES,
            keep="unet:UpBlock.forward",
        )
