"""Shared test helpers: reference tensors and optional live libraries."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def load_reference(name: str) -> dict[str, torch.Tensor]:
    """The tensors tools/make_reference.py saved as tests/reference/NAME.safetensors."""
    path = REFERENCE_DIR / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; run `python tools/make_reference.py {name}`"
        )
    return load_file(path)


def reference_versions(name: str) -> dict[str, str]:
    """The library versions recorded when NAME's reference tensors were made."""
    return json.loads((REFERENCE_DIR / "VERSIONS.json").read_text())[name]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# Live comparisons run where the reference library is installed (it is in `dev`).
needs_diffusers = pytest.mark.skipif(not has("diffusers"), reason="needs diffusers")
needs_transformers = pytest.mark.skipif(
    not has("transformers"), reason="needs transformers"
)
