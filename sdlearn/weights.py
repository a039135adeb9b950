"""All weight-name mapping in one place, and the checks that make loading safe.

sdlearn names its modules like diffusers and transformers wherever that costs
nothing (`to_q`, `conv_in`, `time_embedding`), so most state dicts load as they
are. The few differences are tables in this module, applied key by key; every
load checks every key and shape and names what does not fit, the way nanoGPT's
`from_pretrained` asserts every shape.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from sdlearn.clip import CLIPTextModel
    from sdlearn.unet import UNet, UNetConfig
    from sdlearn.vae import AutoencoderKL, VAEConfig


class WeightsMismatchError(ValueError):
    """A state dict does not fit a model; the message lists the keys that differ."""


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raises `WeightsMismatchError` unless `state_dict` fits `model` exactly.

    Args:
        model: the module to load into.
        state_dict: names to tensors, already renamed to the model's names.
        source: where the weights come from (a file name, "diffusers UNet2D..."),
            named in the error.
    """
    parts = _mismatches(model.state_dict(), state_dict)
    if parts:
        header = f"weights from {source} do not fit {type(model).__name__}:"
        raise WeightsMismatchError("\n".join([header, *parts]))


def _mismatches(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> list[str]:
    """The listings of missing, unexpected and wrong-shaped keys; [] if it fits."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{key}: got {tuple(state_dict[key].shape)}, "
        f"expected {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    parts = []
    if missing:
        parts.append(_listing("missing keys", missing))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if wrong_shape:
        parts.append(_listing("wrong-shaped keys", wrong_shape))
    return parts


def weights_digest(*models: nn.Module) -> str:
    """A short hash of models' weights (every key, dtype, shape and value, in
    order): equal digests mean identical weights. Fine-tune records keep their
    base pipeline's, so a fine-tune is never applied to another base.
    """
    import hashlib

    digest = hashlib.sha256()
    for model in models:
        for key, value in model.state_dict().items():
            value = value.detach().cpu().contiguous()
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
            # flat first: a 0-dim tensor cannot be viewed as bytes
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> nn.Module:
    """Checks every key and shape (see `check_state_dict`), then loads exactly.

    Returns:
        model, with the weights copied in.
    """
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    return model


def rename(
    state_dict: Mapping[str, torch.Tensor], table: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Renames keys by replacing substrings: `table` maps old parts to new ones.

    The table is applied in order, each entry to every key, so put longer,
    more specific parts first.
    """
    renamed = {}
    for key, value in state_dict.items():
        for old, new in table.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def config_from_json(values: Mapping) -> dict:
    """A config's fields read back from JSON, which turned its tuples into lists."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


# --- CLIP's text encoder (chapter 03) ---------------------------------------

# transformers' CLIPTextModel -> sdlearn's. Only the attention projections differ:
# sdlearn's Attention uses diffusers' names (embeddings, layer_norm1/2, mlp.fc1/2
# and final_layer_norm are the same in both).
CLIP_TEXT_TO_SDLEARN: dict[str, str] = {
    ".self_attn.q_proj.": ".self_attn.to_q.",
    ".self_attn.k_proj.": ".self_attn.to_k.",
    ".self_attn.v_proj.": ".self_attn.to_v.",
    ".self_attn.out_proj.": ".self_attn.to_out.0.",
}


def clip_text_from_transformers(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel weights under sdlearn's names.

    Takes transformers 5.x's state dict (`embeddings.token_embedding.weight`,
    `encoder.layers.0.self_attn.q_proj.weight`, ...) and the older layout that
    checkpoint files keep, SD 1.x's text encoder among them: every key under
    `text_model.`, plus the buffer `embeddings.position_ids` (arange(77), not a
    weight: sdlearn makes the positions when it needs them), which is dropped.
    """
    kept = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key != "embeddings.position_ids":
            kept[key] = value
    return rename(kept, CLIP_TEXT_TO_SDLEARN)


