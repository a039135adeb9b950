"""Checks for chapter 07's exercises on the loop: gradient clipping, the EMA,
the order of the batches (the training loop itself is in `training_slips`).

The references are the package's: torch's clip_grad_norm_ (as
`training.clip_grad_norm`), `training.EMA.update`, `training.batch_indices`, and
for the loop, `reference_train_loop`, the package's `train` without its
checkpoints and logs (tests/test_training_loop_checks.py holds the two to the
same numbers). The loop trains a toy loss module for a few steps; each usual
slip is a reference loop with that slip, so a wrong loop is named by what it did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from sdlearn.checks import (
    Case,
    Verdict,
    check,
    compare_values,
    randn,
    tensor_form_problem,
)
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.checks.training import Inputs

# Exercise 07.8, the loop itself, is checked in `training_slips`; the chapter
# calls it from here, as the loop's other parts
from sdlearn.checks.training_slips import check_train_loop as check_train_loop
from sdlearn.checks.training_slips import (
    reference_train_loop as reference_train_loop,
)
from sdlearn.training import (
    EMA,
    batch_indices,
    clip_grad_norm,
)

# --- Exercise 07.5: clipping the gradient by its global norm ----------------------

# (gradient shapes, scale of the gradients, max_norm, a parameter without one?)
CLIP_CASES = (
    (((4, 3), (3,), (2, 2)), 1.0, 1.0, False),  # norm about 4: clipped
    (((5,), (2, 3)), 0.05, 1.0, False),  # norm about 0.2: left alone
    (((3, 3), (6,), (1,)), (2.0, 0.1, 0.1), 0.5, True),  # one large, one frozen
    ((), 1.0, 1.0, True),  # no gradient at all: the norm is 0
)
NO_GRADIENTS = (
    "with no gradient at all (every parameter's .grad is None, as after "
    "zero_grad) the global norm is 0: return torch.tensor(0.0) when there is no "
    "gradient, as torch's clip_grad_norm_ does"
)


def _clipped(fn: Callable) -> Callable:
    """The learner's `fn(parameters, max_norm)` on fresh parameters holding the
    case's gradients: (the norm it returned, every gradient after)."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> tuple:
        grads, max_norm = inputs.args
        parameters = []
        for grad in grads:
            parameter = nn.Parameter(torch.zeros(3 if grad is None else grad.shape))
            parameter.grad = None if grad is None else grad.clone()
            parameters.append(parameter)
        if all(grad is None for grad in grads):
            try:
                norm = fn(parameters, max_norm)
            except Exception as error:  # torch.stack([]), torch.sqrt(0) ...
                return (f"{NO_GRADIENTS}; yours raised {type(error).__name__}",)
        else:
            norm = fn(parameters, max_norm)
        if isinstance(norm, torch.Tensor | float | int):
            norm = torch.as_tensor(norm, dtype=torch.float32).reshape(())
        return (norm, *(p.grad for p in parameters if p.grad is not None))

    return call


