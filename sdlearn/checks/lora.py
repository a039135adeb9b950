"""Checks for chapter 09's LoRA exercises: the adapted layer's forward, its
update as a weight, merging and unmerging it, and adding adapters to a model.

The references are sdlearn's `LoRALinear`, `LoRAConv2d` and `add_lora`, which
the test suite holds to diffusers' LoRA through peft. A method is written as a
function taking `self`; the check binds it to the package's adapter, as the
chapter then runs it. The cases are chosen so that the usual slips show: scales
other than 1 (a forgotten alpha / rank), widths that differ (B A the wrong way
round), a merged adapter, a convolution's adapter (4-d weights), targets longer
than one name part. `sdlearn.checks.fine_tuning`, which the chapter imports,
has these checks too.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable

import torch
from torch import nn

from sdlearn.checks import Case, Verdict, check, compare_values, randn, seeded
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.lora import (
    ATTENTION_TARGETS,
    RESNET_CONV_TARGETS,
    LoRAConv2d,
    LoRALinear,
    add_lora,
)
from sdlearn.unet import UNet, UNetConfig

LORA_PART = "lora:LoRALinear"


def _as_method(fn: Callable) -> Callable:
    """`fn(self, ...)` called as the module's own method, as the chapter runs it."""

    @functools.wraps(fn)
    def call(module, *args, **kwargs):
        return types.MethodType(fn, module)(*args, **kwargs)

    return call


def _on_adapter(fn: Callable) -> Callable:
    """`fn(self, ...)` run as the method of a case's adapter (an `Adapter`)."""

    @functools.wraps(fn)
    def call(adapter: Adapter, *args):
        return types.MethodType(fn, adapter.adapter)(*args)

    return call


class Adapter:
    """An adapter of a case, described in a few words when a case fails."""

    def __init__(self, adapter: LoRALinear) -> None:
        self.adapter = adapter

    def __repr__(self) -> str:
        a = self.adapter
        base = a.base
        kind = "3x3 convolution" if isinstance(a, LoRAConv2d) else "linear layer"
        widths = f"{base.weight.shape[1]} -> {base.weight.shape[0]}"
        state = ", merged" if a.merged else ""
        return (
            f"of a {kind} {widths}, rank {a.rank}, alpha {a.alpha:g}, "
            f"multiplier {a.multiplier:g}, scale {a.scale:g}{state}"
        )


# (kind, in, out, rank, alpha, multiplier, bias, input shape): scales 1, 2, 0.125
# and a convolution's adapter (4-d weights, (B, C, H, W) inputs)
_LAYERS = [
    ("linear", 16, 24, 4, 4, 1.0, True, (3, 16)),
    ("linear", 32, 8, 2, 4, 1.0, False, (2, 5, 32)),
    ("linear", 20, 20, 8, 2, 0.5, True, (2, 3, 7, 20)),
    ("conv", 6, 8, 2, 4, 1.0, True, (2, 6, 5, 7)),
]


def _adapter(layer: tuple, seed: int) -> LoRALinear:
    """A trained adapter (B is zero only at the start), seeded weights."""
    kind, n_in, n_out, rank, alpha, multiplier, bias, _ = layer
    with torch.device("meta"):
        if kind == "conv":
            adapter = LoRAConv2d(nn.Conv2d(n_in, n_out, 3, padding=1), rank, alpha)
        else:
            adapter = LoRALinear(nn.Linear(n_in, n_out, bias=bias), rank, alpha)
    adapter = seeded(adapter, 900 + seed)
    adapter.multiplier = multiplier
    return adapter


# --- Exercise 09.1: the adapted layer's forward -----------------------------------


def _lora_forward(self, x, *, scale=True, base=True, merged=True, multiplier=True):
    """The forward, or what one of the usual mistakes makes of it."""
    out = self.base(x)
    out = out if base else torch.zeros_like(out)
    if merged and (self.merged or self.multiplier == 0):
        return out
    s = self.scale if multiplier else self.alpha / self.rank
    return out + (s if scale else 1) * self.lora_B(self.lora_A(x))


FORWARD_MISTAKES = {
    "the update is missing its scale: multiply B(A(x)) by self.scale "
    "(alpha / rank, times the multiplier)": functools.partial(
        _lora_forward, scale=False
    ),
    "the frozen layer's own output is missing: the adapter adds its update "
    "to self.base(x)": functools.partial(_lora_forward, base=False),
    "a merged adapter added its update again: once merged, the base weight "
    "holds it already, so return self.base(x) alone": functools.partial(
        _lora_forward, merged=False
    ),
    "the multiplier is missing: self.scale is alpha / rank times the "
    "multiplier, use it rather than alpha / rank": functools.partial(
        _lora_forward, multiplier=False
    ),
}