def clip_text_to_transformers(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """sdlearn's CLIPTextModel weights under transformers 5.x's names."""
    to_transformers = {new: old for old, new in CLIP_TEXT_TO_SDLEARN.items()}
    return rename(state_dict, to_transformers)


# --- the course's tiny models, shipped in the package -------------------------

SHIPPED_DIR = Path(__file__).resolve().parent / "data" / "tiny"


def write_shipped(
    name: str,
    state_dict: Mapping[str, torch.Tensor],
    record: dict,
    folder: Path = SHIPPED_DIR,
) -> Path:
    """Saves trained weights as NAME.safetensors with NAME.json beside them.

    Args:
        name: "vae", "clip", "unet"...
        state_dict: the weights.
        record: how they were made: model config, training config, seed, the
            command, wall time and final metrics.
        folder: where to write; the package's data/tiny by default.

    Returns:
        the path of the weights file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, path)
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_shipped(
    name: str, folder: Path = SHIPPED_DIR
) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and the record that `write_shipped` saved under NAME."""
    path = folder / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the tiny {name} has not been trained and shipped "
            f"yet (`sdlearn train {name} --ship`)"
        )
    try:
        state_dict = load_file(path)
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable safetensors file: {error}"
        ) from None
    return state_dict, json.loads((folder / f"{name}.json").read_text())


# --- original single-file SD 1.x checkpoints ---------------------------------
#
# Stable Diffusion 1.x was released as one file (v1-5-pruned-emaonly.ckpt, and
# later .safetensors) holding the state dict of CompVis/latent-diffusion's
# `LatentDiffusion`: the UNet under `model.diffusion_model.`, the autoencoder
# under `first_stage_model.`, the text encoder under `cond_stage_model.`. Most
# fine-tunes on the web still use that layout. The UNet and the VAE there have
# the latent-diffusion code's own module names; the tables below translate them,
# and their block numbers are derived from the config, so they fit any UNet or
# VAE sdlearn builds, not only SD 1.5's. The ground truth is diffusers'
# converter (`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`,
# `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`);
# tests/test_weights_original.py runs it on what these functions write.

ORIGINAL_UNET_PREFIX = "model.diffusion_model."
ORIGINAL_VAE_PREFIX = "first_stage_model."
# the text encoder is a transformers CLIPTextModel, as transformers 4 saved it
ORIGINAL_TEXT_PREFIX = "cond_stage_model.transformer."
_ORIGINAL_TEXT_MODEL = ORIGINAL_TEXT_PREFIX + "text_model."
_ORIGINAL_POSITION_IDS = _ORIGINAL_TEXT_MODEL + "embeddings.position_ids"

# latent-diffusion's ResBlock keeps its layers in nn.Sequentials, so its weights
# are named by position: in_layers = (GroupNorm, SiLU, conv), emb_layers = (SiLU,
# Linear), out_layers = (GroupNorm, SiLU, Dropout, conv). The indices skip the
# layers without weights. diffusers' ResnetBlock2D (and so sdlearn's) names them.
UNET_RESNET_TO_ORIGINAL: dict[str, str] = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}

# the autoencoder's ResnetBlock: the same names but for the 1x1 shortcut
VAE_RESNET_TO_ORIGINAL: dict[str, str] = {
    "norm1.": "norm1.",
    "conv1.": "conv1.",
    "norm2.": "norm2.",
    "conv2.": "conv2.",
    "conv_shortcut.": "nin_shortcut.",
}

# the autoencoder's mid-block attention (latent-diffusion's AttnBlock), whose
# q, k, v and proj_out are 1x1 convolutions: weights (C, C, 1, 1) there, (C, C)
# in sdlearn's and diffusers' nn.Linear. The same numbers, reshaped.
VAE_ATTENTION_TO_ORIGINAL: dict[str, str] = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}

# Keys of the original files that none of sdlearn's models hold, skipped on load
# (`split_original_checkpoint` keeps only the three prefixes above):
# - `model_ema.*`: in the full training files (v1-5-pruned.ckpt), an EMA copy of
#   the UNet with the dots taken out of its names (`model_ema.diffusion_model
#   input_blocks00weight`), plus `model_ema.decay` and `model_ema.num_updates`.
#   The "-emaonly" files already put the EMA weights under model.diffusion_model.
# - the DDPM schedule that latent-diffusion registers as buffers: `betas`,
#   `alphas_cumprod`, `alphas_cumprod_prev`, `sqrt_alphas_cumprod`,
#   `sqrt_one_minus_alphas_cumprod`, `log_one_minus_alphas_cumprod`,
#   `sqrt_recip_alphas_cumprod`, `sqrt_recipm1_alphas_cumprod`,
#   `posterior_variance`, `posterior_log_variance_clipped`,
#   `posterior_mean_coef1`, `posterior_mean_coef2`; the scheduler's config
#   makes them (sdlearn.schedulers). sdlearn does not write them: latent-diffusion
#   computes them in float64 before rounding to float32, so sdlearn's float32
#   betas would differ in the last bits, and loaders rebuild them from the config.
# - anything else (`logvar`, `lvlb_weights`, a training loss's weights...).