def _clip_slip(slip: str) -> Callable:
    """Gradient clipping with one of the usual slips."""

    def clip(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        total = torch.stack([g.norm() for g in grads]).norm()
        if slip == "sum of norms":
            total = torch.stack([g.norm() for g in grads]).sum()
        for g in grads:
            if slip == "each":
                g.mul_(min(1.0, max_norm / (g.norm().item() + 1e-6)))
            elif slip == "values":
                g.clamp_(-max_norm, max_norm)
            elif slip == "always" or total > max_norm:
                g.mul_(max_norm / (total + 1e-6))
        if slip == "after":
            return torch.stack([g.norm() for g in grads]).norm()
        return total

    return _clipped(clip)


CLIP_MISTAKES = {
    "each gradient was clipped by its own norm: clipping scales all of them "
    "together, by one factor from their global norm": _clip_slip("each"),
    "the gradients were scaled up to max_norm although their norm was below it: "
    "scale only when the norm is above max_norm": _clip_slip("always"),
    "each value was clamped to [-max_norm, max_norm] (torch's clip_grad_value_): "
    "clip the norm of all the gradients together": _clip_slip("values"),
    "the norm is the sum of the gradients' norms: the global norm is the square "
    "root of the sum of all their squares": _clip_slip("sum of norms"),
    "returned the norm after clipping: return it before, so that the log shows "
    "how large the gradient was": _clip_slip("after"),
}
CLIP_HINTS = [
    "treat all the gradients as one long vector: its length is the global norm; "
    "if it is above max_norm, shrink every gradient by the same factor.",
    "total = sqrt of the sum, over the gradients, of (g ** 2).sum(); the factor "
    "is max_norm / (total + 1e-6), applied only when it is below 1; skip "
    "parameters whose .grad is None (none at all: the norm is 0).",
    "grads = [p.grad for p in parameters if p.grad is not None]; if not grads: "
    "return torch.tensor(0.0); total = "
    "torch.stack([g.norm() for g in grads]).norm(); if total > max_norm: for g in "
    "grads: g.mul_(max_norm / (total + 1e-6)); return total",
]


def _clip_problem(actual: tuple, case: Case) -> str | None:
    if len(actual) == 1 and isinstance(actual[0], str):
        return actual[0]
    problem = compare_values(actual, case.expected, 1e-5, 1e-5)
    if problem and not any(g is not None for g in case.args[0].args[0]):
        return f"{NO_GRADIENTS}; yours returned {actual[0]!r}"
    return problem


def check_clip_grad_norm(fn: Callable) -> Verdict:
    """Exercise 07.5: `clip_grad_norm(parameters, max_norm)`, torch's
    clip_grad_norm_ (`sdlearn.training.clip_grad_norm`)."""
    cases = []
    for seed, (shapes, scale, max_norm, frozen) in enumerate(CLIP_CASES):
        scales = scale if isinstance(scale, tuple) else (scale,) * len(shapes)
        grads = [
            s * randn(*shape, seed=500 + 10 * seed + i)
            for i, (shape, s) in enumerate(zip(shapes, scales, strict=True))
        ]
        grads += [None] if frozen else []
        parts = [f"{len(shapes)} gradients of shapes {list(shapes)}"] if shapes else []
        parts += ["a parameter without a gradient"] if frozen else []
        inputs = Inputs(
            f"for {' and '.join(parts)}, max_norm {max_norm}",
            grads,
            max_norm,
        )
        expected = _clipped(clip_grad_norm)(inputs)
        cases.append(Case((inputs,), expected))
    return check(
        "Exercise 07.5",
        _clipped(fn),
        cases,
        rtol=1e-5,
        compare=_clip_problem,
        hints=CLIP_HINTS,
        mistakes=CLIP_MISTAKES,
        keep="training:clip_grad_norm",
    )


# --- Exercise 07.6: the EMA update with warm-up -------------------------------------


def _ema_module() -> nn.Module:
    # a Linear and a BatchNorm: float weights, float buffers and an integer counter
    with torch.random.fork_rng(devices=[]):  # leave the caller's seed alone
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, value) in enumerate(_ema_module().state_dict().items()):
        if value.dtype.is_floating_point:
            out[name] = randn(*value.shape, seed=seed * 100 + i)
        else:
            out[name] = torch.tensor(seed * 7 + i, dtype=value.dtype)
    return out


