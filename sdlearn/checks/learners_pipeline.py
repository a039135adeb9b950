"""The learner's own Stable Diffusion, for the end of chapter 06.

`use_learners_parts` puts the learner's kept answers of chapters 01 to 06 into
one pipeline with the shipped weights: its tokenizer, every attention layer and
MLP of the text encoder, the group norms, ResnetBlocks, down- and upsamplers of
the VAE and the UNet, the VAE's attention, decoder, encode and decode, every
block of the UNet, the DDPM scheduler's tables, timesteps and step, and the loop
that draws become the learner's code. A part that is kept and still passes its check is
the learner's; any other stays the package's, and the table it prints says
which.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import types
from collections.abc import Callable

from torch import nn

from sdlearn import tokenizer
from sdlearn.attention import Attention
from sdlearn.blocks import Downsample, ResnetBlock, Upsample
from sdlearn.checks import Verdict, answers
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.checks.pipeline import check_generate, reference_generate
from sdlearn.checks.pixel_ddpm import install_scheduler_parts
from sdlearn.clip import CLIPMLP, CLIPEncoderLayer
from sdlearn.pipeline import StableDiffusionPipeline
from sdlearn.schedulers import common
from sdlearn.schedulers.ddpm import DDPMScheduler
from sdlearn.spatial_transformer import (
    GEGLU,
    FeedForward,
    SpatialTransformer,
    TransformerBlock,
)
from sdlearn.unet import DownBlock, MidBlock, TimestepEmbedding, UNet, UpBlock
from sdlearn.vae import AttentionBlock, AutoencoderKL, Decoder

# part -> (what it is, the chapter, the check that holds it to the package's, as
# "module:function" of sdlearn.checks, called with the part alone)
LEARNERS_PARTS: dict[str, tuple[str, str, str]] = {
    "tokenizer:bytes_to_unicode": (
        "the tokenizer's byte table",
        "03",
        "clip:check_bytes_to_unicode",
    ),
    "tokenizer:CLIPTokenizer.tokenize": (
        "the tokenizer: text to tokens",
        "03",
        "clip:check_tokenize",
    ),
    "tokenizer:bpe": ("the BPE merge loop", "03", "clip:check_bpe"),
    "tokenizer:CLIPTokenizer.encode_batch": (
        "the (B, 77) layout of the ids",
        "03",
        "clip:check_encode_batch",
    ),
    "attention:Attention.forward": (
        "every attention layer",
        "01",
        "attention:check_attention_forward",
    ),
    "clip:CLIPMLP.forward": ("the text encoder's MLPs", "03", "contrastive:check_mlp"),
    "clip:CLIPEncoderLayer.forward": (
        "the text encoder's layers",
        "03",
        "clip:check_encoder_layer",
    ),
    "blocks:GroupNorm.forward": (
        "every group norm of the VAE and the UNet",
        "02",
        "vae_blocks:check_group_norm_forward",
    ),
    "blocks:ResnetBlock.forward": (
        "the ResnetBlocks of the VAE and the UNet",
        "02",
        "vae:check_resnet_forward",
    ),
    "blocks:Downsample.forward": (
        "the downsamplers of the VAE and the UNet",
        "02",
        "vae_blocks:check_downsample_forward",
    ),
    "blocks:Upsample.forward": (
        "the upsamplers of the VAE and the UNet",
        "02",
        "vae_blocks:check_upsample_forward",
    ),
    "vae:AttentionBlock.forward": (
        "the VAE's attention over pixels",
        "02",
        "vae_blocks:check_attention_block_forward",
    ),
    "vae:Decoder.forward": ("the VAE's decoder", "02", "vae:check_decoder_forward"),
    "vae:AutoencoderKL.encode": ("the VAE's encode", "02", "vae_model:check_encode"),
    "vae:AutoencoderKL.decode": ("the VAE's decode", "02", "vae_model:check_decode"),
    "unet:TimestepEmbedding.forward": (
        "the UNet's time MLP",
        "04",
        "unet:check_time_mlp_forward",
    ),
    "spatial_transformer:GEGLU.forward": (
        "the GEGLU of the feed-forwards",
        "04",
        "spatial_transformer:check_geglu_forward",
    ),
    "spatial_transformer:FeedForward.forward": (
        "the transformer blocks' feed-forwards",
        "04",
        "spatial_transformer:check_feed_forward",
    ),
    "spatial_transformer:TransformerBlock.forward": (
        "the UNet's transformer blocks",
        "04",
        "unet:check_transformer_block_forward",
    ),
    "spatial_transformer:SpatialTransformer.forward": (
        "the spatial transformers",
        "04",
        "spatial_transformer:check_spatial_transformer_forward",
    ),
    "unet:DownBlock.forward": (
        "the UNet's down blocks",
        "04",
        "unet_blocks:check_down_block_forward",
    ),
    "unet:MidBlock.forward": (
        "the UNet's mid block",
        "04",
        "unet_blocks:check_mid_block_forward",
    ),
    "unet:UpBlock.forward": (
        "the UNet's up blocks",
        "04",
        "unet_blocks:check_up_block_forward",
    ),
    "unet:UNet.forward": (
        "the UNet's forward, with its skips",
        "04",
        "unet:check_unet_forward",
    ),
    "schedule:make_betas": ("the noise schedule", "05", "schedule:check_make_betas"),
    "schedule:make_alphas_cumprod": (
        "the cumulative alphas",
        "05",
        "schedule:check_make_alphas_cumprod",
    ),
    "schedule:spaced_timesteps": (
        "the timesteps a sampler visits",
        "05",
        "schedule:check_spaced_timesteps",
    ),
    "ddpm:DDPMScheduler.previous_timestep": (
        "the timestep before",
        "05",
        "ddpm:check_previous_timestep",
    ),
    "ddpm:DDPMScheduler.step": ("the DDPM step", "05", "ddpm:check_ddpm_step"),
    # checked on the pipeline it draws with (see use_learners_parts)
    "pipeline:generate": ("the sampling loop, with guidance", "06", ""),
}

# answers.use's notice for a part with no kept answer, which the table repeats
NOT_KEPT = "no answer of yours is kept"
# the forwards a part replaces in a pipeline, and in which of its models
_PACKAGE_FORWARDS = {
    "attention:Attention.forward": (Attention, ("text_encoder", "vae", "unet")),
    "clip:CLIPMLP.forward": (CLIPMLP, ("text_encoder",)),
    "clip:CLIPEncoderLayer.forward": (CLIPEncoderLayer, ("text_encoder",)),
    "blocks:GroupNorm.forward": (nn.GroupNorm, ("vae", "unet")),
    "blocks:ResnetBlock.forward": (ResnetBlock, ("vae", "unet")),
    "blocks:Downsample.forward": (Downsample, ("vae", "unet")),
    "blocks:Upsample.forward": (Upsample, ("vae", "unet")),
    "vae:AttentionBlock.forward": (AttentionBlock, ("vae",)),
    "vae:Decoder.forward": (Decoder, ("vae",)),
    "unet:TimestepEmbedding.forward": (TimestepEmbedding, ("unet",)),
    "spatial_transformer:GEGLU.forward": (GEGLU, ("unet",)),
    "spatial_transformer:FeedForward.forward": (FeedForward, ("unet",)),
    "spatial_transformer:TransformerBlock.forward": (TransformerBlock, ("unet",)),
    "spatial_transformer:SpatialTransformer.forward": (SpatialTransformer, ("unet",)),
    "unet:DownBlock.forward": (DownBlock, ("unet",)),
    "unet:MidBlock.forward": (MidBlock, ("unet",)),
    "unet:UpBlock.forward": (UpBlock, ("unet",)),
    "unet:UNet.forward": (UNet, ("unet",)),
}
# methods of the VAE that are not its forward
_VAE_METHODS = {
    "vae:AutoencoderKL.encode": AutoencoderKL.encode,
    "vae:AutoencoderKL.decode": AutoencoderKL.decode,
}
# the tokenizer's parts: functions it holds, or methods of its own
_TOKENIZER_PARTS = {
    "tokenizer:bytes_to_unicode": tokenizer.bytes_to_unicode,
    "tokenizer:bpe": tokenizer.bpe,
    "tokenizer:CLIPTokenizer.tokenize": tokenizer.CLIPTokenizer.tokenize,
    "tokenizer:CLIPTokenizer.encode_batch": tokenizer.CLIPTokenizer.encode_batch,
}
_SCHEDULER_PARTS = {
    "schedule:make_betas": common.make_betas,
    "schedule:make_alphas_cumprod": common.make_alphas_cumprod,
    "schedule:spaced_timesteps": common.spaced_timesteps,
    "ddpm:DDPMScheduler.previous_timestep": DDPMScheduler.previous_timestep,
    "ddpm:DDPMScheduler.step": DDPMScheduler.step,
}


def _check_function(name: str) -> Callable | None:
    """The check `module:function` of sdlearn.checks, or None if there is none."""
    if not name:
        return None
    module, function = name.split(":")
    try:
        return getattr(importlib.import_module(f"sdlearn.checks.{module}"), function)
    except (ImportError, AttributeError):
        return None


def _install_in_tokenizer(pipe: StableDiffusionPipeline, part: str, code: Callable):
    """The learner's tokenizer part in this pipeline's tokenizer only."""
    tok = pipe.tokenizer
    if part == "tokenizer:bytes_to_unicode":
        tok.byte_encoder = code()
    elif part == "tokenizer:bpe":
        tok.merge_word = code
    else:  # a method: bound to this tokenizer
        method = part.rpartition(".")[2]
        setattr(tok, method, types.MethodType(code, tok))
    tok.cache.clear()


def use_learners_parts(pipe: StableDiffusionPipeline) -> Callable:
    """Run the learner's kept answers in `pipe`, in place of the package's code,
    and print which parts are whose.

    Every part that is kept and still passes its check replaces the package's
    in this pipeline only (the package's classes are not touched); the others
    stay the package's, each with a one-line notice.

    Returns:
        the loop to draw with: the learner's `generate` or the package's.

    Raises:
        ValueError: the learner kept scheduler parts and `pipe` does not sample
            with a DDPMScheduler.
    """
    fallbacks: dict[str, Callable] = {
        "pipeline:generate": reference_generate,
        **_TOKENIZER_PARTS,
        **_SCHEDULER_PARTS,
        **_VAE_METHODS,
        **{part: cls.forward for part, (cls, _) in _PACKAGE_FORWARDS.items()},
    }

    def check_loop(fn: Callable) -> Verdict:
        return check_generate(fn, pipe)

    mine, loop, scheduler_parts = {}, reference_generate, {}
    for part, (_, _, check_name) in LEARNERS_PARTS.items():
        recheck = check_loop if part == "pipeline:generate" else None
        with contextlib.redirect_stdout(io.StringIO()) as said:
            code = answers.use(
                part, fallbacks[part], recheck or _check_function(check_name)
            )
        # the table says whose each part is; a kept one that fails now says why
        for line in said.getvalue().splitlines():
            if NOT_KEPT not in line and not line.startswith(answers.YOURS):
                print(line)
        mine[part] = answers.is_learners(code)
        if not mine[part]:
            continue
        if part in _TOKENIZER_PARTS:
            _install_in_tokenizer(pipe, part, code)
        elif part in _SCHEDULER_PARTS:
            scheduler_parts[part] = code
        elif part in _VAE_METHODS:
            method = part.rpartition(".")[2]
            setattr(pipe.vae, method, types.MethodType(code, pipe.vae))
        elif part == "pipeline:generate":
            loop = code
        else:
            cls, models = _PACKAGE_FORWARDS[part]
            for model in models:
                answers.install_forward(getattr(pipe, model), cls, code)
    if scheduler_parts:
        if type(pipe.scheduler) is not DDPMScheduler:
            raise ValueError(
                f"your scheduler parts run a DDPMScheduler, this pipeline has "
                f"{type(pipe.scheduler).__name__}"
            )
        install_scheduler_parts(pipe.scheduler, scheduler_parts)
    print(f"{'part':<42} {'chapter':>7}  whose")
    for part, (what, chapter, _) in LEARNERS_PARTS.items():
        print(f"{what:<42} {chapter:>7}  {'yours' if mine[part] else 'the package'}")
    print(f"{sum(mine.values())} of {len(mine)} parts are yours")
    return loop
