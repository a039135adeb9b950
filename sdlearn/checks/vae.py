"""Checks for chapter 02's VAE exercises: the ResnetBlock, the encoder's and
the decoder's forward passes, the reparameterisation and the KL of the
posterior (`vae_blocks` checks the resampling and the attention, `vae_model`
the whole autoencoder and its loss).

The references are sdlearn's own `ResnetBlock`, `Encoder`,
`Decoder` and `DiagonalGaussian`, which the test suite holds to diffusers'
numbers. The learner's function gets the very same modules, with seeded weights
far from their initial values (norm scales away from 1, biases away from 0), so
that leaving out a step shows. A forward is written as a function taking
`self`; the check calls it with the module as `self`, as a bound method would.

Each check names the typical mistakes it recognises (`mistakes=`): a function
that makes the mistake runs on the same inputs, and a wrong answer equal to its
result is named. A passing answer is kept under the part of the package it
stands for (`keep=`), so that chapter 06 can run it in the real pipeline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sdlearn import blocks, vae
from sdlearn.checks import Case, Verdict, check, randn, seeded
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter

# the parts of the package the kept answers stand for
RESNET_PART = "blocks:ResnetBlock.forward"
ENCODER_PART = "vae:Encoder.forward"
DECODER_PART = "vae:Decoder.forward"
SAMPLE_PART = "vae:DiagonalGaussian.sample"
KL_PART = "vae:DiagonalGaussian.kl"


# --- short descriptions: a failure message names the module, not its repr -------


class ResnetBlock(blocks.ResnetBlock):
    """sdlearn's ResnetBlock with a one-line repr, so a failure message stays short."""

    def __repr__(self) -> str:
        temb = "" if self.time_emb_proj is None else ", a time embedding"
        mode = ", in training mode" if self.training else ""
        return f"with {self.in_channels} -> {self.out_channels} channels{temb}{mode}"


class Encoder(vae.Encoder):
    """sdlearn's Encoder with a one-line repr."""

    def __repr__(self) -> str:
        c = self.config
        return f"with levels {c.block_out_channels}, {c.layers_per_block} per level"


class Decoder(vae.Decoder):
    """sdlearn's Decoder with a one-line repr."""

    def __repr__(self) -> str:
        c = self.config
        return f"with levels {c.block_out_channels}, {c.layers_per_block + 1} per level"


class Posterior(vae.DiagonalGaussian):
    """sdlearn's DiagonalGaussian with a one-line repr."""

    def __repr__(self) -> str:
        return f"over latents {tuple(self.mean.shape)}"


def _seeded_rng(fn: Callable, seed: int = 1234) -> Callable:
    """`fn` run with the global random state set to `seed` and restored after,
    so that dropout drops the same values for the learner and the reference,
    and the notebook's own random state is left alone."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn(*args, **kwargs)

    return call


# --- Exercise 02.1: the ResnetBlock's forward -------------------------------------

# (C_in, C_out, groups, temb channels, dropout, training, x shape): the VAE's
# blocks (no time embedding; the first keeps the channels, the second changes
# them), then the UNet's (a time embedding), the last in training mode with
# dropout; H != W catches a transposed axis
RESNET_CASES = [
    (8, 8, 4, None, 0.0, False, (2, 8, 6, 6)),
    (8, 16, 4, None, 0.0, False, (2, 8, 5, 7)),
    (8, 16, 4, 12, 0.0, False, (2, 8, 5, 7)),
    (6, 12, 3, 10, 0.5, True, (2, 6, 4, 4)),
]


def _resnet(
    self,
    x,
    temb=None,
    act=F.silu,
    order="pre",
    temb_act=True,
    temb_after=False,
    dropout="before conv2",
    residual=True,
):
    """The ResnetBlock's forward, or one of its typical mistakes."""

    def half(norm, conv, h, drop=False):
        if order == "act-norm":  # activation before the norm
            return conv(norm(act(h)))
        if order == "post":  # convolution first, then norm and activation
            return act(norm(conv(h)))
        if drop and dropout == "before conv2":
            return conv(self.dropout(act(norm(h))))
        return conv(act(norm(h)))

    h = half(self.norm1, self.conv1, x)
    t = None
    if self.time_emb_proj is not None:
        t = self.time_emb_proj(F.silu(temb) if temb_act else temb)[:, :, None, None]
    if t is not None and not temb_after:
        h = h + t
    if dropout == "before norm2":
        h = self.dropout(h)
    h = half(self.norm2, self.conv2, h, drop=True)
    if dropout == "after conv2":
        h = self.dropout(h)
    if t is not None and temb_after:
        h = h + t
    if not residual:
        return h
    if self.conv_shortcut is not None:
        x = self.conv_shortcut(x)
    return x + h