def _ema_updated(fn: Callable) -> Callable:
    """The learner's `fn(self, model)` on an EMA that has made `updates` updates
    with average `shadow`, the model holding `weights`: (the new average, the
    count of updates, the model's weights after)."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> dict:
        shadow, weights, max_decay, updates = inputs.args
        model = _ema_module()
        model.load_state_dict(weights)
        ema = EMA(model, max_decay)
        ema.load_state_dict({"shadow": shadow, "updates": updates})
        fn(ema, model)
        return {
            "shadow": {k: v.clone() for k, v in ema.shadow.items()},
            "updates": ema.updates,
            "model": {k: v.clone() for k, v in model.state_dict().items()},
        }

    return call


def _ema_problem(actual: dict, case: Case) -> str | None:
    shadow, weights, max_decay, updates = case.args[0].args
    expected = case.expected["shadow"]
    for name, value in actual["model"].items():
        if not torch.equal(value, weights[name]):
            return (
                f"the model's {name!r} changed: the update writes the average "
                "(self.shadow), and leaves the model's weights as they are"
            )
    if actual["updates"] != updates + 1:
        return (
            f"self.updates is {actual['updates']} after update number {updates + 1}: "
            "count this update first (self.updates += 1), the warm-up reads it"
        )
    for name, value in expected.items():
        if not value.dtype.is_floating_point:
            if not torch.equal(actual["shadow"][name], value):
                return (
                    f"{name!r} is an integer counter (BatchNorm's batches seen), "
                    "not a weight: copy it from the model rather than average it"
                )
            continue
        problem = tensor_form_problem(actual["shadow"][name], value)
        if problem:
            return f"{name!r} {problem}"
        if torch.allclose(actual["shadow"][name], value, atol=1e-6, rtol=1e-5):
            continue
        n = updates + 1
        decay = min(max_decay, (1 + n) / (10 + n))
        old, new = shadow[name], weights[name]
        if torch.allclose(
            actual["shadow"][name], max_decay * old + (1 - max_decay) * new
        ):
            return (
                f"after {n} update(s) the decay must still be warming up: "
                f"min({max_decay:g}, (1 + {n}) / (10 + {n})) = {decay:.4f}, not "
                f"{max_decay:g}"
            )
        if torch.allclose(actual["shadow"][name], (1 - decay) * old + decay * new):
            return (
                "the weights and the average are swapped: the average keeps "
                "`decay` of itself and takes (1 - decay) of the new weights"
            )
        before = min(max_decay, n / (9 + n))
        if torch.allclose(actual["shadow"][name], before * old + (1 - before) * new):
            return (
                "the decay used the count of updates before this one: add 1 to "
                "self.updates first, then compute the decay"
            )
        error = (actual["shadow"][name] - value).abs().max().item()
        return (
            f"{name!r} differs from the reference by up to {error:.3g} after update "
            f"number {n} (max_decay {max_decay:g}, so decay {decay:.5f})"
        )
    return None


EMA_HINTS = [
    "count the update, work out this update's decay with its warm-up, then move "
    "every floating-point tensor of the average a little towards the model's.",
    "decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) after "
    "self.updates += 1; each float tensor of self.shadow becomes decay * shadow + "
    "(1 - decay) * weight; integer tensors are copied from the model.",
    "for name, value in model.state_dict().items(): if value.dtype."
    "is_floating_point: self.shadow[name].lerp_(value, 1 - decay) else: "
    "self.shadow[name].copy_(value)",
]


def check_ema_update(fn: Callable) -> Verdict:
    """Exercise 07.6: `ema_update(self, model)`, `EMA.update` with its warm-up."""
    cases = []
    # the first update, a few early ones, one mid-run (warm-up still below 0.999)
    # and one late (capped at max_decay), and a lower max_decay
    runs = [(0.999, 0), (0.999, 4), (0.999, 4999), (0.999, 19_999), (0.9, 2)]
    runs += [(0.9, 99)]
    for seed, (max_decay, updates) in enumerate(runs):
        states = _random_state(seed), _random_state(seed + 50)
        inputs = Inputs(
            f"for update number {updates + 1} with max_decay {max_decay}, of the "
            "weights of a Linear(3, 4) and a BatchNorm1d(4)",
            *states,
            max_decay,
            updates,
        )
        cases.append(Case((inputs,), _ema_updated(EMA.update)(inputs)))
    with torch.no_grad():
        return check(
            "Exercise 07.6",
            _ema_updated(fn),
            cases,
            compare=_ema_problem,
            hints=EMA_HINTS,
            keep="training:EMA.update",
        )


# --- Exercise 07.7: the order of the batches ---------------------------------------

# (steps, batch_size, length, seed, rank, world): within an epoch and across its
# end, a batch longer than the dataset, another seed, two processes' shares
ORDER_CASES = (
    (range(4), 8, 37, 0, 0, 1),
    (range(3, 12), 8, 37, 1, 0, 1),
    (range(3), 10, 4, 2, 0, 1),
    (range(5), 6, 20, 0, 1, 2),
)


def _all_batches(fn: Callable) -> Callable:
    """The learner's `fn(step, batch_size, length, seed, rank, world)` at every
    step of the case, as lists of ints."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> Any:
        steps, *settings = inputs.args
        batches = [fn(step, *settings) for step in steps]
        try:
            return [[int(i) for i in batch] for batch in batches]
        except TypeError:
            return batches

    return call


