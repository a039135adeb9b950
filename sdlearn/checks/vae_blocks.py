"""Checks for chapter 02's resampling and attention exercises: the Downsample's
forward with SD's asymmetric padding, the Upsample's forward, and the VAE's
one-head attention over pixels.

The references are sdlearn's own `Downsample`, `Upsample` and `AttentionBlock`,
which the test suite holds to diffusers' numbers. The learner's function gets
the very same modules, with seeded weights, and is called with the module as
`self`, as a bound method would be. A passing answer is kept under the part of
the package it stands for, so that the rest of chapter 02 runs it, and chapter
06's pipeline can too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn import blocks, vae
from sdlearn.checks import Case, Verdict, check, randn, seeded
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter

# the parts of the package the kept answers stand for; GroupNorm is torch's
# nn.GroupNorm, which the package's blocks build (norm1, norm2, group_norm)
GROUP_NORM_PART = "blocks:GroupNorm.forward"
DOWNSAMPLE_PART = "blocks:Downsample.forward"
UPSAMPLE_PART = "blocks:Upsample.forward"
ATTENTION_PART = "vae:AttentionBlock.forward"


# --- short descriptions: a failure message names the module, not its repr -------


class Downsample(blocks.Downsample):
    """sdlearn's Downsample with a one-line repr."""

    def __repr__(self) -> str:
        where = "the VAE's, padding=0" if self.padding == 0 else "the UNet's, padding=1"
        return f"({where})"


class Upsample(blocks.Upsample):
    """sdlearn's Upsample with a one-line repr."""

    def __repr__(self) -> str:
        c = self.conv
        return f"with {c.in_channels} -> {c.out_channels} channels"


class AttentionBlock(vae.AttentionBlock):
    """sdlearn's AttentionBlock with a one-line repr."""

    def __repr__(self) -> str:
        return f"over {self.query_dim} channels"


class GroupNorm(nn.GroupNorm):
    """torch's GroupNorm with a one-line repr."""

    def __repr__(self) -> str:
        return f"with {self.num_groups} groups of {self.num_channels} channels"


# --- Exercise 02.2: GroupNorm -----------------------------------------------------

# (groups, x shape, eps, affine): H != W, B > 1, one group (LayerNorm over C, H,
# W), a large eps that shows where it goes, and no scale and shift
GROUP_NORM_CASES = [
    (4, (2, 8, 3, 5), 1e-6, True),
    (3, (1, 6, 4, 4), 0.5, True),
    (1, (3, 4, 2, 2), 1e-5, True),
    (2, (2, 4, 3, 3), 1e-6, False),
]


