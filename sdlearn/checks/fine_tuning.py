"""Checks for chapter 09's exercises, the module the chapter imports.

The LoRA layer's (09.1 to 09.4: its forward, its update as a weight, merging,
unmerging) and adding adapters to a model (09.6) live in
`sdlearn.checks.lora`; textual inversion's (09.7 to 09.9: a new word, the
embedding whose new rows alone learn, the optimiser's groups) in
`sdlearn.checks.textual_inversion`. Both are imported here. Here are a
convolution's factors (09.5) and the adapter file's state dict (09.10),
checked against sdlearn's `LoRAConv2d.factors` and `lora_state_dict`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

# the chapter imports this module as `checks`: `checks.hint("Exercise 09.1")`
from sdlearn.checks import Case, Verdict, check, seeded
from sdlearn.checks import hint as hint
from sdlearn.checks.lora import check_add_lora as check_add_lora
from sdlearn.checks.lora import check_delta_weight as check_delta_weight
from sdlearn.checks.lora import check_lora_forward as check_lora_forward
from sdlearn.checks.lora import check_merge as check_merge
from sdlearn.checks.lora import check_unmerge as check_unmerge
from sdlearn.checks.lora import small_unet
from sdlearn.checks.textual_inversion import check_add_token as check_add_token
from sdlearn.checks.textual_inversion import (
    check_new_token_embedding as check_new_token_embedding,
)
from sdlearn.checks.textual_inversion import check_param_groups as check_param_groups
from sdlearn.lora import LoRAConv2d, add_lora, lora_layers, lora_state_dict

# --- Exercise 09.5: a convolution's factors ----------------------------------------


def _describe_conv(conv: nn.Module) -> tuple:
    """What a factor is, in the words a failure names."""
    if not isinstance(conv, nn.Conv2d):
        return (type(conv).__name__,)
    return (
        f"{conv.in_channels} -> {conv.out_channels} channels",
        f"kernel {tuple(conv.kernel_size)}",
        f"stride {tuple(conv.stride)}",
        f"padding {tuple(conv.padding)}",
        f"dilation {tuple(conv.dilation)}",
        f"padding_mode {conv.padding_mode}",
        "a bias" if conv.bias is not None else "no bias",
        f"dtype {conv.weight.dtype}",
    )


def _factoring(fn: Callable) -> Callable:
    """`fn(base, rank)`'s two factors, described."""

    @functools.wraps(fn)
    def run(base: nn.Conv2d, rank: int) -> tuple:
        factors = fn(base, rank)
        if not isinstance(factors, tuple | list) or len(factors) != 2:
            return ("not two modules",)
        return tuple(_describe_conv(f) for f in factors)

    return run


def _factoring_problem(actual: tuple, case: Case) -> str | None:
    if len(actual) != 2:
        return "expected two modules, A and B"
    for name, got, want in zip("AB", actual, case.expected, strict=True):
        if got != want:
            if len(got) == 1:
                return f"{name} is a {got[0]}, expected an nn.Conv2d"
            pairs = enumerate(zip(got, want, strict=True))
            i = next(i for i, (g, w) in pairs if g != w)
            return f"{name} has {got[i]}, expected {want[i]}"
    return None


def _conv_factors(base, rank, *, b_kernel=False, a_plain=False, bias=False, dtype=True):
    factory = {"device": base.weight.device}
    if dtype:
        factory["dtype"] = base.weight.dtype
    A = nn.Conv2d(
        base.in_channels,
        rank,
        base.kernel_size,
        1 if a_plain else base.stride,
        0 if a_plain else base.padding,
        1 if a_plain else base.dilation,
        bias=bias,
        padding_mode="zeros" if a_plain else base.padding_mode,
        **factory,
    )
    kernel = base.kernel_size if b_kernel else 1
    padding = base.padding if b_kernel else 0
    B = nn.Conv2d(
        rank, base.out_channels, kernel, padding=padding, bias=bias, **factory
    )
    return A, B


