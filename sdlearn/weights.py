"""All weight-name mapping in one place, and the checks that make loading safe.

sdlearn names its modules like diffusers and transformers wherever that costs
nothing (`to_q`, `conv_in`, `time_embedding`), so most state dicts load as they
are. The few differences are tables in this module, applied key by key; every
load checks every key and shape and names what does not fit, the way nanoGPT's
`from_pretrained` asserts every shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
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
