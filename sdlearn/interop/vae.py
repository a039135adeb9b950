"""Chapter 02: sdlearn's AutoencoderKL <-> diffusers' `AutoencoderKL`.

The module names are diffusers', so the weights load one-to-one; the config's
keys are diffusers' too, and the options sdlearn does not build are refused by
name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from sdlearn.vae import AutoencoderKL, VAEConfig
from sdlearn.weights import load_checked


def vae_config_from_diffusers(config: Mapping[str, Any]) -> VAEConfig:
    """The config of a diffusers `AutoencoderKL` (its `.config`, or the
    vae/config.json of a diffusers folder).

    Raises:
        ValueError: the config asks for options sdlearn does not build.
    """
    levels = len(config["block_out_channels"])
    supported = {
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "act_fn": "silu",
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
        "shift_factor": None,
    }
    for key, value in supported.items():
        given = config.get(key, value)
        given = tuple(given) if isinstance(given, list) else given
        if given != value:
            raise ValueError(
                f"sdlearn's AutoencoderKL needs {key}={value!r}, got {given!r}"
            )
    size = config.get("sample_size", 512)
    return VAEConfig(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        latent_channels=config["latent_channels"],
        norm_num_groups=config["norm_num_groups"],
        scaling_factor=config.get("scaling_factor", 0.18215),
        sample_size=size[0] if isinstance(size, (list, tuple)) else size,
    )


def vae_config_to_diffusers(config: VAEConfig) -> dict[str, Any]:
    """The keyword arguments of the equivalent diffusers `AutoencoderKL`."""
    levels = len(config.block_out_channels)
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": config.block_out_channels,
        "layers_per_block": config.layers_per_block,
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": config.sample_size,
        "scaling_factor": config.scaling_factor,
    }


def vae_from_diffusers(vae: nn.Module) -> AutoencoderKL:
    """Copy a diffusers `AutoencoderKL` (e.g. SD 1.5's, from
    `AutoencoderKL.from_pretrained(..., subfolder="vae")`).

    Args:
        vae: a diffusers `AutoencoderKL` with SD's layout.

    Returns:
        an sdlearn `AutoencoderKL` with the same config and weights (float32).

    Raises:
        ValueError: the diffusers model has options sdlearn does not build.
        WeightsMismatchError: its weights do not fit, naming the keys.
    """
    config = vae_config_from_diffusers(vae.config)
    model = AutoencoderKL(config)
    state_dict = {k: v.float() for k, v in vae.state_dict().items()}
    load_checked(model, state_dict, f"diffusers {type(vae).__name__}")
    return model.train(vae.training)


def vae_to_diffusers(model: AutoencoderKL) -> nn.Module:
    """A diffusers `AutoencoderKL` with `model`'s config and weights.

    Needs diffusers (a dev dependency), imported only here.

    Returns:
        diffusers' `AutoencoderKL`, in `model`'s train/eval mode.
    """
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    vae = DiffusersAutoencoderKL(**vae_config_to_diffusers(model.config))
    load_checked(vae, model.state_dict(), "sdlearn AutoencoderKL")
    return vae.train(model.training)