FORWARD_HINTS = [
    "The output is the frozen layer's output plus the low-rank update: "
    "W x + b + s B A x, with s = self.scale (alpha / r times the adapter's "
    "multiplier). A merged adapter (self.merged) has the update "
    "in its weight already.",
    "self.base(x) is W x + b. The update goes through self.lora_A (in -> r) "
    "first, then self.lora_B (r -> out), and is multiplied by self.scale. "
    "When self.merged (or the multiplier is 0), return the base's output alone.",
    "out = self.base(x); if self.merged or self.multiplier == 0: return out; "
    "return out + self.scale * self.lora_B(self.lora_A(x)).",
]


def check_lora_forward(fn: Callable) -> Verdict:
    """Exercise 09.1: `lora_forward(self, x)`, LoRALinear.forward."""
    cases = []
    for seed, layer in enumerate(_LAYERS):
        adapter = _adapter(layer, seed)
        x = randn(*layer[-1], seed=910 + seed)
        with torch.no_grad():
            cases.append(Case((Adapter(adapter), x), adapter(x)))
    # the first adapter again, merged: its update is in the weight
    merged = _adapter(_LAYERS[0], 0)
    merged.merge()
    x = randn(*_LAYERS[0][-1], seed=920)
    with torch.no_grad():
        cases.append(Case((Adapter(merged), x), merged(x)))

    with torch.no_grad():
        return check(
            "Exercise 09.1",
            _on_adapter(fn),
            cases,
            atol=1e-5,
            rtol=1e-5,
            hints=FORWARD_HINTS,
            mistakes={k: _on_adapter(v) for k, v in FORWARD_MISTAKES.items()},
            keep=f"{LORA_PART}.forward",
        )


# --- Exercise 09.2: the update as a weight ------------------------------------------


def _delta(self, *, scale=True, transposed=False, multiplier=True):
    B = self.lora_B.weight.flatten(1)  # (out, r)
    A = self.lora_A.weight.flatten(1)  # (r, in * k * k)
    product = (A.T @ B.T) if transposed else (B @ A)
    s = self.alpha / self.rank * (self.multiplier if multiplier else 1)
    product = product * (s if scale else 1)
    return product if transposed else product.view_as(self.base.weight)


DELTA_MISTAKES = {
    "the update is missing its scale: self.scale * (B @ A)": functools.partial(
        _delta, scale=False
    ),
    "the product is the wrong way round: A^T B^T is (B A)^T, shape (in, out); "
    "the update is B @ A, (out, r) @ (r, in) = (out, in), the weight's shape": (
        functools.partial(_delta, transposed=True)
    ),
    "the multiplier is missing: self.scale is alpha / rank times the "
    "multiplier, use it rather than alpha / rank": functools.partial(
        _delta, multiplier=False
    ),
}

DELTA_HINTS = [
    "Merging adds scale * B A to the weight, so B A must come out in the "
    "weight's shape: (out, r) @ (r, in) = (out, in). A convolution's factors "
    "are 4-d: B (out, r, 1, 1) and A (r, in, k, k).",
    "Flatten each factor's weight to a matrix from dimension 1 on (B: (out, r), "
    "A: (r, in * k * k)), multiply B @ A, scale it by self.scale, and reshape "
    "the product to the base weight's shape (.view_as(self.base.weight)).",
    "B = self.lora_B.weight.flatten(1); A = self.lora_A.weight.flatten(1); "
    "return self.scale * (B @ A).view_as(self.base.weight).",
]


def check_delta_weight(fn: Callable) -> Verdict:
    """Exercise 09.2: `delta_weight(self)`, LoRALinear.delta_weight."""
    cases = []
    for seed, layer in enumerate(_LAYERS):
        adapter = _adapter(layer, seed)
        with torch.no_grad():
            cases.append(Case((Adapter(adapter),), adapter.delta_weight()))

    with torch.no_grad():
        return check(
            "Exercise 09.2",
            _on_adapter(fn),
            cases,
            atol=1e-6,
            rtol=1e-5,
            hints=DELTA_HINTS,
            mistakes={k: _on_adapter(v) for k, v in DELTA_MISTAKES.items()},
            keep=f"{LORA_PART}.delta_weight",
        )


