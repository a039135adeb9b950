"""Checks for chapter 02's VAE exercises: a ResnetBlock, the asymmetric downsample,
the reparameterization trick with its KL.

The references are sdlearn's own `ResnetBlock`, `Downsample` and `DiagonalGaussian`,
which the test suite holds to diffusers' number for number. The learner's function
gets the very same modules, with seeded weights far from their initial values (norm
scales away from 1, biases away from 0), so that leaving out a step shows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdlearn import blocks, vae
from sdlearn.checks import Case, Verdict, check, randn, seeded


class ResnetBlock(blocks.ResnetBlock):
    """sdlearn's ResnetBlock with a one-line repr, so a failure message stays short."""

    def __repr__(self) -> str:
        return f"with {self.in_channels} -> {self.out_channels} channels"


# (C_in, C_out, groups, x shape): the first keeps the channels (no shortcut
# convolution), the others change them (a 1x1 conv_shortcut); H != W catches a
# transposed axis
RESNET_CASES = [
    (8, 8, 4, (2, 8, 6, 6)),
    (8, 16, 4, (2, 8, 5, 7)),
    (6, 12, 3, (1, 6, 4, 4)),
]
# (C_in, C_out, x shape): even sides as in the VAE, and odd ones, where a missing
# pad gives a different shape
DOWNSAMPLE_CASES = [(4, 4, (2, 4, 8, 8)), (3, 6, (1, 3, 6, 10)), (2, 2, (2, 2, 7, 5))]
# (B, C, h, w) of the latents
POSTERIOR_SHAPES = [(2, 4, 8, 8), (1, 4, 3, 5), (3, 2, 4, 4)]


def check_resnet_forward(fn: Callable) -> Verdict:
    """Exercise 02.1: a ResnetBlock without time embedding, from its layers."""
    cases = []
    for seed, (c_in, c_out, groups, shape) in enumerate(RESNET_CASES):
        with torch.device("meta"):
            block = ResnetBlock(c_in, c_out, groups=groups)
        block = seeded(block, seed)
        x = randn(*shape, seed=100 + seed)
        with torch.no_grad():
            expected = block(x)
        cases.append(Case((block, x), expected))
    with torch.no_grad():
        return check(
            "Exercise 02.1",
            fn,
            cases,
            hint="normalise, then SiLU, then convolve, and that twice (norm1, conv1, "
            "then norm2, conv2). Add the input back at the end; when the channel "
            "count changes, pass it through block.conv_shortcut first (which is "
            "None when it does not).",
        )


def check_downsample(fn: Callable) -> Verdict:
    """Exercise 02.2: pad right and bottom by one, then a stride-2 3x3 conv."""
    cases = []
    for seed, (c_in, c_out, shape) in enumerate(DOWNSAMPLE_CASES):
        with torch.device("meta"):
            block = blocks.Downsample(c_in, c_out, padding=0)
        block = seeded(block, 10 + seed)
        x = randn(*shape, seed=110 + seed)
        with torch.no_grad():
            expected = block(x)
        cases.append(Case((block.conv, x), expected))
    with torch.no_grad():
        return check(
            "Exercise 02.2",
            fn,
            cases,
            hint="F.pad lists the last axis first: (left, right, top, bottom). Pad "
            "one column on the right and one row at the bottom with zeros, then "
            "apply conv, whose own padding is 0.",
        )


def check_sample_and_kl(fn: Callable) -> Verdict:
    """Exercise 02.3: z = mean + std * noise, and KL(q || N(0, I)) per item."""
    cases = []
    for seed, shape in enumerate(POSTERIOR_SHAPES):
        mean = randn(*shape, seed=120 + seed)
        logvar = 4 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        logvar = logvar - 3  # log-variances in [-3, 1]: std from 0.22 to 1.65
        posterior = vae.DiagonalGaussian(torch.cat([mean, logvar], dim=1))
        # sample() draws its noise exactly like this, from the same seed
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        z = posterior.sample(torch.Generator().manual_seed(seed))
        cases.append(Case((mean, logvar, noise), (z, posterior.kl())))
    return check(
        "Exercise 02.3",
        fn,
        cases,
        hint="logvar is the log of the variance std², so std = exp(logvar / 2), "
        "and z = mean + std * noise. The KL per latent value is "
        "½ (mean² + std² − 1 − logvar); sum it over dims 1, 2, 3, so that each "
        "item gets one number: shape (B,).",
        # the KL sums up to 256 values of a few units each
        atol=1e-4,
        rtol=1e-5,
    )
