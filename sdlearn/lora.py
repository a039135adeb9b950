"""LoRA: low-rank adapters that fine-tune a big linear layer through a small one.

Hu et al. 2021 ("LoRA: Low-Rank Adaptation of Large Language Models") freeze a
pretrained weight W (out x in) and learn its change as a product of two thin
matrices, W + (alpha / r) B A with A (r x in) and B (out x r), r much smaller
than in and out:

    y = W x + (alpha / r) B (A x).

B starts at zero, so the adapted model starts out exactly as the base model; A
starts random, so the gradient reaches B at once. Only A and B train: for one
of Stable Diffusion 1.5's 320-wide attention projections at rank 4 that is
2 * 4 * 320 = 2,560 numbers instead of 102,400. After training, B A can be added
into W (merge): the adapter then costs nothing at inference.

`add_lora` wraps the attention projections of any sdlearn model (the UNet's
`to_q`, `to_k`, `to_v`, `to_out.0` by default) in `LoRALinear`; `save_lora`
writes the adapters as a small .safetensors file with the key names diffusers'
`load_lora_weights` reads ("unet.<module>.lora_A.weight", "...lora_B.weight"),
and `load_lora` puts them back into a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# the UNet's attention projections, by their names in diffusers' UNet
ATTENTION_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (alpha / r) B A.

    Args:
        base: the layer to adapt; its weights are frozen, not copied.
        rank: r, the inner width of the update.
        alpha: the update's scale is alpha / rank (default: alpha = rank, 1).

    The attribute `multiplier` (default 1) scales the update at inference
    (`--lora-scale`): 0 gives the base model, 1 the trained adapter.
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA adapts nn.Linear layers, got {type(base).__name__}")
        if not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(
                f"rank must be between 1 and min(in, out) = "
                f"{min(base.in_features, base.out_features)}, got {rank}"
            )
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.multiplier = 1.0
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        # A as nn.Linear's own initialisation, B zero: the update starts at 0
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        base.requires_grad_(False)
        self._unmerged_weight: torch.Tensor | None = None

    @property
    def scale(self) -> float:
        """alpha / rank times the inference multiplier."""
        return self.alpha / self.rank * self.multiplier

    @property
    def merged(self) -> bool:
        """Whether B A is added into the base weight right now."""
        return self._unmerged_weight is not None

    def delta_weight(self) -> torch.Tensor:
        """(out, in) the update scale * B A that merging adds to the weight."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out)
        if self.merged or self.multiplier == 0:
            return out
        return out + self.scale * self.lora_B(self.lora_A(x))  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight: the same outputs, one matmul."""
        if self.merged:
            raise ValueError("this adapter is merged already")
        self._unmerged_weight = self.base.weight.detach().clone()
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the base weight back exactly (a copy, not a subtraction, which
        float rounding would make inexact)."""
        if not self.merged:
            raise ValueError("this adapter is not merged")
        self.base.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, multiplier={self.multiplier:g}"


def add_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    targets: Iterable[str] = ATTENTION_TARGETS,
) -> dict[str, LoRALinear]:
    """Wrap every `nn.Linear` of `model` whose name ends with one of `targets`.

    Freezes every parameter of `model` first, so that only the adapters train.

    Args:
        model: e.g. a `UNet`.
        rank, alpha: as for `LoRALinear`.
        targets: name endings, e.g. "to_q" or "to_out.0".

    Returns:
        {module name: adapter}, in the model's order.
    """
    targets = tuple(targets)
    model.requires_grad_(False)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not names:
        raise ValueError(f"no nn.Linear of the model is named like {targets}")
    adapters = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = LoRALinear(parent.get_submodule(child), rank, alpha)
        # setattr also replaces item "0" of a ModuleList such as to_out
        setattr(parent, child, adapter)
        adapters[name] = adapter
    return adapters


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, adapter) for every `LoRALinear` in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def set_lora_scale(model: nn.Module, multiplier: float) -> None:
    """Scale every adapter's update at inference (0: off, 1: as trained)."""
    for _, adapter in lora_layers(model):
        if adapter.merged:
            raise ValueError("unmerge the adapters before changing their scale")
        adapter.multiplier = multiplier


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter of `model` into its base weight."""
    for _, adapter in lora_layers(model):
        adapter.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`, restoring the base weights exactly."""
    for _, adapter in lora_layers(model):
        adapter.unmerge()