# --- Exercises 09.3 and 09.4: merging and unmerging ---------------------------------


def _run_twice(method: Callable, adapter: LoRALinear) -> tuple:
    """Call `method(adapter)` twice, on a copy: the base weight and the kept
    weight after the first call, and what the second call did."""
    adapter = copy.deepcopy(adapter)
    method(adapter)
    weight = adapter.base.weight.detach().clone()
    kept = adapter._unmerged_weight
    kept = None if kept is None else kept.detach().clone()
    try:
        method(adapter)
        second = "did it again"
    except ValueError:
        second = "raised ValueError"
    except Exception as error:  # the learner's code may fail in any way
        second = f"raised {type(error).__name__}"
    return weight, kept, second


def _state_problem(actual: tuple, expected: tuple, verb: str) -> str | None:
    """What differs between two `_run_twice` results, in words."""
    weight, kept, second = actual
    problem = compare_values(weight, expected[0], 0, 0)
    if problem:
        return f"after {verb}(), base.weight {problem}"
    if (kept is None) != (expected[1] is None):
        return (
            f"after {verb}(), self._unmerged_weight is "
            f"{'None' if kept is None else 'a tensor'}, expected "
            f"{'None' if expected[1] is None else 'the weight before the merge'}"
        )
    if kept is not None and compare_values(kept, expected[1], 0, 0):
        return (
            f"after {verb}(), self._unmerged_weight is not the weight before "
            "the merge: keep a copy of it before adding the update"
        )
    if second != expected[2]:
        return (
            f"a second {verb}() {second}; it should raise ValueError "
            f"('{'merged already' if verb == 'merge' else 'not merged'}')"
        )
    return None


def _merge(self, *, keep=True, refuse=True, scale=True, copy_after=False):
    if refuse and self.merged:
        raise ValueError("merged already")
    with torch.no_grad():
        if keep and not copy_after:
            self._unmerged_weight = self.base.weight.detach().clone()
        delta = (
            self.delta_weight() if scale else self.lora_B.weight @ self.lora_A.weight
        )
        self.base.weight += delta
        if keep and copy_after:
            self._unmerged_weight = self.base.weight.detach().clone()


MERGE_MISTAKES = {
    "the weight before the merge is not kept: keep a copy in "
    "self._unmerged_weight (unmerge restores it; self.merged reads it)": (
        functools.partial(_merge, keep=False, refuse=False)
    ),
    "a second merge added the update again: raise a ValueError when "
    "self.merged": functools.partial(_merge, refuse=False),
    "the weight kept is the one after the update: keep a copy taken before "
    "adding it, a clone (.detach().clone()); an alias of self.base.weight "
    "changes with it": (functools.partial(_merge, copy_after=True)),
    "the update is missing its scale: add self.delta_weight(), which holds "
    "it": functools.partial(_merge, scale=False),
}

MERGE_HINTS = [
    "Three things: refuse to merge twice, keep the weight as it is now (to "
    "undo the merge exactly later), then add the update into it in place.",
    "If self.merged: raise ValueError. self._unmerged_weight = a detached "
    "clone of self.base.weight. Then add self.delta_weight() to "
    "self.base.weight in place, inside `with torch.no_grad():` (a weight "
    "cannot be changed in place where autograd records).",
    "if self.merged: raise ValueError('merged already'); with torch.no_grad(): "
    "self._unmerged_weight = self.base.weight.detach().clone(); "
    "self.base.weight += self.delta_weight().",
]


def _harness(method: Callable) -> Callable:
    """`method(self)` run twice on a copy of a case's adapter (`_run_twice`)."""

    @functools.wraps(method)
    def run(adapter: Adapter) -> tuple:
        return _run_twice(_as_method(method), adapter.adapter)

    return run


def _merging_case(seed: int, layer: tuple, merged: bool) -> Case:
    adapter = _adapter(layer, seed)
    if merged:
        adapter.merge()
    method = LoRALinear.unmerge if merged else LoRALinear.merge
    return Case((Adapter(adapter),), _run_twice(method, adapter))


def check_merge(fn: Callable) -> Verdict:
    """Exercise 09.3: `merge(self)`, LoRALinear.merge."""
    cases = [_merging_case(seed, layer, False) for seed, layer in enumerate(_LAYERS)]

    return check(
        "Exercise 09.3",
        _harness(fn),
        cases,
        compare=lambda actual, case: _state_problem(actual, case.expected, "merge"),
        atol=0,
        rtol=0,
        hints=MERGE_HINTS,
        mistakes={k: _harness(v) for k, v in MERGE_MISTAKES.items()},
        keep=f"{LORA_PART}.merge",
    )