def _group_norm(
    self,
    x,
    channels="adjacent",
    over_batch=False,
    correction=0,
    eps="inside",
    affine=True,
):
    """GroupNorm written out, or one of its typical mistakes."""
    B, C = x.shape[:2]
    G = C if channels == "one each" else self.num_groups
    if channels == "strided":  # every G-th channel in one group
        groups = x.reshape(B, C // G, G, -1).transpose(1, 2).reshape(B, G, -1)
    else:
        groups = x.reshape(B, G, -1)
    dims = (0, 2) if over_batch else (2,)
    mean = groups.mean(dim=dims, keepdim=True)
    var = groups.var(dim=dims, correction=correction, keepdim=True)
    if eps == "inside":
        groups = (groups - mean) / torch.sqrt(var + self.eps)
    else:
        groups = (groups - mean) / (var.sqrt() + self.eps)
    if channels == "strided":
        groups = groups.reshape(B, G, C // G, -1).transpose(1, 2)
    out = groups.reshape(x.shape)
    if self.affine and affine:
        out = out * self.weight[:, None, None] + self.bias[:, None, None]
    return out


GROUP_NORM_MISTAKES = {
    "the unbiased variance, divided by N - 1: GroupNorm divides by N "
    "(var(..., correction=0))": functools.partial(_group_norm, correction=1),
    "each channel normalised on its own: a group holds C/G neighbouring "
    "channels, normalised together": functools.partial(
        _group_norm, channels="one each"
    ),
    "every G-th channel went into one group: a group is a run of C/G "
    "neighbouring channels, x.reshape(B, G, -1)": functools.partial(
        _group_norm, channels="strided"
    ),
    "the statistics mixed the images of the batch: each image is normalised on "
    "its own": functools.partial(_group_norm, over_batch=True),
    "eps was added to the standard deviation: it goes under the square root, "
    "sqrt(var + eps)": functools.partial(_group_norm, eps="outside"),
    "the learned scale and shift are left out: when self.affine, multiply by "
    "self.weight and add self.bias, per channel": functools.partial(
        _group_norm, affine=False
    ),
}
GROUP_NORM_HINTS = [
    "split each image's channels into G runs of neighbouring channels; every "
    "run, over all its pixels, gets mean 0 and variance 1; then every channel "
    "gets its learned scale and shift.",
    "reshape x to (B, G, C/G·H·W); mean and variance, divided by N, over the "
    "last axis; (x − mean) / sqrt(var + eps); back to x's shape; if self.affine, "
    "x · weight + bias with both shaped (C, 1, 1).",
    "B, C, H, W = x.shape; g = x.reshape(B, self.num_groups, -1); mean = "
    "g.mean(dim=-1, keepdim=True); var = g.var(dim=-1, correction=0, "
    "keepdim=True); x = ((g - mean) / torch.sqrt(var + self.eps)).reshape(B, C, "
    "H, W); if self.affine: x = x * self.weight[:, None, None] + "
    "self.bias[:, None, None]; return x",
]


def check_group_norm_forward(fn: Callable) -> Verdict:
    """Exercise 02.2: `GroupNorm.forward(self, x)`, torch's nn.GroupNorm."""
    cases = []
    for seed, (groups, shape, eps, affine) in enumerate(GROUP_NORM_CASES):
        norm = GroupNorm(groups, shape[1], eps=eps, affine=affine)
        if affine:
            g = torch.Generator().manual_seed(60 + seed)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.3 * torch.randn(shape[1], generator=g))
                norm.bias.copy_(0.3 * torch.randn(shape[1], generator=g))
        # far from mean 0 and variance 1, a little different in every channel
        x = 3 * randn(*shape, seed=170 + seed) + randn(1, shape[1], 1, 1, seed=seed)
        with torch.no_grad():
            expected = F.group_norm(x, groups, norm.weight, norm.bias, eps)
        cases.append(Case((norm, x), expected))
    with torch.no_grad():
        return check(
            "Exercise 02.2",
            fn,
            cases,
            atol=1e-5,
            rtol=1e-5,
            hints=GROUP_NORM_HINTS,
            mistakes=GROUP_NORM_MISTAKES,
            keep=GROUP_NORM_PART,
        )


# --- Exercise 02.3: the Downsample's forward --------------------------------------

# (C_in, C_out, padding, x shape): the VAE's (padding 0), even sides as in the
# VAE and odd ones, where a missing pad gives a different shape; then the UNet's
# (padding 1), where the convolution pads by itself
DOWNSAMPLE_CASES = [
    (4, 4, 0, (2, 4, 8, 8)),
    (3, 6, 0, (1, 3, 6, 10)),
    (2, 2, 0, (2, 2, 7, 5)),
    (4, 8, 1, (2, 4, 8, 6)),
]


def _downsample(self, x, pad=(0, 1, 0, 1), unet_too=False):
    if self.padding == 0 or unet_too:
        x = F.pad(x, pad)
    return self.conv(x)


DOWNSAMPLE_MISTAKES = {
    # on an even side, left-and-top padding and every-side padding read the same
    # windows: the last padded row and column are never reached
    "the padding went before the image (every side, as the UNet pads, or left "
    "and top): SD's VAE pads only the right and the bottom": functools.partial(
        _downsample, pad=(1, 1, 1, 1)
    ),
    "only the right column padded: pad one row at the bottom too": functools.partial(
        _downsample, pad=(0, 1, 0, 0)
    ),
    "no padding: the stride-2 window then misses the last row and column": (
        lambda self, x: self.conv(x)
    ),
    "padded by hand in the UNet's Downsample too: with padding=1 its convolution "
    "pads every side itself, so pad by hand only when self.padding == 0": (
        functools.partial(_downsample, unet_too=True)
    ),
}
DOWNSAMPLE_HINTS = [
    "the VAE's Downsample, with padding 0, puts one row and one column of zeros "
    "after the image, none before it, then convolves; the UNet's, with padding 1, "
    "lets its convolution pad every side, so it only convolves.",
    "when self.padding is 0, F.pad the input; F.pad's tuple starts with the last "
    "axis: (left, right, top, bottom), here 0, 1, 0, 1. Then self.conv.",
    "if self.padding == 0: x = F.pad(x, (0, 1, 0, 1)); return self.conv(x)",
]


def check_downsample_forward(fn: Callable) -> Verdict:
    """Exercise 02.3: `Downsample.forward(self, x)`, SD's VAE padding included."""
    cases = []
    for seed, (c_in, c_out, padding, shape) in enumerate(DOWNSAMPLE_CASES):
        with torch.device("meta"):
            block = Downsample(c_in, c_out, padding=padding)
        block = seeded(block, 10 + seed)
        x = randn(*shape, seed=110 + seed)
        with torch.no_grad():
            expected = blocks.Downsample.forward(block, x)
        cases.append(Case((block, x), expected))
    with torch.no_grad():
        return check(
            "Exercise 02.3",
            fn,
            cases,
            hints=DOWNSAMPLE_HINTS,
            mistakes=DOWNSAMPLE_MISTAKES,
            keep=DOWNSAMPLE_PART,
        )


# --- Exercise 02.4: the Upsample's forward ----------------------------------------

# (C_in, C_out, x shape, output_size): doubling, H != W, one that changes the
# channels, and one to a given size (a UNet on sides that do not halve evenly)
UPSAMPLE_CASES = [
    (4, 4, (2, 4, 3, 5), None),
    (6, 3, (1, 6, 4, 4), None),
    (4, 4, (2, 4, 3, 4), (7, 9)),
]


def _upsample(self, x, output_size=None, mode="nearest", conv_first=False):
    if conv_first:
        x = self.conv(x)
    if output_size is None:
        x = F.interpolate(x, scale_factor=2.0, mode=mode)
    else:
        x = F.interpolate(x, size=output_size, mode=mode)
    return x if conv_first else self.conv(x)


UPSAMPLE_MISTAKES = {
    "bilinear interpolation: SD repeats every pixel into a 2×2 block, "
    "mode='nearest'": functools.partial(_upsample, mode="bilinear"),
    "the convolution ran before the upsampling: upsample first, then smooth the "
    "blocky map with the 3×3 convolution": functools.partial(
        _upsample, conv_first=True
    ),
    "output_size is ignored: when it is given, interpolate to that size "
    "(size=output_size) instead of doubling": lambda self, x, output_size=None: (
        _upsample(self, x)
    ),
    "no convolution: after the upsampling comes self.conv": (
        lambda self, x, output_size=None: (
            F.interpolate(x, scale_factor=2.0, mode="nearest")
            if output_size is None
            else F.interpolate(x, size=output_size, mode="nearest")
        )
    ),
}
UPSAMPLE_HINTS = [
    "two steps: make the map twice as high and wide by repeating every pixel, "
    "then smooth it with the block's 3×3 convolution. A given output size "
    "replaces the doubling.",
    "F.interpolate with mode='nearest' repeats pixels: scale_factor=2.0 doubles, "
    "size=output_size goes to a given (H', W'). Then self.conv.",
    "if output_size is None: x = F.interpolate(x, scale_factor=2.0, "
    "mode='nearest'); else: x = F.interpolate(x, size=output_size, "
    "mode='nearest'); return self.conv(x)",
]


def check_upsample_forward(fn: Callable) -> Verdict:
    """Exercise 02.4: `Upsample.forward(self, x, output_size=None)`."""
    cases = []
    for seed, (c_in, c_out, shape, size) in enumerate(UPSAMPLE_CASES):
        with torch.device("meta"):
            block = Upsample(c_in, c_out)
        block = seeded(block, 30 + seed)
        x = randn(*shape, seed=150 + seed)
        args = (block, x) if size is None else (block, x, size)
        with torch.no_grad():
            expected = blocks.Upsample.forward(*args)
        cases.append(Case(args, expected))
    with torch.no_grad():
        return check(
            "Exercise 02.4",
            fn,
            cases,
            hints=UPSAMPLE_HINTS,
            mistakes=UPSAMPLE_MISTAKES,
            keep=UPSAMPLE_PART,
        )


# --- Exercise 02.5: the VAE's attention over pixels -------------------------------

# (C, groups, x shape): H != W catches a swapped axis, B > 1 a mixed batch
ATTENTION_CASES = [(8, 4, (2, 8, 3, 5)), (16, 4, (1, 16, 4, 4)), (6, 3, (3, 6, 2, 3))]
# a softmax over a few dozen scores and a sum of C products: torch's fused kernel
# and the written-out maths round differently, far below this
ATTENTION_ATOL, ATTENTION_RTOL = 1e-5, 1e-5


def _attention(
    self,
    x,
    norm=True,
    permute=True,
    softmax_dim=-1,
    scale=True,
    out=True,
    residual="x",
):
    """The AttentionBlock's forward written out, or one of its typical mistakes."""
    B, C, H, W = x.shape
    h = self.group_norm(x) if norm else x
    # without the permute: the right shape, but each "token" mixes channels and pixels
    h = rearrange(h, "B C H W -> B (H W) C") if permute else h.reshape(B, H * W, C)
    q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)  # (B, T, C) each
    scores = q @ k.transpose(1, 2)  # (B, T, T)
    if scale:
        scores = scores / math.sqrt(C)
    a = scores.softmax(dim=softmax_dim) @ v  # (B, T, C)
    if out:
        a = self.to_out[0](a)
    if permute:
        a = rearrange(a, "B (H W) C -> B C H W", H=H, W=W)
    else:
        a = a.reshape(B, C, H, W)
    if residual == "x":
        return x + a
    if residual == "normed":
        return self.group_norm(x) + a
    return a


