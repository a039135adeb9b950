"""All weight-name mapping in one place, and the checks that make loading safe.

sdlearn names its modules like diffusers and transformers wherever that costs
nothing (`to_q`, `conv_in`, `time_embedding`), so most state dicts load as they
are. The few differences are tables in this module, applied key by key; every
load checks every key and shape and names what does not fit, the way nanoGPT's
`from_pretrained` asserts every shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


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
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{key}: got {tuple(state_dict[key].shape)}, "
        f"expected {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or wrong_shape:
        parts = [f"weights from {source} do not fit {type(model).__name__}:"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if wrong_shape:
            parts.append(_listing("wrong-shaped keys", wrong_shape))
        raise WeightsMismatchError("\n".join(parts))


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