def _unmerge(self, *, subtract=False, clear=True, refuse=True):
    if refuse and not self.merged:
        raise ValueError("not merged")
    with torch.no_grad():
        if subtract:
            self.base.weight -= self.delta_weight()
        else:
            self.base.weight.copy_(self._unmerged_weight)
        if clear:
            self._unmerged_weight = None


UNMERGE_MISTAKES = {
    "the update was subtracted: (W + delta) - delta is not W in float32; copy "
    "the kept weight back instead": functools.partial(_unmerge, subtract=True),
    "the kept weight was not cleared, so the adapter still counts as merged: "
    "set self._unmerged_weight to None": functools.partial(_unmerge, clear=False),
    "unmerging an adapter that is not merged should raise a ValueError, not "
    "fail on a missing weight": functools.partial(_unmerge, refuse=False),
}

UNMERGE_HINTS = [
    "Undo the merge exactly: put back the weight that merge() kept, rather "
    "than subtracting the update again (float rounding would not give W back).",
    "If not self.merged: raise ValueError. Copy self._unmerged_weight into "
    "self.base.weight in place (inside torch.no_grad()), then set "
    "self._unmerged_weight to None, so that self.merged is False again.",
    "if not self.merged: raise ValueError('not merged'); with torch.no_grad(): "
    "self.base.weight.copy_(self._unmerged_weight); self._unmerged_weight = None.",
]


def check_unmerge(fn: Callable) -> Verdict:
    """Exercise 09.4: `unmerge(self)`, LoRALinear.unmerge."""
    cases = [_merging_case(seed, layer, True) for seed, layer in enumerate(_LAYERS)]

    return check(
        "Exercise 09.4",
        _harness(fn),
        cases,
        compare=lambda actual, case: _state_problem(actual, case.expected, "unmerge"),
        atol=0,
        rtol=0,
        hints=UNMERGE_HINTS,
        mistakes={k: _harness(v) for k, v in UNMERGE_MISTAKES.items()},
        keep=f"{LORA_PART}.unmerge",
    )


# --- Exercise 09.6: adapters on a model -----------------------------------------


class Model:
    """A case's model, described in a few words when a case fails."""

    def __init__(self, model: nn.Module, description: str) -> None:
        self.model, self.description = model, description

    def __repr__(self) -> str:
        return self.description


# (targets, rank, alpha): the attention projections (one of them "to_out.0",
# two name parts), the cross-attention's keys and values alone (targets that
# must not catch attn1's), and the convolutions too
ADD_CASES = [
    (ATTENTION_TARGETS, 4, None),
    (("attn2.to_k", "attn2.to_v"), 2, 8.0),
    (ATTENTION_TARGETS + RESNET_CONV_TARGETS, 3, 6.0),
    # a target that is the end of a longer name part, and no layer's name
    (("attn2.to_q", "emb_proj"), 2, None),
]


def small_unet(cross_attention_dim: int = 12) -> UNet:
    """A two-level UNet with cross-attention at one level, on the meta device:
    names and shapes without numbers."""
    config = UNetConfig(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_levels=(True, False),
        num_heads=(2, 2),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
    )
    with torch.device("meta"):
        return UNet(config)


def _wrapping(fn: Callable) -> Callable:
    """What `fn(model, rank, alpha, targets)` did to a copy of the model: the
    names it returned, what the model holds there, what trains, the adapters'
    rank and alpha."""

    @functools.wraps(fn)
    def run(model: Model, rank: int, alpha: float | None, targets: tuple) -> tuple:
        model = copy.deepcopy(model.model)
        adapters = fn(model, rank, alpha, targets)
        names = list(adapters)
        held = [type(model.get_submodule(name)).__name__ for name in names]
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        ranks = sorted({(a.rank, a.alpha) for a in adapters.values()})
        return names, held, trainable, ranks

    return run