FACTOR_MISTAKES = {
    "B has the base's kernel: A already reads the base's k x k patches, B "
    "only mixes their r channels per pixel, a 1x1 convolution": (
        functools.partial(_conv_factors, b_kernel=True)
    ),
    "A does not take the base's stride, padding and dilation: B(A(x)) must "
    "have the shape of base(x)": functools.partial(_conv_factors, a_plain=True),
    "the factors have biases: the base's bias is added once, by the base": (
        functools.partial(_conv_factors, bias=True)
    ),
    "the factors are not in the base weight's dtype (bfloat16 here): make "
    "them with dtype=base.weight.dtype": functools.partial(_conv_factors, dtype=False),
}

FACTOR_HINTS = [
    "A convolution is a linear map of each (in, k, k) patch. So A is a "
    "convolution like the base, into r channels, and B maps those r channels "
    "to the base's out channels at each pixel.",
    "A: nn.Conv2d(base.in_channels, rank, base.kernel_size) with the base's "
    "stride, padding, dilation and padding_mode, no bias. B: nn.Conv2d(rank, "
    "base.out_channels, 1), no bias. Both on base.weight's device and dtype.",
    "factory = {'device': base.weight.device, 'dtype': base.weight.dtype}; A = "
    "nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, "
    "base.padding, base.dilation, bias=False, padding_mode=base.padding_mode, "
    "**factory); B = nn.Conv2d(rank, base.out_channels, 1, bias=False, "
    "**factory); return A, B.",
]

# the package's, even where a chapter puts the learner's in its place
PACKAGE_CONV_FACTORS = LoRAConv2d.factors

# the base convolutions: the ResnetBlocks' 3x3, a strided one, a 1x3 kernel
# with dilation and circular padding, and a 1x1 in bfloat16
FACTOR_CASES = [
    (lambda: nn.Conv2d(6, 8, 3, padding=1), 2),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), 3),
    (
        lambda: nn.Conv2d(
            5, 7, (1, 3), padding=(0, 2), dilation=2, padding_mode="circular"
        ),
        2,
    ),
    (lambda: nn.Conv2d(4, 4, 1, dtype=torch.bfloat16), 1),
]


def check_conv_factors(fn: Callable) -> Verdict:
    """Exercise 09.5: `conv_factors(base, rank)`, LoRAConv2d.factors."""
    cases = []
    for make, rank in FACTOR_CASES:
        with torch.device("meta"):
            base = make()
        expected = _factoring(PACKAGE_CONV_FACTORS)(base, rank)
        cases.append(Case((base, rank), expected))
    with torch.device("meta"):
        return check(
            "Exercise 09.5",
            _factoring(fn),
            cases,
            compare=_factoring_problem,
            hints=FACTOR_HINTS,
            mistakes={k: _factoring(v) for k, v in FACTOR_MISTAKES.items()},
            keep="lora:LoRAConv2d.factors",
        )


# --- Exercise 09.10: the adapter file -----------------------------------------------


class Adapted:
    """A case's model with adapters, described in a few words when it fails."""

    def __init__(self, model: nn.Module, description: str) -> None:
        self.model, self.description = model, description

    def __repr__(self) -> str:
        return self.description


def _filing(fn: Callable) -> Callable:
    """`fn(model, prefix)`'s state dict, per module: the shapes of A and B and
    the update B A a reader computes from them (alpha = rank, scale 1)."""

    @functools.wraps(fn)
    def run(model: Adapted, prefix: str) -> list:
        state = fn(model.model, prefix)
        if not isinstance(state, dict):
            return [("not a dict", type(state).__name__)]
        found = []
        for key in sorted(k for k in state if k.endswith(".lora_A.weight")):
            module = key[: -len(".lora_A.weight")]
            A, B = state[key], state.get(f"{module}.lora_B.weight")
            if not isinstance(B, torch.Tensor):
                found.append((module, "no lora_B"))
                continue
            product = B.detach().flatten(1).float() @ A.detach().flatten(1).float()
            found.append((module, tuple(A.shape), tuple(B.shape), product))
        extra = [
            k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))
        ]
        return found + [(key, "not a lora_A or lora_B weight") for key in extra]

    return run


