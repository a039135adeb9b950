"""Reference tensors for sdlearn/vae.py, made with diffusers' AutoencoderKL.

Two small autoencoders with random weights, differing in every dimension that
could be mixed up (levels, channels, ResnetBlocks per level, latent channels,
norm groups). For each, under the prefix `two_levels.` or `three_levels.`:

    weights.NAME    diffusers' own state dict
    images          (B, 3, H, W) inputs
    mean, logvar    encode(images).latent_dist.mean / .logvar
    sample_seed     the seed of the torch.Generator given to sample()
    sample          latent_dist.sample(generator) with that seed
    kl              latent_dist.kl(), (B,)
    latents         (B, C_latent, H/f, W/f) inputs to decode
    decoded         decode(latents).sample
    reconstruction  forward(images, sample_posterior=True, generator) with
                    sample_seed
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

CONFIGS = {
    "two_levels": {
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
    },
    "three_levels": {
        "block_out_channels": (6, 12, 12),
        "layers_per_block": 2,
        "latent_channels": 2,
        "norm_num_groups": 3,
    },
}
BATCH, SIZE = 2, 16


def build(config: dict) -> AutoencoderKL:
    levels = len(config["block_out_channels"])
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        **config,
    )


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights that keep activations near unit scale.

    Weight matrices and kernels get N(0, 1 / fan_in); norm scales 1 + N(0, 0.2^2)
    and every bias N(0, 0.2^2), so that no parameter keeps its default 0 or 1 and
    a weight loaded into the wrong place shows.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim > 1:
                parameter.copy_(noise * parameter[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            else:
                parameter.copy_(0.2 * noise)
    return module.eval()


def make() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        vae = randomize_(build(config), seed=1 + i)
        f = 2 ** (len(config["block_out_channels"]) - 1)
        images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator).clamp(-1, 1)
        latents = torch.randn(
            BATCH,
            config["latent_channels"],
            SIZE // f,
            SIZE // f,
            generator=generator,
        )
        seed = 100 + i
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            sample = posterior.sample(torch.Generator().manual_seed(seed))
            decoded = vae.decode(latents).sample
            reconstruction = vae(
                images,
                sample_posterior=True,
                generator=torch.Generator().manual_seed(seed),
            ).sample
        weights = {f"{name}.weights.{k}": v for k, v in vae.state_dict().items()}
        out |= weights
        out |= {
            f"{name}.images": images,
            f"{name}.mean": posterior.mean,
            f"{name}.logvar": posterior.logvar,
            f"{name}.sample_seed": torch.tensor(seed),
            f"{name}.sample": sample,
            f"{name}.kl": posterior.kl(),
            f"{name}.latents": latents,
            f"{name}.decoded": decoded,
            f"{name}.reconstruction": reconstruction,
        }
    return out
