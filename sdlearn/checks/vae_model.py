"""Checks for chapter 02's whole-autoencoder exercises: `AutoencoderKL`'s
encode, decode and forward, and the VAE's training loss.

The references are sdlearn's own `AutoencoderKL` and `VAELoss`, on small
autoencoders with seeded weights and a scaling factor other than 1, so that a
scaling done in the wrong place shows. A posterior is compared by its means and
log-variances; a loss by its value and its two terms. A passing answer is kept
under the part of the package it stands for, so that the rest of chapter 02
runs it, and chapter 06's pipeline can too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sdlearn import vae
from sdlearn.checks import Case, Verdict, check, randn, seeded
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter

# the parts of the package the kept answers stand for
ENCODE_PART = "vae:AutoencoderKL.encode"
DECODE_PART = "vae:AutoencoderKL.decode"
FORWARD_PART = "vae:AutoencoderKL.forward"
LOSS_PART = "vae:VAELoss.forward"
PSNR_PART = "vae:psnr"

# sums over a few dozen layers of unit-scale values: float32 rounding stays far
# below this
ATOL, RTOL = 1e-4, 1e-4


class AutoencoderKL(vae.AutoencoderKL):
    """sdlearn's AutoencoderKL with a one-line repr."""

    def __repr__(self) -> str:
        c = self.config
        return f"with levels {c.block_out_channels}, scaling factor {c.scaling_factor}"


class VAELoss(vae.VAELoss):
    """sdlearn's VAELoss with a one-line repr."""

    def __repr__(self) -> str:
        return f"with kl_weight {self.kl_weight}"


def _model(seed: int) -> AutoencoderKL:
    """A small autoencoder (f = 4) whose scaling factor is not 1."""
    config = vae.VAEConfig(
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=2,
        scaling_factor=0.5,
    )
    with torch.device("meta"):
        model = AutoencoderKL(config)
    return seeded(model, 50 + seed)


# images (B, 3, H, W): H != W, and a batch of one
IMAGE_SHAPES = [(2, 3, 8, 12), (1, 3, 8, 8)]


def _as_values(result):
    """A posterior as (mean, logvar); an output or a loss as a tuple of tensors;
    anything else as it is, so that the check can say what it is."""
    if isinstance(result, vae.DiagonalGaussian):
        return result.mean, result.logvar
    if isinstance(result, tuple) and len(result) == 2:
        first, second = result
        if isinstance(second, vae.DiagonalGaussian):  # (reconstruction, posterior)
            return first, second.mean, second.logvar
        if isinstance(second, dict) and {"mse", "kl"} <= set(second):  # a loss
            return first, second["mse"], second["kl"]
    return result


