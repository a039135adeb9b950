"""Chapter 06: reading and writing Stable Diffusion 1.x's single-file checkpoints.

One `.safetensors` (or `.ckpt`) file holds the UNet, the autoencoder and the text
encoder under the original layout's names (`sdlearn.original_checkpoint`).
Loading checks every key and shape of every model before it copies a weight;
saving writes safetensors only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdlearn.clip import CLIPTextModel
from sdlearn.original_checkpoint import (
    ORIGINAL_POSITION_IDS,
    clip_text_from_original,
    clip_text_to_original,
    combine_original,
    split_original_checkpoint,
    unet_from_original,
    unet_to_original,
    vae_from_original,
    vae_to_original,
)
from sdlearn.unet import UNet
from sdlearn.vae import AutoencoderKL
from sdlearn.weights import (
    WeightsMismatchError,
    load_checked,
    mismatches,
    read_checkpoint_file,
)


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
        if ORIGINAL_POSITION_IDS not in file_text:
            # a buffer, not a weight; newer tools leave it out
            del expected[ORIGINAL_POSITION_IDS]
        jobs.append((text_encoder, file_text, expected, clip_text_from_original))

    report = []
    for model, found, expected, _ in jobs:
        parts = mismatches(expected, found)
        if parts:
            report += [f" {type(model).__name__}:", *parts]
    if report:
        raise WeightsMismatchError(
            "\n".join([f"weights from {path} do not fit sdlearn's models:", *report])
        )
    for model, found, _, from_original in jobs:
        load_checked(model, from_original(found), str(path))