def _filing_problem(actual: list, case: Case) -> str | None:
    got = {entry[0]: entry for entry in actual}
    want = {entry[0]: entry for entry in case.expected}
    missing = [k for k in want if k not in got]
    if missing:
        return f"{len(missing)} modules are missing, e.g. {missing[0]}.lora_A.weight"
    extra = [k for k in got if k not in want]
    if extra:
        return f"{extra[0]}: {got[extra[0]][1:2]} is not a key the file should hold"
    for key, entry in want.items():
        if len(got[key]) != len(entry):
            return f"{key}: {got[key][1]}"
        if got[key][1:3] != entry[1:3]:
            return f"{key}: A and B of shapes {got[key][1:3]}, expected {entry[1:3]}"
        try:
            torch.testing.assert_close(got[key][3], entry[3], atol=1e-6, rtol=1e-5)
        except AssertionError:
            return f"{key}: B A is not the adapter's update at scale alpha / rank"
    return None


def _state(model, prefix="unet", *, fold=True, multiplier=False, with_prefix=True):
    state = {}
    for name, adapter in lora_layers(model):
        key = f"{prefix}.{name}" if prefix else name
        key = key if with_prefix else name
        scale = adapter.scale if multiplier else adapter.alpha / adapter.rank
        state[f"{key}.lora_A.weight"] = adapter.lora_A.weight.detach().clone()
        state[f"{key}.lora_B.weight"] = adapter.lora_B.weight.detach() * (
            scale if fold else 1
        )
    return state


FILE_MISTAKES = {
    "the scale alpha / rank is not folded into the factors: a reader takes "
    "alpha = rank (a scale of 1), so multiply lora_B by alpha / rank": (
        functools.partial(_state, fold=False)
    ),
    "the inference multiplier went into the file: fold alpha / rank only "
    "(self.scale also holds the multiplier, which is the user's to set)": (
        functools.partial(_state, multiplier=True)
    ),
    "the keys lack the model's prefix: '<prefix>.<module>.lora_A.weight', "
    "'unet.' for the UNet": functools.partial(_state, with_prefix=False),
}

FILE_HINTS = [
    "Two tensors per adapter, under the module's name with the prefix in "
    "front: '<prefix>.<name>.lora_A.weight' and '...lora_B.weight'. A reader "
    "computes B A with a scale of 1, so the file must hold the scale.",
    "lora_layers(model) gives (name, adapter) pairs. Store lora_A's weight as "
    "it is and lora_B's times adapter.alpha / adapter.rank (not adapter.scale: "
    "that includes the multiplier). Detach them; with prefix '' the key is "
    "the name alone.",
    "for name, adapter in lora_layers(model): key = f'{prefix}.{name}' if "
    "prefix else name; state[f'{key}.lora_A.weight'] = "
    "adapter.lora_A.weight.detach().clone(); state[f'{key}.lora_B.weight'] = "
    "adapter.lora_B.weight.detach() * (adapter.alpha / adapter.rank).",
]

# (targets, rank, alpha, multiplier, prefix)
FILE_CASES = [
    (("to_q", "to_k", "to_v", "to_out.0"), 2, None, 1.0, "unet"),
    (("attn2.to_k", "attn2.to_v"), 2, 8.0, 0.5, "unet"),
    (("to_q", "conv1", "conv2"), 3, 6.0, 1.0, ""),
]


def check_lora_state_dict(fn: Callable) -> Verdict:
    """Exercise 09.10: `lora_state_dict(model, prefix)`, sdlearn.lora's."""
    cases = []
    for seed, (targets, rank, alpha, multiplier, prefix) in enumerate(FILE_CASES):
        model = small_unet()
        add_lora(model, rank, alpha, targets)
        model = seeded(model, 960 + seed)
        for _, adapter in lora_layers(model):
            adapter.multiplier = multiplier
        what = f"a two-level UNet with adapters of rank {rank}, alpha {alpha or rank}"
        args = (Adapted(model, f"{what}, multiplier {multiplier}"), prefix)
        cases.append(Case(args, _filing(lora_state_dict)(*args)))
    return check(
        "Exercise 09.10",
        _filing(fn),
        cases,
        compare=_filing_problem,
        hints=FILE_HINTS,
        mistakes={k: _filing(v) for k, v in FILE_MISTAKES.items()},
        keep="lora:lora_state_dict",
    )
