"""Chapter 10: a smaller VAE decoder, taught to draw what the full one draws.

The VAE's decoder runs once per image, at the image's full size, so after the
steps have been made cheap it is a larger share of an image's time. A decoder
with half the channels does about a quarter of the work. It has to be trained:
`distill_decoder` teaches one to give the full decoder's images from the same
latents (distillation, as TAESD does for Stable Diffusion), on the course's
shapes, with the encoder and the full decoder frozen. `WithDecoder` puts it in
a pipeline: the VAE still encodes, the small decoder decodes.

The course ships one for the tiny VAE (`shipped_small_decoder`), trained by
`python tools/train_small_decoder.py --ship`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.shapes import ALL_SHAPES, ALL_STYLES, ShapesDataset
from sdlearn.vae import AutoencoderKL, Decoder, VAEConfig
from sdlearn.weights import SHIPPED_DIR, config_from_json, load_checked, read_shipped


def smaller_config(config: VAEConfig, width: float = 0.5) -> VAEConfig:
    """`config` with every level's channels times `width` (the groups of its
    GroupNorms shrunk to fit where needed)."""
    if not 0 < width <= 1:
        raise ValueError(f"expected 0 < width <= 1, got {width}")
    channels = tuple(max(1, round(c * width)) for c in config.block_out_channels)
    groups = config.norm_num_groups
    while any(c % groups for c in channels):
        groups //= 2
    return replace(config, block_out_channels=channels, norm_num_groups=groups)


class SmallDecoder(nn.Module):
    """A VAE's way back, latents to images, at another width: its
    `post_quant_conv` and `decoder`, named as in `AutoencoderKL`.

    Args:
        config: the decoder's shape, `smaller_config(vae.config)`.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.decoder = Decoder(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C_latent, h, w) -> images (B, C_out, h*f, w*f)."""
        latent = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != latent:
            raise ValueError(
                f"expected latents of shape (B, {latent}, h, w), got {tuple(z.shape)}"
            )
        return self.decoder(self.post_quant_conv(z))


class WithDecoder(nn.Module):
    """A VAE whose `decode` is another decoder's; `encode` and `config` are
    the VAE's. Set it as a pipeline's `vae`.

    Args:
        vae: the autoencoder.
        decoder: the decoder to draw with, for latents of `vae`'s shape.
    """

    def __init__(self, vae: AutoencoderKL, decoder: SmallDecoder) -> None:
        super().__init__()
        if decoder.config.latent_channels != vae.config.latent_channels:
            raise ValueError(
                f"expected a decoder of {vae.config.latent_channels} latent "
                f"channels, got {decoder.config.latent_channels}"
            )
        self.vae = vae
        self.small = decoder

    @property
    def config(self) -> VAEConfig:
        return self.vae.config

    def encode(self, x: torch.Tensor):
        """The VAE's own: images (B, C_img, H, W) -> q(z | x) over latents."""
        return self.vae.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The small decoder's: latents (B, C_latent, h, w), unscaled ->
        images (B, C_out, h*f, w*f)."""
        return self.small(z)


def distill_decoder(
    vae: AutoencoderKL,
    decoder: SmallDecoder,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 2e-3,
    pool: int = 4096,
    seed: int = 0,
    log_every: int = 250,
) -> list[dict]:
    """Teach `decoder` to give `vae`'s decoded images from the same latents.

    The latents are the encoder's (the mode of q(z | x)) for `pool` of the
    course's shapes images, every shape and style, computed once with the full
    decoder's images for them; each step draws a batch from that pool. The loss
    is the mean absolute error to the full decoder's output; Adam, its learning
    rate decaying to a tenth on a cosine. `vae` is frozen; `decoder` is trained
    in place.

    Returns:
        the log: {"step", "loss", "seconds"} every `log_every` steps.
    """
    if min(steps, batch_size, pool) < 1:
        raise ValueError(
            f"expected steps, batch_size, pool >= 1, got {steps}, {batch_size}, {pool}"
        )
    start = time.perf_counter()
    data = ShapesDataset("all", pool, seed=seed, shapes=ALL_SHAPES, styles=ALL_STYLES)
    vae.eval().requires_grad_(False)
    latents, targets = [], []
    with torch.no_grad():
        for first in range(0, pool, 256):
            images = torch.stack(
                [data[i]["pixel_values"] for i in range(first, min(first + 256, pool))]
            )  # (b, 3, H, W)
            latents.append(vae.encode(images).mode())  # (b, C_latent, H/f, W/f)
            targets.append(vae.decode(latents[-1]))
    latents, targets = torch.cat(latents), torch.cat(targets)

    g = torch.Generator().manual_seed(seed)
    decoder.train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, lr / 10)
    log = []
    for step in range(steps):
        batch = torch.randint(pool, (batch_size,), generator=g)
        loss = F.l1_loss(decoder(latents[batch]), targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            seconds = time.perf_counter() - start
            log.append({"step": step + 1, "loss": loss.item(), "seconds": seconds})
    decoder.eval()
    return log


def shipped_small_decoder() -> SmallDecoder:
    """The course's small decoder for the tiny VAE, as shipped in the package."""
    state_dict, record = read_shipped("small_decoder")
    config = VAEConfig(**config_from_json(record["model_config"]))
    source = str(SHIPPED_DIR / "small_decoder.safetensors")
    return load_checked(SmallDecoder(config), state_dict, source).eval()


def record_of(decoder: SmallDecoder, **fields) -> dict:
    """What `write_shipped` keeps beside the weights: the config, and `fields`."""
    return {"model_config": asdict(decoder.config), **fields}