def unet_original_table(config: UNetConfig) -> dict[str, str]:
    """Where each part of sdlearn's UNet sits in the original layout.

    latent-diffusion's UNetModel numbers its blocks in one run per direction:
    `input_blocks.0` is conv_in, then every down layer is one input block
    (`.0` its ResnetBlock, `.1` its SpatialTransformer) and every downsampler
    one more (its conv is called `op`); `output_blocks` count the up layers the
    same way, coarsest level first, and a level's upsampler joins its last
    output block, after the SpatialTransformer if there is one (`.2.conv`, or
    `.1.conv`). So the numbers depend on layers_per_block, the number of levels
    and which levels have attention, all read from `config`.

    Args:
        config: the UNet's shape.

    Returns:
        sdlearn name prefixes (diffusers' names, "down_blocks.0.resnets.1.conv1.")
        to the original ones ("model.diffusion_model.input_blocks.2.0.in_layers.2.").
        Every key of the UNet starts with exactly one sdlearn prefix of it.
    """
    levels = len(config.block_out_channels)
    layers = config.layers_per_block
    # (sdlearn prefix, original prefix, is a ResnetBlock)
    blocks: list[tuple[str, str, bool]] = [
        # time_embed = Sequential(Linear, SiLU, Linear)
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
    ]

    # 1. down: input_blocks.1 onwards
    index = 1
    for level in range(levels):
        cross = config.cross_attention_levels[level]
        for layer in range(layers):
            ours = f"down_blocks.{level}."
            blocks.append((f"{ours}resnets.{layer}.", f"input_blocks.{index}.0.", True))
            if cross:
                blocks.append(
                    (f"{ours}attentions.{layer}.", f"input_blocks.{index}.1.", False)
                )
            index += 1
        if level < levels - 1:
            blocks.append(
                (
                    f"down_blocks.{level}.downsamplers.0.conv.",
                    f"input_blocks.{index}.0.op.",
                    False,
                )
            )
            index += 1

    # 2. middle: ResBlock, SpatialTransformer, ResBlock
    blocks += [
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]

    # 3. up, coarsest level first, one more layer per level than on the way down
    index = 0
    for block, level in enumerate(reversed(range(levels))):
        cross = config.cross_attention_levels[level]
        for layer in range(layers + 1):
            ours = f"up_blocks.{block}."
            blocks.append(
                (f"{ours}resnets.{layer}.", f"output_blocks.{index}.0.", True)
            )
            if cross:
                blocks.append(
                    (f"{ours}attentions.{layer}.", f"output_blocks.{index}.1.", False)
                )
            index += 1
        if level > 0:
            # in the level's last output block, after its layers
            position = 2 if cross else 1
            blocks.append(
                (
                    f"up_blocks.{block}.upsamplers.0.conv.",
                    f"output_blocks.{index - 1}.{position}.conv.",
                    False,
                )
            )

    # 4. out = Sequential(GroupNorm, SiLU, conv)
    blocks += [("conv_norm_out.", "out.0.", False), ("conv_out.", "out.2.", False)]
    return _expand(blocks, UNET_RESNET_TO_ORIGINAL, ORIGINAL_UNET_PREFIX)