def _order_slip(slip: str) -> Callable:
    """`batch_indices` with one of the usual slips."""

    def indices(step, batch_size, length, seed, rank=0, world=1) -> list[int]:
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, offsets = np.divmod(positions, length)
        if slip == "one epoch":
            epochs = np.full_like(epochs, epochs[0])
        out = []
        for epoch in np.unique(epochs):
            key = {"same": seed, "sum": seed + int(epoch)}.get(slip, [seed, int(epoch)])
            permutation = np.random.default_rng(key).permutation(length)
            out.extend(permutation[offsets[epochs == epoch]].tolist())
        if slip == "block":
            share = len(out) // world
            return out[rank * share : (rank + 1) * share]
        return out[rank::world]

    return _all_batches(indices)


ORDER_MISTAKES = {
    "every epoch has the same order: draw each epoch's permutation from "
    "np.random.default_rng([seed, epoch])": _order_slip("same"),
    "the generator was seeded with seed + epoch, so seed 0's second epoch is seed "
    "1's first: seed it with the pair [seed, epoch]": _order_slip("sum"),
    "a batch that runs past the end of an epoch took the rest from the same "
    "permutation: each position's epoch is position // length, and its own "
    "permutation gives its index": _order_slip("one epoch"),
    "each process took a block of the batch: take every world-th index from "
    "position rank, indices[rank::world], as the package does": _order_slip("block"),
}
ORDER_HINTS = [
    "number the items of the endless run epoch after epoch: batch `step` is "
    "positions step * batch_size to (step + 1) * batch_size - 1; a position's "
    "epoch and place in it come from dividing by length.",
    "for each epoch the batch touches, permutation = np.random.default_rng([seed, "
    "epoch]).permutation(length), and a position at offset k in that epoch is "
    "permutation[k]; the process of rank r keeps indices[r::world].",
    "positions = np.arange(step * batch_size, (step + 1) * batch_size); epochs, "
    "offsets = np.divmod(positions, length); for epoch in np.unique(epochs): "
    "indices.extend(perm[offsets[epochs == epoch]].tolist())",
]


def check_batch_indices(fn: Callable) -> Verdict:
    """Exercise 07.7: `batch_indices(step, batch_size, length, seed, rank=0,
    world=1)`, the package's `training.batch_indices`."""
    cases = []
    for settings in ORDER_CASES:
        steps, batch_size, length, seed, rank, world = settings
        inputs = Inputs(
            f"for steps {steps.start} to {steps.stop - 1}, batches of {batch_size} "
            f"from {length} items, seed {seed}, rank {rank} of {world}",
            *settings,
        )
        cases.append(Case((inputs,), _all_batches(batch_indices)(inputs)))
    return check(
        "Exercise 07.7",
        _all_batches(fn),
        cases,
        hints=ORDER_HINTS,
        mistakes=ORDER_MISTAKES,
        keep="training:batch_indices",
    )
