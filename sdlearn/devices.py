"""Where a model runs and in which precision: one check for every entry point.

`sdlearn generate|evaluate|train --device --dtype` and
`StableDiffusionPipeline.to(device, dtype)` all come through here, so a device
that is not there or a precision the device runs badly is refused the same way,
naming what was asked and what exists.
"""

from __future__ import annotations

import torch

# --dtype's choices
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def available_devices() -> list[str]:
    """The device types this machine's torch can run on, best first."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if torch.backends.mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """cuda if there is a GPU, else mps on Apple silicon, else cpu; or `name`,
    checked: a device this machine lacks raises ValueError naming those it has."""
    if str(name) == "auto":
        return torch.device(available_devices()[0])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"unknown device {name!r}; expected auto or one of {available_devices()}"
        ) from None
    if device.type not in available_devices():
        raise ValueError(
            f"device {device.type} was asked for, but this machine has only "
            f"{', '.join(available_devices())}"
        )
    return device


def pick_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype for `name` on `device`, checked: float16 on a CPU is
    refused (most CPUs have no float16 arithmetic and emulate it slowly;
    bfloat16 is the CPU's half precision)."""
    dtype = DTYPES.get(name) if isinstance(name, str) else name
    if dtype not in DTYPES.values():
        raise ValueError(f"unknown dtype {name!r}; expected one of {list(DTYPES)}")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError(
            "float16 on a CPU is slow or unsupported; use bfloat16 (or float32) "
            "on a CPU, float16 on cuda or mps"
        )
    return dtype
