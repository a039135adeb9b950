"""What moves when the project meets newer libraries.

`make latest` installs the newest versions that pyproject.toml's ranges allow
into .venv-latest and runs this script there, then the tests and the notebooks.
It reports:

1. every installed package whose version differs from constraints.txt (the
   versions `make setup` installs and the stored results were made with);
2. for every reference set in tools/reference/, whether the tensors the newer
   libraries make still equal the stored tests/reference/NAME.safetensors at
   float32 tolerance, and by how much each one moved if not.

Nothing in the repository is written. To move the project to the new versions:
update constraints.txt (`pip freeze --exclude-editable`), `make reference` for
the sets that moved, `make execute` for the notebooks whose outputs moved.

Usage:
    python tools/check_latest.py
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_reference import OUT, ROOT, available, build  # noqa: E402


def pinned(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """The package -> version table of a constraints file."""
    table = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            table[normalize(name)] = version
    return table


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def moved_versions() -> list[str]:
    """'name: pinned -> installed' for every package that differs."""
    lines = []
    for name, version in sorted(pinned().items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        if installed.split("+")[0] != version:
            lines.append(f"{name}: {version} -> {installed}")
    return lines


def moved_tensors(name: str) -> list[str]:
    """The tensors of reference set NAME that the installed libraries change."""
    stored = load_file(OUT / f"{name}.safetensors")
    fresh = build(name)
    lines = []
    for key in sorted(set(stored) | set(fresh)):
        if key not in fresh or key not in stored:
            lines.append(
                f"{name}/{key}: only in the {'new' if key in fresh else 'stored'} set"
            )
            continue
        old, new = stored[key], fresh[key]
        if old.shape != new.shape or old.dtype != new.dtype:
            lines.append(
                f"{name}/{key}: {tuple(old.shape)} {old.dtype} -> "
                f"{tuple(new.shape)} {new.dtype}"
            )
            continue
        try:
            torch.testing.assert_close(new, old)
        except AssertionError:
            change = (new.double() - old.double()).abs().max().item()
            lines.append(f"{name}/{key}: max abs change {change:.3g}")
    return lines


def main() -> int:
    versions = moved_versions()
    print("packages that differ from constraints.txt:")
    print("\n".join(f"  {line}" for line in versions) or "  none")
    tensors = []
    for name in available():
        tensors += moved_tensors(name)
    print("reference tensors the installed libraries change (float32 tolerance):")
    print("\n".join(f"  {line}" for line in tensors) or "  none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