def lora_state_dict(model: nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The adapters' weights under diffusers' LoRA key names.

    The scale alpha / rank is folded into lora_B, so that a reader that
    assumes alpha = rank (diffusers, when no alpha is stored) computes the
    same update B A.

    Returns:
        {"<prefix>.<module>.lora_A.weight": (r, in), "...lora_B.weight": (out, r)}.
    """
    state = {}
    for name, adapter in lora_layers(model):
        key = f"{prefix}.{name}" if prefix else name
        state[f"{key}.lora_A.weight"] = adapter.lora_A.weight.detach().clone()
        scaled = adapter.lora_B.weight.detach() * (adapter.alpha / adapter.rank)
        state[f"{key}.lora_B.weight"] = scaled.contiguous()
    if not state:
        raise ValueError("the model has no LoRA adapters; call add_lora first")
    return state


def save_lora(model: nn.Module, path: str | Path, prefix: str = "unet") -> Path:
    """Write the adapters to a .safetensors file diffusers' `load_lora_weights`
    reads; the ranks and targets go into its metadata.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model, prefix)
    ranks = sorted({adapter.rank for _, adapter in lora_layers(model)})
    metadata = {"format": "pt", "sdlearn_lora": json.dumps({"ranks": ranks})}
    save_file(state, str(path), metadata=metadata)
    return path


def load_lora(
    model: nn.Module,
    path: str | Path | dict[str, torch.Tensor],
    prefix: str = "unet",
    multiplier: float = 1.0,
) -> dict[str, LoRALinear]:
    """Add the adapters of a LoRA file (or state dict) to `model`.

    Reads the "<prefix>.<module>.lora_A/lora_B.weight" layout that `save_lora`
    and diffusers write; the rank comes from the shapes, alpha = rank (the
    scale is folded into lora_B).

    Args:
        model: the base model, without adapters on those layers yet.
        path: the .safetensors file, or its state dict.
        prefix: the model's prefix in the keys ("unet").
        multiplier: the inference scale (`--lora-scale`).

    Returns:
        {module name: adapter}.

    Raises:
        ValueError: naming the file and the keys that do not fit the model.
    """
    where = "the state dict" if isinstance(path, dict) else str(path)
    state = path if isinstance(path, dict) else load_file(str(path))
    start = f"{prefix}." if prefix else ""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(start) or not key.endswith(".weight"):
            continue
        name, part = key[len(start) : -len(".weight")].rsplit(".", 1)
        if part not in ("lora_A", "lora_B"):
            raise ValueError(f"{where}: {key} is not a lora_A/lora_B weight")
        pairs.setdefault(name, {})[part] = value
    if not pairs:
        raise ValueError(f"{where} has no '{start}<module>.lora_A.weight' keys")
    incomplete = sorted(n for n, p in pairs.items() if len(p) != 2)
    modules = dict(model.named_modules())
    unknown = sorted(n for n in pairs if not isinstance(modules.get(n), nn.Linear))
    if incomplete or unknown:
        raise ValueError(
            f"{where} does not fit the model: lora_A or lora_B missing for "
            f"{incomplete[:5]}, no nn.Linear named {unknown[:5]}"
        )
    adapters = {}
    for name, pair in pairs.items():
        A, B = pair["lora_A"], pair["lora_B"]  # (r, in), (out, r)
        base = modules[name]
        if A.shape[1] != base.in_features or B.shape != (base.out_features, A.shape[0]):
            raise ValueError(
                f"{where}: {name} has lora_A {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)}, expected (r, {base.in_features}) and "
                f"({base.out_features}, r)"
            )
        adapters.update(add_lora(model, rank=A.shape[0], targets=[name]))
        adapter = adapters[name]
        with torch.no_grad():
            adapter.lora_A.weight.copy_(A)
            adapter.lora_B.weight.copy_(B)
        adapter.multiplier = multiplier
    return adapters