def vae_original_table(config: VAEConfig) -> dict[str, str]:
    """Where each part of sdlearn's AutoencoderKL sits in the original layout.

    latent-diffusion's Encoder and Decoder name a level's ResnetBlocks
    `down.i.block.j` / `up.i.block.j` and its resampler `down.i.downsample` /
    `up.i.upsample`; the decoder numbers its levels like the encoder, finest
    first, so `up.0` is the last level it runs (diffusers' `up_blocks` count in
    running order, coarsest first). The middle is `mid.block_1`, `mid.attn_1`,
    `mid.block_2`.

    Args:
        config: the autoencoder's shape.

    Returns:
        sdlearn name prefixes ("decoder.up_blocks.0.resnets.1.") to the original
        ones ("first_stage_model.decoder.up.3.block.1."); every key of the
        autoencoder starts with exactly one sdlearn prefix of it.
    """
    levels = len(config.block_out_channels)
    blocks: list[tuple[str, str, bool]] = []
    for part in ("encoder", "decoder"):
        blocks += [
            (f"{part}.conv_in.", f"{part}.conv_in.", False),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", True),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", True),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", False),
            (f"{part}.conv_out.", f"{part}.conv_out.", False),
        ]
        blocks += [
            (
                f"{part}.mid_block.attentions.0.{ours}",
                f"{part}.mid.attn_1.{theirs}",
                False,
            )
            for ours, theirs in VAE_ATTENTION_TO_ORIGINAL.items()
        ]
    for level in range(levels):
        for layer in range(config.layers_per_block):
            blocks.append(
                (
                    f"encoder.down_blocks.{level}.resnets.{layer}.",
                    f"encoder.down.{level}.block.{layer}.",
                    True,
                )
            )
        if level < levels - 1:
            blocks.append(
                (
                    f"encoder.down_blocks.{level}.downsamplers.0.conv.",
                    f"encoder.down.{level}.downsample.conv.",
                    False,
                )
            )
    for block, level in enumerate(reversed(range(levels))):
        for layer in range(config.layers_per_block + 1):
            blocks.append(
                (
                    f"decoder.up_blocks.{block}.resnets.{layer}.",
                    f"decoder.up.{level}.block.{layer}.",
                    True,
                )
            )
        if level > 0:
            blocks.append(
                (
                    f"decoder.up_blocks.{block}.upsamplers.0.conv.",
                    f"decoder.up.{level}.upsample.conv.",
                    False,
                )
            )
    blocks += [
        # named after the vector-quantized autoencoder, in both layouts
        ("quant_conv.", "quant_conv.", False),
        ("post_quant_conv.", "post_quant_conv.", False),
    ]
    return _expand(blocks, VAE_RESNET_TO_ORIGINAL, ORIGINAL_VAE_PREFIX)


def _expand(
    blocks: list[tuple[str, str, bool]], resnet_table: Mapping[str, str], prefix: str
) -> dict[str, str]:
    """One table entry per block, or per layer inside a ResnetBlock, whose inner
    names differ too; the original side gets the component's file prefix."""
    table = {}
    for ours, theirs, is_resnet in blocks:
        inner = resnet_table if is_resnet else {"": ""}
        for our_part, their_part in inner.items():
            table[ours + our_part] = prefix + theirs + their_part
    return table


def _swap_prefixes(
    state_dict: Mapping[str, torch.Tensor], table: Mapping[str, str], target: str
) -> dict[str, torch.Tensor]:
    """Renames every key by the longest prefix of it that `table` holds.

    Raises:
        WeightsMismatchError: naming the keys no prefix of the table matches.
    """
    renamed, unplaced = {}, []
    for key, value in state_dict.items():
        parts = key.split(".")
        # longest first: "mid_block.attentions.0.to_out.0." before any shorter
        for end in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:end]) + "."
            if prefix in table:
                renamed[table[prefix] + key[len(prefix) :]] = value
                break
        else:
            unplaced.append(key)
    if unplaced:
        raise WeightsMismatchError(
            f"these weights have no place in {target}:\n"
            + _listing("unplaced keys", sorted(unplaced))
        )
    return renamed


def _inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {theirs: ours for ours, theirs in table.items()}


def unet_to_original(
    state_dict: Mapping[str, torch.Tensor], config: UNetConfig
) -> dict[str, torch.Tensor]:
    """sdlearn's (= diffusers') UNet weights under the original checkpoint names.

    Args:
        state_dict: a `UNet`'s state dict.
        config: that UNet's config; the block numbers depend on it.

    Returns:
        the same tensors (not copied) under `model.diffusion_model.*` names.

    Raises:
        WeightsMismatchError: naming keys that no UNet of `config` has.
    """
    return _swap_prefixes(
        state_dict, unet_original_table(config), "the original layout's UNet"
    )


