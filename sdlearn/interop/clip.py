"""Chapter 03: sdlearn's CLIP text encoder <-> transformers' `CLIPTextModel`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.weights import load_checked, rename

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


def text_config_from_transformers(config: object) -> CLIPTextConfig:
    """The same shape as a transformers `CLIPTextConfig` (or any object with
    its attributes, or a text_encoder/config.json read as a dict).

    Older configs, SD 1.x's text_encoder/config.json among them, say
    eos_token_id=2; transformers then pools at the highest id of each row,
    which for CLIP's tokenizer is the first <|endoftext|>, id vocab_size - 1.
    """
    if isinstance(config, Mapping):  # a text_encoder/config.json, read
        config = SimpleNamespace(**config)
    eos_token_id = config.eos_token_id
    if eos_token_id == 2:
        eos_token_id = config.vocab_size - 1
    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act=config.hidden_act,
        eos_token_id=eos_token_id,
    )


def text_config_to_transformers(config: CLIPTextConfig) -> dict[str, Any]:
    """The keyword arguments of the equivalent transformers `CLIPTextConfig`."""
    return asdict(config)


def load_transformers_weights(
    model: CLIPTextModel,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "a transformers state dict",
) -> CLIPTextModel:
    """Load weights saved under transformers' names, every key checked.

    Takes transformers' CLIPTextModel state dict, or a checkpoint file's
    (keys under `text_model.`, with or without `embeddings.position_ids`).
    Raises `WeightsMismatchError` naming every missing, unexpected or
    wrong-shaped key.

    Returns:
        model, with the weights copied in.
    """
    return load_checked(model, clip_text_from_transformers(state_dict), source)


def text_encoder_from_transformers(model: nn.Module) -> CLIPTextModel:
    """Build the same encoder, with the same weights, from transformers'.

    Args:
        model: a `transformers.CLIPTextModel`.

    Returns:
        sdlearn's `CLIPTextModel` with its config and weights.
    """
    ours = CLIPTextModel(text_config_from_transformers(model.config))
    return load_transformers_weights(
        ours, model.state_dict(), f"transformers {type(model).__name__}"
    )


def text_encoder_to_transformers(model: CLIPTextModel) -> nn.Module:
    """`model` as a `transformers.CLIPTextModel` with the same weights.

    transformers is imported here: it is a dev dependency only.
    """
    import transformers

    config = transformers.CLIPTextConfig(**text_config_to_transformers(model.config))
    theirs = transformers.CLIPTextModel(config)
    state_dict = clip_text_to_transformers(model.state_dict())
    load_checked(theirs, state_dict, f"sdlearn {type(model).__name__}")
    return theirs.eval()