RESNET_MISTAKES = {
    "ReLU where the block uses SiLU, x · sigmoid(x) (F.silu)": functools.partial(
        _resnet, act=F.relu
    ),
    "the activation comes before the norm: each half is norm, SiLU, then conv": (
        functools.partial(_resnet, order="act-norm")
    ),
    "post-norm: the block normalises and activates before each convolution "
    "(pre-activation), not after it": functools.partial(_resnet, order="post"),
    "the time embedding went into time_emb_proj without its SiLU: project "
    "F.silu(temb)": functools.partial(_resnet, temb_act=False),
    "the time embedding was added after the second convolution; it is added "
    "between the two": functools.partial(_resnet, temb_after=True),
    "no residual: add the input back at the end (through conv_shortcut when the "
    "channels change)": functools.partial(_resnet, residual=False),
    "self.dropout is left out: it does nothing in eval mode, but in training it "
    "zeroes values, just before conv2": functools.partial(_resnet, dropout="none"),
    "self.dropout after conv2: it goes just before conv2, after norm2 and SiLU": (
        functools.partial(_resnet, dropout="after conv2")
    ),
    "self.dropout before norm2: it goes just before conv2, after norm2 and SiLU": (
        functools.partial(_resnet, dropout="before norm2")
    ),
}
RESNET_HINTS = [
    "the block is two halves of the same three steps: normalise, activate, "
    "convolve. The UNet's time embedding joins between the halves; at the end the "
    "input comes back, through the shortcut when the channels change.",
    "h = conv1(SiLU(norm1(x))); with a time embedding, add time_emb_proj(SiLU(temb)) "
    "as one value per channel to every pixel; h = conv2(dropout(SiLU(norm2(h)))); "
    "return x + h, with x through conv_shortcut when it is not None.",
    "h = self.conv1(F.silu(self.norm1(x))); if self.time_emb_proj is not None: "
    "h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]; "
    "h = self.conv2(self.dropout(F.silu(self.norm2(h)))); "
    "if self.conv_shortcut is not None: x = self.conv_shortcut(x); return x + h",
]


def check_resnet_forward(fn: Callable) -> Verdict:
    """Exercise 02.1: `ResnetBlock.forward(self, x, temb=None)`, from its layers."""
    cases = []
    for seed, (c_in, c_out, groups, temb_c, p, training, shape) in enumerate(
        RESNET_CASES
    ):
        with torch.device("meta"):
            block = ResnetBlock(c_in, c_out, temb_c, groups=groups, dropout=p)
        block = seeded(block, seed).train(training)
        x = randn(*shape, seed=100 + seed)
        args = (block, x)
        if temb_c is not None:
            args += (randn(shape[0], temb_c, seed=200 + seed),)
        with torch.no_grad():
            expected = _seeded_rng(blocks.ResnetBlock.forward)(*args)
        cases.append(Case(args, expected))
    with torch.no_grad():
        return check(
            "Exercise 02.1",
            _seeded_rng(fn),
            cases,
            hints=RESNET_HINTS,
            mistakes={k: _seeded_rng(v) for k, v in RESNET_MISTAKES.items()},
            keep=RESNET_PART,
        )


# --- Exercises 02.6 and 02.7: the encoder's and the decoder's forward -------------