def unet_from_original(
    state_dict: Mapping[str, torch.Tensor], config: UNetConfig
) -> dict[str, torch.Tensor]:
    """The UNet's weights from an original checkpoint under sdlearn's names.

    Only renames: `load_checked` then checks that every key is there with its
    shape.

    Args:
        state_dict: the `model.diffusion_model.*` keys of an original checkpoint
            (see `split_original_checkpoint`), prefix included.
        config: the UNet's config; the block numbers depend on it.

    Returns:
        the same tensors (not copied) under sdlearn's names.

    Raises:
        WeightsMismatchError: naming keys that have no place in a UNet of `config`.
    """
    table = _inverse(unet_original_table(config))
    return _swap_prefixes(state_dict, table, f"sdlearn's UNet for {config}")


# the attention weights that are 1x1 convolutions in the original layout
_VAE_CONV_SHAPED = tuple(
    f"{part}.mid_block.attentions.0.{name}weight"
    for part in ("encoder", "decoder")
    for name in ("to_q.", "to_k.", "to_v.", "to_out.0.")
)


def vae_to_original(
    state_dict: Mapping[str, torch.Tensor], config: VAEConfig
) -> dict[str, torch.Tensor]:
    """sdlearn's (= diffusers') AutoencoderKL weights in the original layout.

    The mid-block attention weights become 1x1 convolution weights, (C, C) ->
    (C, C, 1, 1).

    Args:
        state_dict: an `AutoencoderKL`'s state dict.
        config: that autoencoder's config; the block numbers depend on it.

    Returns:
        the same tensors (views, not copies) under `first_stage_model.*` names.

    Raises:
        WeightsMismatchError: naming keys that no autoencoder of `config` has.
    """
    reshaped = {
        key: value[:, :, None, None]
        if key in _VAE_CONV_SHAPED and value.ndim == 2
        else value
        for key, value in state_dict.items()
    }
    return _swap_prefixes(
        reshaped, vae_original_table(config), "the original layout's autoencoder"
    )


def vae_from_original(
    state_dict: Mapping[str, torch.Tensor], config: VAEConfig
) -> dict[str, torch.Tensor]:
    """The autoencoder's weights from an original checkpoint under sdlearn's names.

    Only renames, and turns the mid-block attention's (C, C, 1, 1) convolution
    weights into (C, C) linear ones; tensors of any other shape are left for
    `load_checked` to report.

    Args:
        state_dict: the `first_stage_model.*` keys of an original checkpoint
            (see `split_original_checkpoint`), prefix included.
        config: the autoencoder's config; the block numbers depend on it.

    Returns:
        the same tensors (views, not copies) under sdlearn's names.

    Raises:
        WeightsMismatchError: naming keys that have no place in an autoencoder
            of `config`.
    """
    table = _inverse(vae_original_table(config))
    renamed = _swap_prefixes(state_dict, table, f"sdlearn's AutoencoderKL for {config}")
    return {
        key: value[:, :, 0, 0]
        if key in _VAE_CONV_SHAPED and value.shape[2:] == (1, 1)
        else value
        for key, value in renamed.items()
    }