ATTENTION_MISTAKES = {
    "no residual: add the input x back at the end": functools.partial(
        _attention, residual=None
    ),
    "the residual added the normalised map: add back x, the block's input, not "
    "group_norm(x)": functools.partial(_attention, residual="normed"),
    "reshape without permute: (B, C, H, W) -> (B, H*W, C) needs the channels "
    "moved last (rearrange 'B C H W -> B (H W) C'), not a reshape of the memory": (
        functools.partial(_attention, permute=False)
    ),
    "the softmax ran over the queries: each query's weights over the keys sum "
    "to 1, softmax(dim=-1)": functools.partial(_attention, softmax_dim=1),
    "the scores are not scaled: divide Q Kᵀ by √C, the width of the one head": (
        functools.partial(_attention, scale=False)
    ),
    "group_norm is left out: normalise the map before the attention": (
        functools.partial(_attention, norm=False)
    ),
    "the output projection is left out: mix the attended values with "
    "self.to_out[0]": functools.partial(_attention, out=False),
}
ATTENTION_HINTS = [
    "normalise the map, then treat every pixel as a token of C numbers: self-"
    "attention with one head as wide as C, an output projection, back to a map, "
    "and the input added back.",
    "h = group_norm(x) rearranged from (B, C, H, W) to (B, H·W, C); q, k, v from "
    "to_q, to_k, to_v; weights = softmax(q kᵀ / √C) over the keys; h = weights v, "
    "then to_out[0]; back to (B, C, H, W); return x + h.",
    "B, C, H, W = x.shape; h = rearrange(self.group_norm(x), 'B C H W -> B (H W) "
    "C'); q, k, v = self.to_q(h), self.to_k(h), self.to_v(h); h = (q @ "
    "k.transpose(1, 2) / math.sqrt(C)).softmax(dim=-1) @ v; h = self.to_out[0](h); "
    "h = rearrange(h, 'B (H W) C -> B C H W', H=H, W=W); return x + h",
]


def check_attention_block_forward(fn: Callable) -> Verdict:
    """Exercise 02.5: `AttentionBlock.forward(self, x)`, over a map's pixels."""
    cases = []
    for seed, (channels, groups, shape) in enumerate(ATTENTION_CASES):
        with torch.device("meta"):
            block = AttentionBlock(channels, groups=groups)
        block = seeded(block, 40 + seed)
        x = randn(*shape, seed=160 + seed)
        with torch.no_grad():
            expected = vae.AttentionBlock.forward(block, x)
        cases.append(Case((block, x), expected))
    with torch.no_grad():
        return check(
            "Exercise 02.5",
            fn,
            cases,
            atol=ATTENTION_ATOL,
            rtol=ATTENTION_RTOL,
            hints=ATTENTION_HINTS,
            mistakes=ATTENTION_MISTAKES,
            keep=ATTENTION_PART,
        )