# small autoencoders: (levels, ResnetBlocks per level in the encoder, groups,
# latent channels, image shape). The first keeps its channels, so that a forward
# with its steps in the wrong order still runs and can be named; the second
# changes them, with one block per level and a non-square image
CODER_CASES = [
    ((8, 8, 8), 2, 4, 4, (2, 3, 16, 16)),
    ((8, 16, 16), 1, 4, 2, (1, 3, 8, 12)),
]
# the sums of a few dozen layers of unit-scale values: float32 rounding of a
# forward that adds the same numbers in another order stays far below this
CODER_ATOL, CODER_RTOL = 1e-4, 1e-4


def _config(levels, per_level, groups, latent) -> vae.VAEConfig:
    return vae.VAEConfig(
        block_out_channels=levels,
        layers_per_block=per_level,
        norm_num_groups=groups,
        latent_channels=latent,
    )


def _mid(mid, x, attention=True, skip=False):
    if skip:
        return x
    x = mid.resnets[0](x)
    if attention:
        x = mid.attentions[0](x)
    return mid.resnets[1](x)


def _level(block, x, resample_first=False, pad=True):
    resamplers = getattr(block, "downsamplers", None) or getattr(
        block, "upsamplers", None
    )
    resample = None
    if resamplers is not None:
        resample = resamplers[0] if pad else resamplers[0].conv
    if resample is not None and resample_first:
        x = resample(x)
    for resnet in block.resnets:
        x = resnet(x)
    if resample is not None and not resample_first:
        x = resample(x)
    return x


def _out(self, x, norm=True, act=True):
    if norm:
        x = self.conv_norm_out(x)
    if act:
        x = F.silu(x)
    return self.conv_out(x)


def _encode(self, x, mid=None, level=None, out=None):
    x = self.conv_in(x)
    for block in self.down_blocks:
        x = _level(block, x, **(level or {}))
    x = _mid(self.mid_block, x, **(mid or {}))
    return _out(self, x, **(out or {}))


def _decode(self, z, mid=None, level=None, out=None):
    x = self.conv_in(z)
    x = _mid(self.mid_block, x, **(mid or {}))
    for block in self.up_blocks:
        x = _level(block, x, **(level or {}))
    return _out(self, x, **(out or {}))


def _coder_mistakes(forward: Callable, resample: str) -> dict[str, Callable]:
    p = functools.partial
    return {
        "no SiLU between conv_norm_out and conv_out: the output is norm, SiLU, conv": p(
            forward, out={"act": False}
        ),
        "conv_norm_out is left out: the output is norm, SiLU, conv": p(
            forward, out={"norm": False}
        ),
        "the mid block's attention is left out: the mid block is ResnetBlock, "
        "attention, ResnetBlock": p(forward, mid={"attention": False}),
        "the mid block is left out: it runs at the smallest resolution": p(
            forward, mid={"skip": True}
        ),
        f"each level {resample}s first; its ResnetBlocks come first, then its "
        f"{resample}r": p(forward, level={"resample_first": True}),
    }


ENCODER_MISTAKES = _coder_mistakes(_encode, "downsample") | {
    "the downsampler's bare conv: call the Downsample module, which pads right "
    "and bottom before its conv": functools.partial(_encode, level={"pad": False}),
}
DECODER_MISTAKES = _coder_mistakes(_decode, "upsample")


def _coder_hints(name: str, steps: str, code: str) -> list[str]:
    return [
        f"the {name} is a short story in four steps: {steps}. Each step is a "
        "layer or a list of blocks of the constructor, used in the order it "
        "builds them.",
        "a level (a block of down_blocks or up_blocks) runs its resnets one "
        "after the other, then its resampler (downsamplers[0] or upsamplers[0]) "
        "when it has one (None on the last level). The mid block is resnets[0], "
        "attentions[0], resnets[1]. The output is conv_out(SiLU(conv_norm_out(x))).",
        code,
    ]


