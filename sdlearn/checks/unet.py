"""Checks for chapter 04's UNet exercises: the timestep embedding, the
time-conditioned ResnetBlock and the transformer block.

The references are sdlearn's own `timestep_embedding`, `ResnetBlock` and
`TransformerBlock`, which the test suite holds to diffusers' number for number.
The learner's function gets the very same modules, with seeded weights far from
their initial values (norm scales away from 1, biases away from 0), so that
leaving out a step shows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdlearn import blocks, spatial_transformer, unet
from sdlearn.checks import Case, Verdict, check, randn, seeded


class ResnetBlock(blocks.ResnetBlock):
    """sdlearn's ResnetBlock with a one-line repr, so a failure message stays short."""

    def __repr__(self) -> str:
        return f"with {self.in_channels} -> {self.out_channels} channels"


class TransformerBlock(spatial_transformer.TransformerBlock):
    """sdlearn's TransformerBlock with a one-line repr, for short failure messages."""

    def __repr__(self) -> str:
        return f"TransformerBlock(dim={self.norm1.normalized_shape[0]})"


# (timesteps, dim): SD's range of t, fractions, and an odd width
EMBEDDING_CASES = [
    ([0, 1, 250, 999], 32),
    ([10.5, 500.0], 320),
    ([3, 700, 42], 7),
]
# (C_in, C_out, temb width, groups, x shape): the first keeps the channels, the
# others change them (a 1x1 conv_shortcut); H != W catches a transposed axis
RESNET_CASES = [
    (8, 8, 12, 4, (2, 8, 6, 6)),
    (8, 16, 20, 4, (2, 8, 5, 7)),
    (6, 12, 8, 3, (3, 6, 4, 4)),
]
# (D, nh, context width, B, T, S): S != T catches attn2 run on the pixels
TRANSFORMER_CASES = [(16, 2, 12, 2, 9, 5), (24, 3, 8, 1, 6, 7), (8, 1, 16, 3, 4, 3)]


def check_timestep_embedding(fn: Callable) -> Verdict:
    """Exercise 04.1: `timestep_embedding(timesteps, dim)`, cosines first."""
    cases = []
    for timesteps, dim in EMBEDDING_CASES:
        t = torch.tensor(timesteps)
        cases.append(Case((t, dim), unet.timestep_embedding(t, dim)))
    return check(
        "Exercise 04.1",
        fn,
        cases,
        atol=1e-4,  # cos and sin of angles up to 999 lose a few float32 digits
        hint="half = dim // 2; frequencies = exp(-log(10000) * arange(half) / half); "
        "angles = t.float()[:, None] * frequencies[None, :]; return "
        "cat([cos(angles), sin(angles)], dim=-1), cosines first, padded with one "
        "zero column when dim is odd.",
    )


def check_resnet_forward(fn: Callable) -> Verdict:
    """Exercise 04.2: `resnet_forward(block, x, temb)`, the time-conditioned block."""
    cases = []
    for seed, (c_in, c_out, t_dim, groups, shape) in enumerate(RESNET_CASES):
        with torch.device("meta"):
            block = ResnetBlock(c_in, c_out, temb_channels=t_dim, groups=groups)
        block = seeded(block, 200 + seed)
        x = randn(*shape, seed=210 + seed)
        temb = randn(shape[0], t_dim, seed=220 + seed)
        with torch.no_grad():
            expected = block(x, temb)
        cases.append(Case((block, x, temb), expected))
    with torch.no_grad():
        return check(
            "Exercise 04.2",
            fn,
            cases,
            hint="h = conv1(silu(norm1(x))); then add time_emb_proj(silu(temb)), "
            "reshaped to (B, C_out, 1, 1), *between* the convolutions; then "
            "h = conv2(silu(norm2(h))). Add x back at the end, through "
            "block.conv_shortcut when it is not None.",
        )


def check_transformer_block_forward(fn: Callable) -> Verdict:
    """Exercise 04.3: `transformer_block_forward(block, x, context)`."""
    cases = []
    for seed, (dim, heads, c_dim, B, T, S) in enumerate(TRANSFORMER_CASES):
        with torch.device("meta"):
            block = TransformerBlock(dim, heads, c_dim)
        block = seeded(block, 300 + seed)
        x = randn(B, T, dim, seed=310 + seed)
        context = randn(B, S, c_dim, seed=320 + seed)
        with torch.no_grad():
            expected = block(x, context)
        cases.append(Case((block, x, context), expected))
    with torch.no_grad():
        return check(
            "Exercise 04.3",
            fn,
            cases,
            atol=1e-4,  # three residual branches of unit-scale seeded weights
            rtol=1e-5,
            hint="three pre-norm steps, each added back to x: "
            "x = x + attn1(norm1(x)); x = x + attn2(norm2(x), context); "
            "x = x + ff(norm3(x)).",
        )