def clip_text_to_original(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """sdlearn's CLIPTextModel weights as SD 1.x's files keep the text encoder.

    transformers 4's names under `cond_stage_model.transformer.text_model.`,
    with the buffer `embeddings.position_ids` = arange(max positions), of shape
    (1, T) and dtype int64, as transformers 4 saved it.

    Args:
        state_dict: a `CLIPTextModel`'s state dict.

    Returns:
        the same tensors (not copied), plus position_ids.
    """
    original = {
        _ORIGINAL_TEXT_MODEL + key: value
        for key, value in clip_text_to_transformers(state_dict).items()
    }
    positions = state_dict["embeddings.position_embedding.weight"]
    original[_ORIGINAL_POSITION_IDS] = torch.arange(
        positions.shape[0], device=positions.device
    )[None]  # (1, T)
    return original


def clip_text_from_original(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The text encoder's weights from an original checkpoint under sdlearn's names.

    Drops `embeddings.position_ids`: sdlearn makes the positions itself, which
    also ignores the damaged (float, not quite integer) position_ids that some
    merged checkpoints carry.

    Args:
        state_dict: the `cond_stage_model.transformer.*` keys of an original
            checkpoint (see `split_original_checkpoint`), prefix included.

    Returns:
        the same tensors (not copied) under sdlearn's names.

    Raises:
        WeightsMismatchError: naming keys outside `cond_stage_model.transformer.`.
    """
    outside = sorted(k for k in state_dict if not k.startswith(ORIGINAL_TEXT_PREFIX))
    if outside:
        raise WeightsMismatchError(
            f"these weights have no place in the text encoder (expected keys "
            f"under {ORIGINAL_TEXT_PREFIX}):\n" + _listing("unplaced keys", outside)
        )
    return clip_text_from_transformers(
        {k.removeprefix(ORIGINAL_TEXT_PREFIX): v for k, v in state_dict.items()}
    )


def split_original_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Sorts an original SD 1.x checkpoint's keys into UNet, VAE and text encoder.

    Keys keep their prefixes, as the `*_from_original` functions take them.
    Every other key is dropped: the EMA copy, the DDPM schedule buffers and the
    rest listed above this function in sdlearn/weights.py. Text encoders saved
    without transformers' `text_model.` level (`cond_stage_model.transformer.
    embeddings.*`, a layout some early fine-tunes have) are moved under it.

    Args:
        state_dict: the whole file's state dict (`read_checkpoint_file`).

    Returns:
        (unet, vae, text_encoder): the `model.diffusion_model.*`,
        `first_stage_model.*` and `cond_stage_model.transformer.*` tensors.
    """
    unet, vae, text = {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith(ORIGINAL_UNET_PREFIX):
            unet[key] = value
        elif key.startswith(ORIGINAL_VAE_PREFIX):
            vae[key] = value
        elif key.startswith(ORIGINAL_TEXT_PREFIX):
            if not key.startswith(_ORIGINAL_TEXT_MODEL):
                key = _ORIGINAL_TEXT_MODEL + key.removeprefix(ORIGINAL_TEXT_PREFIX)
            text[key] = value
    return unet, vae, text


def combine_original(
    unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> dict[str, torch.Tensor]:
    """The three models' weights as one original SD 1.x state dict.

    Holds no EMA copy and no DDPM schedule buffers (see the list above
    `split_original_checkpoint`'s definition); loaders of the original layout
    make those from the config.

    Args:
        unet: sdlearn's UNet.
        vae: sdlearn's AutoencoderKL.
        text_encoder: sdlearn's CLIPTextModel.

    Returns:
        `model.diffusion_model.*`, `first_stage_model.*` and
        `cond_stage_model.transformer.text_model.*` tensors (not copied).
    """
    return {
        **unet_to_original(unet.state_dict(), unet.config),
        **vae_to_original(vae.state_dict(), vae.config),
        **clip_text_to_original(text_encoder.state_dict()),
    }


def save_original(
    path: str | Path, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> Path:
    """Writes the three models as one original-layout `.safetensors` file.

    Only safetensors: a pickle (.ckpt) can carry code that runs when it is
    loaded, and the tools that read SD 1.x files all read safetensors.

    Args:
        path: where to write; must end in `.safetensors`.
        unet, vae, text_encoder: as for `combine_original`.

    Returns:
        the path written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_original writes .safetensors files only, got {path}")
    state_dict = combine_original(unet, vae, text_encoder)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path)
    return path


# extensions of pickled PyTorch checkpoints, read with torch.load(weights_only=True)
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a checkpoint file's tensors, never running code from it.

    `.safetensors` files hold nothing but tensors. `.ckpt`, `.pt`, `.pth` and
    `.bin` files are Python pickles, which can call any function while they are
    read; they are read with `torch.load(weights_only=True)`, which accepts
    only tensors and plain containers and refuses everything else. A top-level
    "state_dict" (PyTorch Lightning's training checkpoints, SD 1.x's .ckpt) is
    unwrapped, and its other entries (epoch, global_step...) are dropped.

    Args:
        path: the file.

    Returns:
        names to tensors, on the CPU.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: naming the file, when its extension is unknown, it is
            truncated or corrupt, its pickle holds other objects than tensors,
            or it holds anything but a dict of tensors.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if suffix == ".safetensors":
        try:
            contents = load_file(path)
        except Exception as error:
            raise ValueError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): "
                f"{error}"
            ) from None
    elif suffix in _PICKLE_SUFFIXES:
        contents = _load_pickle(path)
    else:
        raise ValueError(
            f"{path}: unknown checkpoint extension {suffix!r}; expected "
            f".safetensors or one of {', '.join(_PICKLE_SUFFIXES)}"
        )
    if isinstance(contents, Mapping) and isinstance(
        contents.get("state_dict"), Mapping
    ):
        contents = contents["state_dict"]
    if not isinstance(contents, Mapping):
        raise ValueError(
            f"{path} holds a {type(contents).__name__}, not a dict of tensors"
        )
    not_tensors = sorted(
        str(k)
        for k, v in contents.items()
        if not (isinstance(k, str) and isinstance(v, torch.Tensor))
    )
    if not_tensors:
        raise ValueError(
            f"{path} is not a dict of names to tensors:\n"
            + _listing("entries that are not named tensors", not_tensors)
        )
    return dict(contents)


def _load_pickle(path: Path) -> object:
    """torch.load(weights_only=True), with its failures said in one sentence."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} was refused: its pickle holds more than tensors and plain "
            f"containers ({_refusal(error)}), and unpickling it could run code. "
            f"Load it only if you trust its source, then save it as .safetensors."
        ) from None
    except Exception as error:
        # torch's messages run on with advice; the first sentence says what broke
        reason = " ".join(str(error).split()).split(". ")[0]
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}" + (f": {reason}" if reason else "")
        ) from None


def _refusal(error: Exception) -> str:
    """What torch's weights_only unpickler refused, without its advice (which
    includes turning the safety off)."""
    text = " ".join(str(error).split())
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it refers to {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*([^\n.]+)", str(error))
    if found:
        return found.group(1).strip()
    return "torch.load(weights_only=True) refused it"


def load_original_into(
    path: str | Path,
    unet: UNet | None = None,
    vae: AutoencoderKL | None = None,
    text_encoder: CLIPTextModel | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Loads an original single-file SD 1.x checkpoint into sdlearn's models.

    Every key and shape of every model given is checked, under the file's own
    names, before any weight is copied; the other keys of the file are skipped
    (see `split_original_checkpoint`). The text encoder's position_ids may be
    absent.

    Args:
        path: a `.safetensors` or `.ckpt` file (see `read_checkpoint_file`).
        unet: sdlearn's UNet with the file's config (`UNetConfig.sd15()`), or
            None to skip it.
        vae: sdlearn's AutoencoderKL (`VAEConfig.sd15()`), or None.
        text_encoder: sdlearn's CLIPTextModel (`CLIPTextConfig.sd15()`), or None.
        state_dict: the file's tensors if already read with
            `read_checkpoint_file` (read before building big models, so that a
            bad file fails fast); `path` then only names the file in errors.

    Raises:
        WeightsMismatchError: naming the file and, per model, every missing,
            unexpected or wrong-shaped key.
        ValueError: the file cannot be read safely (`read_checkpoint_file`).
    """
    if unet is None and vae is None and text_encoder is None:
        raise ValueError("pass at least one of unet, vae and text_encoder to load")
    if state_dict is None:
        state_dict = read_checkpoint_file(path)
    file_unet, file_vae, file_text = split_original_checkpoint(state_dict)
    # (model, the file's tensors, the tensors the model expects, from_original)
    jobs = []
    if unet is not None:
        expected = unet_to_original(unet.state_dict(), unet.config)
        jobs.append(
            (unet, file_unet, expected, lambda sd: unet_from_original(sd, unet.config))
        )
    if vae is not None:
        expected = vae_to_original(vae.state_dict(), vae.config)
        jobs.append(
            (vae, file_vae, expected, lambda sd: vae_from_original(sd, vae.config))
        )
    if text_encoder is not None:
        expected = clip_text_to_original(text_encoder.state_dict())
        if _ORIGINAL_POSITION_IDS not in file_text:
            # a buffer, not a weight; newer tools leave it out
            del expected[_ORIGINAL_POSITION_IDS]
        jobs.append((text_encoder, file_text, expected, clip_text_from_original))

    report = []
    for model, found, expected, _ in jobs:
        parts = _mismatches(expected, found)
        if parts:
            report += [f" {type(model).__name__}:", *parts]
    if report:
        raise WeightsMismatchError(
            "\n".join([f"weights from {path} do not fit sdlearn's models:", *report])
        )
    for model, found, _, from_original in jobs:
        load_checked(model, from_original(found), str(path))
