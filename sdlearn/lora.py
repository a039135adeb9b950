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
`to_q`, `to_k`, `to_v`, `to_out.0` by default) in `LoRALinear`, and convolutions
named in its targets (the ResnetBlocks' `conv1`, `conv2`) in `LoRAConv2d`, whose
A is a convolution of the base's kernel into r channels and B a 1x1 one (as
peft and diffusers do it); `save_lora` writes the adapters as a small
.safetensors file with the key names diffusers' `load_lora_weights` reads
("unet.<module>.lora_A.weight", "...lora_B.weight"), and `load_lora` puts them
back into a model.
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

# the 3x3 convolutions of the UNet's ResnetBlocks, where shapes are drawn
RESNET_CONV_TARGETS: tuple[str, ...] = ("conv1", "conv2")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (alpha / r) B A.

    Args:
        base: the layer to adapt; its weights are frozen, not copied.
        rank: r, the inner width of the update.
        alpha: the update's scale is alpha / rank (default: alpha = rank, 1).

    The attribute `multiplier` (default 1) scales the update at inference
    (`--lora-scale`): 0 gives the base model, 1 the trained adapter.
    """

    adapts: type[nn.Module] = nn.Linear  # the kind of layer it wraps

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None):
        super().__init__()
        self._check_base(base, rank)
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.multiplier = 1.0
        self.lora_A, self.lora_B = self.factors(base, rank)
        # A as the layer's own initialisation, B zero: the update starts at 0
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        base.requires_grad_(False)
        self._unmerged_weight: torch.Tensor | None = None

    @classmethod
    def _check_base(cls, base: nn.Module, rank: int) -> None:
        """Raises a ValueError unless this adapter can wrap `base` at `rank`."""
        if not isinstance(base, cls.adapts):
            raise ValueError(
                f"{cls.__name__} adapts {cls.adapts.__name__} layers, "
                f"got {type(base).__name__}"
            )
        n_in, n_out = base.weight.shape[1], base.weight.shape[0]
        if not 1 <= rank <= min(n_in, n_out):
            raise ValueError(
                f"rank must be between 1 and min(in, out) = {min(n_in, n_out)}, "
                f"got {rank}"
            )

    @staticmethod
    def factors(base: nn.Linear, rank: int) -> tuple[nn.Module, nn.Module]:
        """A (in -> r) and B (r -> out), on the base weight's device and dtype."""
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        A = nn.Linear(base.in_features, rank, bias=False, **factory)
        B = nn.Linear(rank, base.out_features, bias=False, **factory)
        return A, B

    @property
    def scale(self) -> float:
        """alpha / rank times the inference multiplier."""
        return self.alpha / self.rank * self.multiplier

    @property
    def merged(self) -> bool:
        """Whether B A is added into the base weight right now."""
        return self._unmerged_weight is not None

    def delta_weight(self) -> torch.Tensor:
        """The update scale * B A that merging adds to the weight, its shape."""
        B = self.lora_B.weight.flatten(1)  # (out, r)
        A = self.lora_A.weight.flatten(1)  # (r, in), or (r, in * k * k) for a conv
        return self.scale * (B @ A).view_as(self.base.weight)

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


class LoRAConv2d(LoRALinear):
    """A frozen `nn.Conv2d` plus a trainable low-rank update (alpha / r) B A.

    A convolution is a linear map of each (in, k, k) patch, so its LoRA is the
    same idea: A is a convolution with the base's kernel, stride and padding
    into r channels, B a 1x1 convolution from r to out channels; merged, B A is
    an (out, in, k, k) kernel added to the base's. Args as for `LoRALinear`.
    """

    adapts = nn.Conv2d

    @staticmethod
    def factors(base: nn.Conv2d, rank: int) -> tuple[nn.Module, nn.Module]:
        """A (in -> r, the base's kernel) and B (r -> out, 1x1)."""
        if base.groups != 1:
            raise ValueError(f"LoRA adapts ungrouped convolutions, got {base}")
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        A = nn.Conv2d(
            base.in_channels,
            rank,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
            **factory,
        )
        B = nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)
        return A, B


# which adapter wraps which kind of layer
_ADAPTERS: dict[type[nn.Module], type[LoRALinear]] = {
    nn.Linear: LoRALinear,
    nn.Conv2d: LoRAConv2d,
}


def add_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    targets: Iterable[str] = ATTENTION_TARGETS,
) -> dict[str, LoRALinear]:
    """Wrap every `nn.Linear` (in a `LoRALinear`) and `nn.Conv2d` (in a
    `LoRAConv2d`) of `model` whose name ends with one of `targets`.

    Freezes every parameter of `model` first, so that only the adapters train.

    Args:
        model: e.g. a `UNet`.
        rank, alpha: as for `LoRALinear`.
        targets: name endings, e.g. "to_q", "to_out.0" or "conv1".

    Returns:
        {module name: adapter}, in the model's order.
    """
    targets = tuple(targets)
    model.requires_grad_(False)
    names = [
        name
        for name, module in model.named_modules()
        if type(module) in _ADAPTERS
        and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not names:
        raise ValueError(
            f"no nn.Linear or nn.Conv2d of the model is named like {targets}"
        )
    adapters = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = parent.get_submodule(child)
        adapter = _ADAPTERS[type(base)](base, rank, alpha)
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
        {"<prefix>.<module>.lora_A.weight": (r, in), "...lora_B.weight": (out, r)};
        for a convolution (r, in, k, k) and (out, r, 1, 1).
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
    unknown = sorted(n for n in pairs if type(modules.get(n)) not in _ADAPTERS)
    if incomplete or unknown:
        raise ValueError(
            f"{where} does not fit the model: lora_A or lora_B missing for "
            f"{incomplete[:5]}, no nn.Linear or nn.Conv2d named {unknown[:5]}"
        )
    adapters = {}
    for name, pair in pairs.items():
        A, B = pair["lora_A"], pair["lora_B"]  # (r, in[, k, k]), (out, r[, 1, 1])
        base = modules[name]
        n_out, n_in, *kernel = base.weight.shape  # kernel: [k, k] for a conv
        ones = [1] * len(kernel)
        r = A.shape[0]
        if A.shape != (r, n_in, *kernel) or B.shape != (n_out, r, *ones):
            expected_A = ", ".join(map(str, ["r", n_in, *kernel]))
            expected_B = ", ".join(map(str, [n_out, "r", *ones]))
            raise ValueError(
                f"{where}: {name} has lora_A {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)}, expected ({expected_A}) and ({expected_B})"
            )
        adapters.update(add_lora(model, rank=A.shape[0], targets=[name]))
        adapter = adapters[name]
        with torch.no_grad():
            adapter.lora_A.weight.copy_(A)
            adapter.lora_B.weight.copy_(B)
        adapter.multiplier = multiplier
    return adapters