ENCODER_HINTS = _coder_hints(
    "encoder",
    "conv_in, the down blocks from the image down, the mid block, then norm, "
    "SiLU and conv_out",
    "x = self.conv_in(x); for block in self.down_blocks: (for resnet in "
    "block.resnets: x = resnet(x)); if block.downsamplers is not None: "
    "x = block.downsamplers[0](x); then x = self.mid_block(x) (or its three "
    "steps); return self.conv_out(F.silu(self.conv_norm_out(x)))",
)
DECODER_HINTS = _coder_hints(
    "decoder",
    "conv_in, the mid block, the up blocks from the latents up, then norm, SiLU "
    "and conv_out",
    "x = self.conv_in(z); x = self.mid_block(x) (or its three steps); for block "
    "in self.up_blocks: (for resnet in block.resnets: x = resnet(x)); if "
    "block.upsamplers is not None: x = block.upsamplers[0](x); return "
    "self.conv_out(F.silu(self.conv_norm_out(x)))",
)


def _coder_cases(cls: type, decoder: bool) -> list[Case]:
    cases = []
    for seed, (levels, per_level, groups, latent, shape) in enumerate(CODER_CASES):
        config = _config(levels, per_level, groups, latent)
        with torch.device("meta"):
            model = cls(config)
        model = seeded(model, 20 + seed)
        if decoder:
            f = config.downsampling_factor
            B, _, H, W = shape
            x = randn(B, latent, H // f, W // f, seed=130 + seed)
        else:
            x = randn(*shape, seed=120 + seed)
        with torch.no_grad():
            expected = model(x)
        cases.append(Case((model, x), expected))
    return cases


def check_encoder_forward(fn: Callable) -> Verdict:
    """Exercise 02.6: `Encoder.forward(self, x)`, from its layers."""
    with torch.no_grad():
        return check(
            "Exercise 02.6",
            fn,
            _coder_cases(Encoder, decoder=False),
            atol=CODER_ATOL,
            rtol=CODER_RTOL,
            hints=ENCODER_HINTS,
            mistakes=ENCODER_MISTAKES,
            keep=ENCODER_PART,
        )


def check_decoder_forward(fn: Callable) -> Verdict:
    """Exercise 02.7: `Decoder.forward(self, z)`, from its layers."""
    with torch.no_grad():
        return check(
            "Exercise 02.7",
            fn,
            _coder_cases(Decoder, decoder=True),
            atol=CODER_ATOL,
            rtol=CODER_RTOL,
            hints=DECODER_HINTS,
            mistakes=DECODER_MISTAKES,
            keep=DECODER_PART,
        )


# --- Exercises 02.8 and 02.9: the reparameterisation and the KL -------------------

# (B, C, h, w) of the latents
POSTERIOR_SHAPES = [(2, 4, 8, 8), (1, 4, 3, 5), (3, 2, 4, 4)]


def _posterior(seed: int, shape: tuple[int, ...]) -> Posterior:
    mean = randn(*shape, seed=140 + seed)
    logvar = 4 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    logvar = logvar - 3  # log-variances in [-3, 1]: std from 0.22 to 1.65
    return Posterior(torch.cat([mean, logvar], dim=1))


def _with_generator(fn: Callable) -> Callable:
    """`fn(posterior, generator)` called as `(posterior, seed)`: a fresh generator
    for every call, and the global random state set to another seed, so that
    noise drawn from it, not from the generator, gives other numbers."""

    @functools.wraps(fn)
    def call(posterior, seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1000)
            if seed < 0:  # no generator given: the global random state draws
                return fn(posterior)
            return fn(posterior, torch.Generator().manual_seed(seed))

    return call


def _sample(self, generator=None, std="std", noise="generator"):
    if noise == "global":
        generator = None
    eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
    sigma = {"std": self.std, "var": self.var, "logvar": self.logvar}[std]
    return self.mean + sigma * eps


SAMPLE_MISTAKES = {
    "exp(logvar) is the variance σ²; the standard deviation is exp(logvar / 2)": (
        functools.partial(_sample, std="var")
    ),
    "logvar used as the standard deviation: σ = exp(logvar / 2)": functools.partial(
        _sample, std="logvar"
    ),
    "the noise came from the global random state: draw it with `generator`, "
    "torch.randn(..., generator=generator)": functools.partial(_sample, noise="global"),
    "returned the mean, the mode: a sample adds σ · ε": lambda self, generator=None: (
        self.mean
    ),
}
SAMPLE_HINTS = [
    "a sample is the mean plus noise scaled by the standard deviation. The noise "
    "is standard normal, drawn with the generator you are given, so that the "
    "same generator state gives the same sample.",
    "ε has the mean's shape and dtype, drawn by torch.randn with generator= on "
    "the generator's device, then moved to the mean's device; σ = exp(logvar / 2), "
    "which the constructor computed as self.std.",
    "device = self.mean.device if generator is None else generator.device; eps = "
    "torch.randn(self.mean.shape, generator=generator, device=device, "
    "dtype=self.mean.dtype).to(self.mean.device); return self.mean + self.std * eps",
]


def check_sample(fn: Callable) -> Verdict:
    """Exercise 02.8: `DiagonalGaussian.sample(self, generator=None)`."""
    cases = []
    for seed, shape in enumerate(POSTERIOR_SHAPES):
        posterior = _posterior(seed, shape)
        expected = _with_generator(vae.DiagonalGaussian.sample)(posterior, seed)
        cases.append(Case((posterior, seed), expected))
    # and once without a generator: the global random state draws
    posterior = _posterior(9, POSTERIOR_SHAPES[0])
    expected = _with_generator(vae.DiagonalGaussian.sample)(posterior, -1)
    cases.append(Case((posterior, -1), expected))
    return check(
        "Exercise 02.8",
        _with_generator(fn),
        cases,
        hints=SAMPLE_HINTS,
        mistakes={k: _with_generator(v) for k, v in SAMPLE_MISTAKES.items()},
        keep=SAMPLE_PART,
    )


def _kl(self, half=0.5, var="var", log="logvar", over=(1, 2, 3), mean=False):
    sigma2 = {"var": self.var, "std": self.std}[var]
    log_sigma2 = {"logvar": self.logvar, "log std": 0.5 * self.logvar}[log]
    terms = self.mean.pow(2) + sigma2 - 1.0 - log_sigma2
    if mean:
        return half * terms.mean(dim=over)
    return half * terms.sum(dim=over)


KL_MISTAKES = {
    "the ½ is missing: KL = ½ Σ (μ² + σ² − 1 − log σ²)": functools.partial(
        _kl, half=1.0
    ),
    "σ where the formula has the variance σ² (self.var)": functools.partial(
        _kl, var="std"
    ),
    "log σ where the formula has log σ² (self.logvar)": functools.partial(
        _kl, log="log std"
    ),
    "averaged over the latent values: the KL of an image is their sum": (
        functools.partial(_kl, mean=True)
    ),
    "summed over the batch too: return one KL per image, shape (B,)": (
        functools.partial(_kl, over=(0, 1, 2, 3))
    ),
}
KL_HINTS = [
    "each latent value is its own Gaussian, and the KL of independent values "
    "adds up: compute the closed form for every value, then sum over all the "
    "values of an image, not over the batch.",
    "per value: ½ (μ² + σ² − 1 − log σ²) with σ² = self.var and log σ² = "
    "self.logvar; sum over dims 1, 2 and 3, which leaves shape (B,).",
    "return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=[1, 2, 3])",
]


def check_kl(fn: Callable) -> Verdict:
    """Exercise 02.9: `DiagonalGaussian.kl(self)`, per item."""
    cases = []
    for seed, shape in enumerate(POSTERIOR_SHAPES):
        posterior = _posterior(seed, shape)
        cases.append(Case((posterior,), vae.DiagonalGaussian.kl(posterior)))
    return check(
        "Exercise 02.9",
        fn,
        cases,
        hints=KL_HINTS,
        mistakes=KL_MISTAKES,
        keep=KL_PART,
        # the KL sums up to 256 values of a few units each
        atol=1e-4,
        rtol=1e-5,
    )
