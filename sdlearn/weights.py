"""Chapter 02: loading weights safely, and the tiny models the package ships.

sdlearn names its modules like diffusers and transformers wherever that costs
nothing (`to_q`, `conv_in`, `time_embedding`), so most state dicts load as they
are. Every load checks every key and shape and names what does not fit, the way
nanoGPT's `from_pretrained` asserts every shape. Checkpoint files are read
without running code from them. The few names that differ are tables in the
modules that convert: `sdlearn.interop` (diffusers, transformers) and
`sdlearn.original_checkpoint` (SD 1.x's single files).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class WeightsMismatchError(ValueError):
    """A state dict does not fit a model; the message lists the keys that differ."""


def listing(title: str, items: list[str], limit: int = 20) -> str:
    """`title (n):` and the first `limit` items, one a line, for error messages."""
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
    parts = mismatches(model.state_dict(), state_dict)
    if parts:
        header = f"weights from {source} do not fit {type(model).__name__}:"
        raise WeightsMismatchError("\n".join([header, *parts]))


def mismatches(
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
        parts.append(listing("missing keys", missing))
    if unexpected:
        parts.append(listing("unexpected keys", unexpected))
    if wrong_shape:
        parts.append(listing("wrong-shaped keys", wrong_shape))
    return parts


def weights_digest(*models: nn.Module) -> str:
    """A short hash of models' weights (every key, dtype, shape and value, in
    order): equal digests mean identical weights. Fine-tune records keep their
    base pipeline's, so a fine-tune is never applied to another base.
    """
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


# config fields renamed since records were written: old name -> new name
RENAMED_CONFIG_FIELDS = {
    # UNetConfig's, now named like VAEConfig's and diffusers' (issue 22)
    "norm_groups": "norm_num_groups",
}


def config_from_json(values: Mapping) -> dict:
    """A config's fields read back from JSON, which turned its tuples into lists;
    fields written under an old name (`RENAMED_CONFIG_FIELDS`) get the new one."""
    return {
        RENAMED_CONFIG_FIELDS.get(k, k): tuple(v) if isinstance(v, list) else v
        for k, v in values.items()
    }


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


# --- checkpoint files, read without running their code --------------------

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
            + listing("entries that are not named tensors", not_tensors)
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


# --- until pipeline.py's loading moves out (issue 22): the names it still calls


def clip_text_to_transformers(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Moved to `sdlearn.interop.clip.clip_text_to_transformers`."""
    from sdlearn.interop.clip import clip_text_to_transformers as moved

    return moved(state_dict)


def combine_original(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> dict:
    """Moved to `sdlearn.original_checkpoint.combine_original`."""
    from sdlearn.original_checkpoint import combine_original as moved

    return moved(unet, vae, text_encoder)


def load_original_into(path: str | Path, **models_and_state_dict: object) -> None:
    """Moved to `sdlearn.single_file.load_original_into`."""
    from sdlearn.single_file import load_original_into as moved

    moved(path, **models_and_state_dict)
