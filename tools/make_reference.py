"""Regenerate the reference tensors in tests/reference/ from the real libraries.

Each module tools/reference/NAME.py defines `make() -> dict[str, torch.Tensor]`,
built with diffusers, transformers or torch itself; this script saves it as
tests/reference/NAME.safetensors and records the library versions that made it
in tests/reference/VERSIONS.json.

Usage:
    python tools/make_reference.py            # every reference set
    python tools/make_reference.py attention  # only some
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "reference"
SOURCES = Path(__file__).resolve().parent / "reference"


def library_versions() -> dict[str, str]:
    """The versions of the libraries that reference tensors may come from."""
    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "diffusers", "transformers", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def available() -> list[str]:
    return sorted(p.stem for p in SOURCES.glob("*.py") if not p.stem.startswith("_"))


def build(name: str) -> dict[str, torch.Tensor]:
    """The tensors of one reference set, made with the installed libraries."""
    sys.path.insert(0, str(SOURCES.parent))
    module = importlib.import_module(f"reference.{name}")
    torch.manual_seed(0)  # only for libraries that draw from the global generator
    tensors = module.make()
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def make(name: str) -> Path:
    """Build one reference set and save it; returns the file written."""
    tensors = build(name)
    versions = library_versions()
    path = OUT / f"{name}.safetensors"
    # versions go to VERSIONS.json only: safetensors writes metadata in no fixed
    # order, and a regenerated file should be byte-identical when nothing changed
    save_file(tensors, path)
    record = OUT / "VERSIONS.json"
    table = json.loads(record.read_text()) if record.exists() else {}
    table[name] = versions
    record.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"any of {available()}")
    args = parser.parse_args()
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown reference sets {unknown}; expected any of {available()}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = make(name)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