def _wrapping_problem(actual: tuple, case: Case) -> str | None:
    if not isinstance(actual, tuple):  # not a dict of adapters
        return "expected {module name: adapter}, the adapters it made"
    names, held, trainable, ranks = actual
    want_names, want_held, want_trainable, want_ranks = case.expected
    if names != want_names:
        missing = [n for n in want_names if n not in names]
        extra = [n for n in names if n not in want_names]
        return (
            f"wrapped {len(names)} modules, expected {len(want_names)}: "
            f"{'missing ' + ', '.join(missing[:2]) if missing else ''}"
            f"{'; ' if missing and extra else ''}"
            f"{'not a target: ' + ', '.join(extra[:2]) if extra else ''}"
            f"{'' if missing or extra else 'in another order than the model'}"
        )
    if held != want_held:
        pairs = enumerate(zip(held, want_held, strict=True))
        i = next(i for i, (a, b) in pairs if a != b)
        return f"the model holds a {held[i]} at {names[i]}, expected {want_held[i]}"
    if trainable != want_trainable:
        extra = [n for n in trainable if n not in want_trainable]
        return (
            f"{len(trainable)} parameters train, expected only the adapters' "
            f"{len(want_trainable)} (lora_A, lora_B); e.g. {', '.join(extra[:2])}"
        )
    if ranks != want_ranks:
        return f"the adapters' (rank, alpha) are {ranks}, expected {want_ranks}"
    return None


def _add(model, rank=4, alpha=None, targets=ATTENTION_TARGETS, *, mistake=""):
    """add_lora, or what one of the usual mistakes makes of it."""
    if mistake != "trainable":
        model.requires_grad_(False)
    adapters = {}
    for name, module in list(model.named_modules()):
        if mistake == "last part":
            hit = name.rpartition(".")[2] in targets
        elif mistake == "no dot":
            hit = any(name.endswith(t) for t in targets)
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if not hit or type(module) not in (nn.Linear, nn.Conv2d):
            continue
        kind = LoRAConv2d if isinstance(module, nn.Conv2d) else LoRALinear
        adapter = kind(module, rank, None if mistake == "alpha" else alpha)
        parent, _, child = name.rpartition(".")
        if mistake != "not placed":
            setattr(model.get_submodule(parent), child, adapter)
        adapters[name] = adapter
    return adapters


ADD_MISTAKES = {
    "the rest of the model still trains: freeze the whole model first "
    "(model.requires_grad_(False)); only the adapters' A and B train": (
        functools.partial(_add, mistake="trainable")
    ),
    "a target was matched against the last part of the name only: 'to_out.0' "
    "and 'attn2.to_k' are endings of several parts (name == target or "
    "name.endswith('.' + target))": functools.partial(_add, mistake="last part"),
    "the adapters were made but the model still holds the old layers: put "
    "each one in its parent's place (setattr(parent, child_name, adapter))": (
        functools.partial(_add, mistake="not placed")
    ),
    "alpha was not passed on to the adapters": functools.partial(_add, mistake="alpha"),
    "a target matched the end of a longer name ('emb_proj' caught "
    "'time_emb_proj'): a target is whole name parts, name == target or "
    "name.endswith('.' + target)": functools.partial(_add, mistake="no dot"),
}

ADD_HINTS = [
    "Freeze the whole model, then find every nn.Linear and nn.Conv2d whose "
    "name ends with one of the targets, wrap it in an adapter, and put the "
    "adapter where the layer was, in its parent module.",
    "model.requires_grad_(False). Collect the matching names first "
    "(list(model.named_modules())), since you change the model as you go. A "
    "name matches a target t when name == t or name.endswith('.' + t). "
    "LoRAConv2d wraps an nn.Conv2d, LoRALinear an nn.Linear. The parent is "
    "model.get_submodule(name.rpartition('.')[0]).",
    "for name, module in list(model.named_modules()): if type(module) in "
    "(nn.Linear, nn.Conv2d) and any(name == t or name.endswith('.' + t) for t "
    "in targets): parent_name, _, child = name.rpartition('.'); adapter = "
    "(LoRAConv2d if isinstance(module, nn.Conv2d) else LoRALinear)(module, "
    "rank, alpha); setattr(model.get_submodule(parent_name), child, adapter); "
    "adapters[name] = adapter.",
]


def check_add_lora(fn: Callable) -> Verdict:
    """Exercise 09.6: `add_lora(model, rank, alpha, targets)`, sdlearn.lora's."""
    cases = []
    for targets, rank, alpha in ADD_CASES:
        model = Model(small_unet(), "a two-level UNet")
        expected = _wrapping(add_lora)(model, rank, alpha, targets)
        cases.append(Case((model, rank, alpha, targets), expected))
    return check(
        "Exercise 09.6",
        _wrapping(fn),
        cases,
        compare=_wrapping_problem,
        hints=ADD_HINTS,
        mistakes={k: _wrapping(v) for k, v in ADD_MISTAKES.items()},
        keep="lora:add_lora",
    )