def _compared(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return _as_values(fn(*args, **kwargs))

    return call


# --- Exercise 02.10: encode --------------------------------------------------------


def _encode(self, x, quant=True, scaled=False, wrap=True):
    moments = self.encoder(x)
    if quant:
        moments = self.quant_conv(moments)
    if scaled:
        moments = moments * self.config.scaling_factor
    return vae.DiagonalGaussian(moments) if wrap else moments


ENCODE_MISTAKES = {
    "quant_conv is left out: the encoder's output goes through it before the "
    "posterior": functools.partial(_encode, quant=False),
    "the moments were multiplied by the scaling factor: encode gives unscaled "
    "latents, the pipeline scales them": functools.partial(_encode, scaled=True),
    "returned the moments, a tensor: wrap them in DiagonalGaussian(moments), "
    "which splits them into means and log-variances": functools.partial(
        _encode, wrap=False
    ),
}
ENCODE_HINTS = [
    "the encoder gives means and log-variances in one map; a 1×1 convolution "
    "follows it, and the posterior class splits the result in two.",
    "self.encoder(x), then self.quant_conv, then DiagonalGaussian of that. "
    "No scaling factor here.",
    "return DiagonalGaussian(self.quant_conv(self.encoder(x)))",
]


def check_encode(fn: Callable) -> Verdict:
    """Exercise 02.10: `AutoencoderKL.encode(self, x)` -> the posterior."""
    cases = []
    for seed, shape in enumerate(IMAGE_SHAPES):
        model = _model(seed)
        x = randn(*shape, seed=170 + seed)
        with torch.no_grad():
            expected = _as_values(vae.AutoencoderKL.encode(model, x))
        cases.append(Case((model, x), expected))
    with torch.no_grad():
        return check(
            "Exercise 02.10",
            _compared(fn),
            cases,
            atol=ATOL,
            rtol=RTOL,
            hints=ENCODE_HINTS,
            mistakes={k: _compared(v) for k, v in ENCODE_MISTAKES.items()},
            keep=ENCODE_PART,
        )


# --- Exercise 02.11: decode -------------------------------------------------------


def _decode(self, z, quant=True, unscale=False, clamp=False):
    if unscale:
        z = z / self.config.scaling_factor
    if quant:
        z = self.post_quant_conv(z)
    x = self.decoder(z)
    return x.clamp(-1, 1) if clamp else x


DECODE_MISTAKES = {
    "post_quant_conv is left out: the latents go through it before the decoder": (
        functools.partial(_decode, quant=False)
    ),
    "the latents were divided by the scaling factor: decode takes unscaled "
    "latents, the pipeline unscales them": functools.partial(_decode, unscale=True),
    "the images were clamped to [-1, 1]: decode returns the decoder's values as "
    "they are": functools.partial(_decode, clamp=True),
}
DECODE_HINTS = [
    "the mirror of encode: a 1×1 convolution on the latents, then the decoder.",
    "self.post_quant_conv(z), then self.decoder; no scaling factor and no "
    "clamping here.",
    "return self.decoder(self.post_quant_conv(z))",
]


def check_decode(fn: Callable) -> Verdict:
    """Exercise 02.11: `AutoencoderKL.decode(self, z)` -> images."""
    cases = []
    for seed, (B, _, H, W) in enumerate(IMAGE_SHAPES):
        model = _model(seed)
        f = model.config.downsampling_factor
        # large enough that some pixels leave [-1, 1]
        z = 3 * randn(B, model.config.latent_channels, H // f, W // f, seed=180 + seed)
        with torch.no_grad():
            expected = vae.AutoencoderKL.decode(model, z)
        cases.append(Case((model, z), expected))
    with torch.no_grad():
        return check(
            "Exercise 02.11",
            fn,
            cases,
            atol=ATOL,
            rtol=RTOL,
            hints=DECODE_HINTS,
            mistakes=DECODE_MISTAKES,
            keep=DECODE_PART,
        )


# --- Exercise 02.12: forward ------------------------------------------------------


def _seeded(fn: Callable) -> Callable:
    """`fn(model, x, sample_posterior, generator)` called with a seed for the
    generator: a fresh generator every call, and the global random state set to
    another seed, so that noise drawn from it gives other numbers."""

    @functools.wraps(fn)
    def call(model, x, sample_posterior, seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1000)
            return fn(model, x, sample_posterior, torch.Generator().manual_seed(seed))

    return call


def _forward(self, x, sample_posterior=False, generator=None, always=None):
    posterior = self.encode(x)
    if always is not None:
        sample_posterior = always
    z = posterior.sample(generator) if sample_posterior else posterior.mode()
    return vae.AutoencoderOutput(self.decode(z), posterior)


FORWARD_MISTAKES = {
    "always the mode: with sample_posterior=True, decode a sample of the "
    "posterior, posterior.sample(generator)": functools.partial(_forward, always=False),
    "always a sample: without sample_posterior, decode the mode, "
    "posterior.mode()": functools.partial(_forward, always=True),
    "the sample ignored the generator: pass it on, posterior.sample(generator)": (
        lambda self, x, sample_posterior=False, generator=None: _forward(
            self, x, sample_posterior
        )
    ),
}
FORWARD_HINTS = [
    "encode to a posterior, take one latent from it: a sample while training, "
    "the most likely one otherwise. Decode it, and return both the images and "
    "the posterior, which the loss needs for its KL.",
    "posterior = self.encode(x); z = posterior.sample(generator) if "
    "sample_posterior, else posterior.mode(); then self.decode(z).",
    "posterior = self.encode(x); z = posterior.sample(generator) if "
    "sample_posterior else posterior.mode(); return "
    "AutoencoderOutput(self.decode(z), posterior)",
]


def _named_fields(fn: Callable) -> Callable:
    """`fn`, refusing a plain tuple: later cells read `.reconstruction` and
    `.posterior` by name."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        # by field, not by class: a notebook may define AutoencoderOutput anew
        named = hasattr(out, "reconstruction") and hasattr(out, "posterior")
        if isinstance(out, tuple) and not named:
            raise TypeError(
                "forward returned a plain tuple: return AutoencoderOutput("
                "reconstruction, posterior), whose fields later code reads by name"
            )
        return out

    return call


def check_forward(fn: Callable) -> Verdict:
    """Exercise 02.12: `AutoencoderKL.forward(self, x, sample_posterior=False,
    generator=None)`."""
    cases = []
    for seed, shape in enumerate(IMAGE_SHAPES):
        model = _model(seed)
        x = randn(*shape, seed=190 + seed)
        for sample_posterior in (False, True):
            args = (model, x, sample_posterior, 7 + seed)
            with torch.no_grad():
                expected = _as_values(_seeded(vae.AutoencoderKL.forward)(*args))
            cases.append(Case(args, expected))
    with torch.no_grad():
        return check(
            "Exercise 02.12",
            _seeded(_compared(_named_fields(fn))),
            cases,
            atol=ATOL,
            rtol=RTOL,
            hints=FORWARD_HINTS,
            mistakes={k: _seeded(_compared(v)) for k, v in FORWARD_MISTAKES.items()},
            keep=FORWARD_PART,
        )


# --- Exercise 02.13: the training loss --------------------------------------------


def _loss(self, batch, generator=None, per_value=True, batch_sum=False, mode=False):
    x = batch["pixel_values"]
    reconstruction, posterior = self.vae(
        x, sample_posterior=not mode, generator=generator
    )
    mse = F.mse_loss(reconstruction.float(), x.float())
    kl = posterior.kl().sum() if batch_sum else posterior.kl().mean()
    if per_value:
        kl = kl / posterior.mean[0].numel()
    loss = mse + self.kl_weight * kl
    return loss, {"mse": mse.detach(), "kl": kl.detach()}


LOSS_MISTAKES = {
    "the KL is per image, not per latent value: divide it by the C·h·w values "
    "of one latent": functools.partial(_loss, per_value=False),
    "the KL was summed over the batch: average it over the images": (
        functools.partial(_loss, batch_sum=True)
    ),
    "the mode was decoded: training decodes a sample, "
    "self.vae(x, sample_posterior=True, generator=generator)": functools.partial(
        _loss, mode=True
    ),
}
LOSS_HINTS = [
    "run the autoencoder on the batch's images with a sampled latent; the loss "
    "is the reconstruction error plus the KL weight times the KL, both as "
    "averages per number, so that β means the same at any image size.",
    "self.vae(x, sample_posterior=True, generator=generator) gives the "
    "reconstruction and the posterior; mse = F.mse_loss(reconstruction, x); "
    "kl = the posterior's KL averaged over the batch, divided by the number of "
    "values of one latent; loss = mse + self.kl_weight * kl.",
    "x = batch['pixel_values']; reconstruction, posterior = self.vae(x, "
    "sample_posterior=True, generator=generator); mse = "
    "F.mse_loss(reconstruction, x); kl = posterior.kl().mean() / "
    "posterior.mean[0].numel(); return mse + self.kl_weight * kl, "
    "{'mse': mse.detach(), 'kl': kl.detach()}",
]


def _seeded_loss(fn: Callable) -> Callable:
    """`fn(loss, batch, generator)` called with a seed for the generator."""

    @functools.wraps(fn)
    def call(loss, batch, seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1000)
            return fn(loss, batch, torch.Generator().manual_seed(seed))

    return call


def check_vae_loss(fn: Callable) -> Verdict:
    """Exercise 02.13: `VAELoss.forward(self, batch, generator=None)`."""
    cases = []
    weights = (0.1, 1.0)
    for seed, (shape, kl_weight) in enumerate(zip(IMAGE_SHAPES, weights, strict=True)):
        loss = VAELoss(_model(seed), kl_weight=kl_weight)
        batch = {"pixel_values": randn(*shape, seed=200 + seed).clamp(-1, 1)}
        args = (loss, batch, 11 + seed)
        with torch.no_grad():
            expected = _as_values(_seeded_loss(vae.VAELoss.forward)(*args))
        cases.append(Case(args, expected))
    with torch.no_grad():
        return check(
            "Exercise 02.13",
            _seeded_loss(_compared(fn)),
            cases,
            atol=ATOL,
            rtol=RTOL,
            hints=LOSS_HINTS,
            mistakes={k: _seeded_loss(_compared(v)) for k, v in LOSS_MISTAKES.items()},
            keep=LOSS_PART,
        )


# --- Exercise 02.14: PSNR ---------------------------------------------------------

# (B, C, H, W): colour images, and grey ones with H != W
PSNR_SHAPES = [(3, 3, 8, 8), (2, 1, 4, 6)]


def _psnr(images, references, unit=True, clamp=True, per_image=True, log=torch.log10):
    a = images.float().clamp(-1, 1) if clamp else images.float()
    b = references.float()
    if unit:
        a, b = (a + 1) / 2, (b + 1) / 2
    dims = (1, 2, 3) if per_image else (0, 1, 2, 3)
    mse = (a - b).pow(2).mean(dim=dims)
    return 10 * log(1 / mse.clamp_min(1e-10))


PSNR_MISTAKES = {
    "the pixels stayed in [-1, 1]: PSNR's peak is 1 for pixels in [0, 1], so map "
    "them there first, (x + 1) / 2 (in [-1, 1] the error is 4 times larger, 6 dB "
    "less)": functools.partial(_psnr, unit=False),
    "the images were not clamped: a decoder's pixels may leave [-1, 1], and the "
    "picture shows them clamped": functools.partial(_psnr, clamp=False),
    "one PSNR for the whole batch: average the squared error per image, over "
    "C, H and W only": functools.partial(_psnr, per_image=False),
    "the natural logarithm: decibels are 10 log10": functools.partial(
        _psnr, log=torch.log
    ),
}
PSNR_HINTS = [
    "move both to [0, 1], where the brightest pixel is 1; take each image's mean "
    "squared error; the ratio of the peak, 1, to it, in decibels. A decoded "
    "image counts as it is shown, clamped to the range of a pixel.",
    "a = (images.clamp(-1, 1) + 1) / 2 and b = (references + 1) / 2; mse = "
    "(a - b)² averaged over dims 1, 2, 3; 10 · log10(1 / mse), with mse kept "
    "above 1e-10 so that a perfect copy gives 100 dB, not infinity.",
    "a = (images.float().clamp(-1, 1) + 1) / 2; b = (references.float() + 1) / 2; "
    "mse = (a - b).pow(2).mean(dim=(1, 2, 3)); return 10 * torch.log10(1 / "
    "mse.clamp_min(1e-10))",
]


def check_psnr(fn: Callable) -> Verdict:
    """Exercise 02.14: `psnr(images, references)` in dB, per image."""
    cases = []
    for seed, shape in enumerate(PSNR_SHAPES):
        references = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        references = 2 * references - 1  # in [-1, 1]
        # a decoder's output: close to the references, a little outside [-1, 1]
        images = references + 0.2 * randn(*shape, seed=210 + seed)
        images[0] = references[0]  # a perfect copy: 100 dB
        cases.append(Case((images, references), vae.psnr(images, references)))
    return check(
        "Exercise 02.14",
        fn,
        cases,
        hints=PSNR_HINTS,
        mistakes=PSNR_MISTAKES,
        keep=PSNR_PART,
        atol=1e-4,
        rtol=1e-5,
    )
