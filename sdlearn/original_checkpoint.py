"""Chapter 06: Stable Diffusion 1.x's original single-file layout, key by key.

Stable Diffusion 1.x was released as one file (v1-5-pruned-emaonly.ckpt, and
later .safetensors) holding the state dict of CompVis/latent-diffusion's
`LatentDiffusion`: the UNet under `model.diffusion_model.`, the autoencoder
under `first_stage_model.`, the text encoder under `cond_stage_model.`. Most
fine-tunes on the web still use that layout. The UNet and the VAE there have
the latent-diffusion code's own module names; the tables below translate them,
and their block numbers are derived from the config, so they fit any UNet or
VAE sdlearn builds, not only SD 1.5's. The ground truth is diffusers'
converter (`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`);
tests/test_original_checkpoint.py runs it on what these functions write.

Reading and writing such files: `sdlearn.single_file`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdlearn.clip import CLIPTextModel
from sdlearn.interop.clip import clip_text_from_transformers, clip_text_to_transformers
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig
from sdlearn.weights import WeightsMismatchError, listing

ORIGINAL_UNET_PREFIX = "model.diffusion_model."
ORIGINAL_VAE_PREFIX = "first_stage_model."
# the text encoder is a transformers CLIPTextModel, as transformers 4 saved it
ORIGINAL_TEXT_PREFIX = "cond_stage_model.transformer."
ORIGINAL_TEXT_MODEL = ORIGINAL_TEXT_PREFIX + "text_model."
ORIGINAL_POSITION_IDS = ORIGINAL_TEXT_MODEL + "embeddings.position_ids"

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
    # (sdlearn prefix, original prefix, is a ResnetBlock)
    blocks: list[tuple[str, str, bool]] = [
        # time_embed = Sequential(Linear, SiLU, Linear)
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
    ]

    # 1. down: input_blocks.1 onwards
    blocks += _down_blocks(config)

    # 2. middle: ResBlock, SpatialTransformer, ResBlock
    blocks += [
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]

    # 3. up, coarsest level first, one more layer per level than on the way down
    blocks += _up_blocks(config)

    # 4. out = Sequential(GroupNorm, SiLU, conv)
    blocks += [("conv_norm_out.", "out.0.", False), ("conv_out.", "out.2.", False)]
    return _expand(blocks, UNET_RESNET_TO_ORIGINAL, ORIGINAL_UNET_PREFIX)


def _down_blocks(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """The way down's entries of `unet_original_table`: input_blocks.1 onwards."""
    levels, layers = len(config.block_out_channels), config.layers_per_block
    blocks = []
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
    return blocks


def _up_blocks(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """The way up's entries of `unet_original_table`, coarsest level first."""
    levels, layers = len(config.block_out_channels), config.layers_per_block
    blocks = []
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
    return blocks


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
            + listing("unplaced keys", sorted(unplaced))
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
        ORIGINAL_TEXT_MODEL + key: value
        for key, value in clip_text_to_transformers(state_dict).items()
    }
    positions = state_dict["embeddings.position_embedding.weight"]
    original[ORIGINAL_POSITION_IDS] = torch.arange(
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
            f"under {ORIGINAL_TEXT_PREFIX}):\n" + listing("unplaced keys", outside)
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
    rest listed at the top of sdlearn/original_checkpoint.py. Text encoders saved
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
            if not key.startswith(ORIGINAL_TEXT_MODEL):
                key = ORIGINAL_TEXT_MODEL + key.removeprefix(ORIGINAL_TEXT_PREFIX)
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
