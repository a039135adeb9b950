"""Chapter 04: sdlearn's UNet <-> diffusers' `UNet2DConditionModel`.

sdlearn's module names are diffusers' (`conv_in`, `time_embedding.linear_1`,
`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`, ...), so the
weights load as they are; what differs is the config. diffusers' config has many
settings that SD 1.x and 2.x leave at one value, and sdlearn's UNet builds only
that value: `unet_config_from_diffusers` refuses any other, by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from sdlearn.unet import UNet, UNetConfig
from sdlearn.weights import load_checked

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """The config of a diffusers `UNet2DConditionModel` (its `.config`).

    Raises:
        ValueError: naming every setting sdlearn's UNet does not implement
            (SDXL's added embeddings, other block types, ...).
    """
    down_types = tuple(config["down_block_types"])
    levels = len(down_types)
    cross_attention_levels = tuple(t == "CrossAttnDownBlock2D" for t in down_types)
    expected = {
        # the block types that SD's layout implies
        "down_block_types": down_block_types(cross_attention_levels),
        "up_block_types": up_block_types(cross_attention_levels),
        # settings that sdlearn fixes to SD 1.x/2.x's values
        **FIXED_DIFFUSERS_SETTINGS,
    }
    unsupported = [
        f"{key}={plain(config.get(key, value))!r} (supported: {value!r})"
        for key, value in expected.items()
        if plain(config.get(key, value)) != value
    ]
    for key in ("sample_size", "layers_per_block", "cross_attention_dim"):
        if not isinstance(config[key], int):
            unsupported.append(f"{key}={config[key]!r} (supported: one int)")
    depth = config.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        unsupported.append(
            f"transformer_layers_per_block={depth!r} (supported: one int)"
        )
    if unsupported:
        raise ValueError(
            "sdlearn's UNet does not implement these diffusers settings:\n  "
            + "\n  ".join(unsupported)
        )
    # see the comment on UNetConfig.num_heads
    heads = config["attention_head_dim"]
    heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
    return UNetConfig(
        sample_size=config["sample_size"],
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        cross_attention_levels=cross_attention_levels,
        num_heads=heads,
        cross_attention_dim=config["cross_attention_dim"],
        transformer_layers_per_block=depth,
        norm_num_groups=config["norm_num_groups"],
        norm_eps=config["norm_eps"],
        use_linear_projection=config["use_linear_projection"],
        dropout=config.get("dropout", 0.0),
    )


def unet_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The keyword arguments of the equivalent diffusers `UNet2DConditionModel`."""
    heads = config.num_heads
    return {
        "sample_size": config.sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": down_block_types(config.cross_attention_levels),
        "up_block_types": up_block_types(config.cross_attention_levels),
        "block_out_channels": config.block_out_channels,
        "layers_per_block": config.layers_per_block,
        "cross_attention_dim": config.cross_attention_dim,
        # one int when all levels agree, as in SD 1.x's own config
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "transformer_layers_per_block": config.transformer_layers_per_block,
        "norm_num_groups": config.norm_num_groups,
        "norm_eps": config.norm_eps,
        "use_linear_projection": config.use_linear_projection,
        "dropout": config.dropout,
        **FIXED_DIFFUSERS_SETTINGS,
    }


def unet_from_diffusers(unet: UNet2DConditionModel) -> UNet:
    """The same model as a diffusers `UNet2DConditionModel`, with its weights.

    The weights are copied, on the same device and in the same dtype; the
    model is in training or eval mode as `unet` is.

    Raises:
        ValueError: if `unet`'s config uses settings sdlearn does not
            implement (see `unet_config_from_diffusers`).
    """
    config = unet_config_from_diffusers(unet.config)
    parameter = next(unet.parameters())
    # built without memory first: load_checked fills in every weight
    with torch.device("meta"):
        model = UNet(config).to(parameter.dtype)
    model = model.to_empty(device=parameter.device)
    load_checked(model, unet.state_dict(), "diffusers UNet2DConditionModel")
    return model.train(unet.training)


def unet_to_diffusers(model: UNet) -> UNet2DConditionModel:
    """`model` as a diffusers `UNet2DConditionModel`, with its weights.

    Needs diffusers installed (a development dependency of sdlearn).
    """
    from diffusers import UNet2DConditionModel

    parameter = next(model.parameters())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config_to_diffusers(model.config))
    unet = unet.to_empty(device=parameter.device)
    load_checked(unet, model.state_dict(), "sdlearn UNet")
    if parameter.dtype != torch.float32:
        unet = unet.to(parameter.dtype)
    return unet.train(model.training)


# diffusers UNet2DConditionModel settings that sdlearn's UNet fixes, with the
# values SD 1.x and 2.x use; unet_config_from_diffusers refuses any other value
FIXED_DIFFUSERS_SETTINGS: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}


def down_block_types(cross_attention_levels: tuple[bool, ...]) -> tuple[str, ...]:
    """diffusers' names of the down blocks, finest level first."""
    return tuple(
        "CrossAttnDownBlock2D" if cross else "DownBlock2D"
        for cross in cross_attention_levels
    )


def up_block_types(cross_attention_levels: tuple[bool, ...]) -> tuple[str, ...]:
    """diffusers' names of the up blocks, which it lists coarsest first."""
    return tuple(
        "CrossAttnUpBlock2D" if cross else "UpBlock2D"
        for cross in reversed(cross_attention_levels)
    )


def plain(value: Any) -> Any:
    """Lists (as JSON configs store them) as tuples, to compare with ours."""
    return tuple(value) if isinstance(value, list) else value
