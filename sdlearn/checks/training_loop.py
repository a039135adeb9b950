"""Checks for chapter 07's exercises on the loop: gradient clipping, the EMA,
the order of the batches and the training loop itself.

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
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from sdlearn.checks import Case, Verdict, check, randn, tensor_form_problem
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.checks.training import Inputs
from sdlearn.training import (
    EMA,
    TrainConfig,
    batch_indices,
    bf16_enabled,
    clip_grad_norm,
    lr_factor,
)

# --- Exercise 07.5: clipping the gradient by its global norm ----------------------

# (gradient shapes, scale of the gradients, max_norm, a parameter without one?)
CLIP_CASES = (
    (((4, 3), (3,), (2, 2)), 1.0, 1.0, False),  # norm about 4: clipped
    (((5,), (2, 3)), 0.05, 1.0, False),  # norm about 0.2: left alone
    (((3, 3), (6,), (1,)), (2.0, 0.1, 0.1), 0.5, True),  # one large, one frozen
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
        norm = fn(parameters, max_norm)
        if isinstance(norm, torch.Tensor | float | int):
            norm = torch.as_tensor(norm, dtype=torch.float32).reshape(())
        return (norm, *(p.grad for p in parameters if p.grad is not None))

    return call


def _clip_slip(slip: str) -> Callable:
    """Gradient clipping with one of the usual slips."""

    def clip(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in parameters if p.grad is not None]
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
    "parameters whose .grad is None.",
    "grads = [p.grad for p in parameters if p.grad is not None]; total = "
    "torch.stack([g.norm() for g in grads]).norm(); if total > max_norm: for g in "
    "grads: g.mul_(max_norm / (total + 1e-6)); return total",
]


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
        inputs = Inputs(
            f"for {len(shapes)} gradients of shapes {list(shapes)}"
            + (" and a parameter without a gradient" if frozen else "")
            + f", max_norm {max_norm}",
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


# --- Exercise 07.8: the training loop ----------------------------------------------


class ToyLoss(nn.Module):
    """A loss module as DiffusionLoss is one, small enough for a check:
    `forward(batch, generator) -> (loss, {})` fits a linear map, through a
    BatchNorm, to targets, from inputs with noise drawn from `generator`."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.linear = nn.Linear(3, 2)

    def forward(self, batch: dict, generator: torch.Generator) -> tuple:
        x = batch["x"] + 0.3 * torch.randn(batch["x"].shape, generator=generator)
        prediction = self.linear(self.norm(x))
        return F.mse_loss(prediction.float(), batch["y"]), {}


def _toy_items(count: int, seed: int) -> list[dict]:
    x, y = randn(count, 3, seed=seed), 3 * randn(count, 2, seed=seed + 1)
    return [{"x": x[i], "y": y[i]} for i in range(count)]


def _slipped_loop(
    step_module: nn.Module,
    items: list[dict],
    config: TrainConfig,
    ema: EMA,
    callback: Callable | None = None,
    slip: str = "",
) -> list[dict]:
    """The loop of `reference_train_loop`, or what one of the usual slips makes
    of it."""
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    adam = torch.optim.Adam if slip == "adam" else torch.optim.AdamW
    betas, decay = config.betas, config.weight_decay
    optimizer = adam(trainable, lr=config.lr, betas=betas, weight_decay=decay)
    generator = torch.Generator().manual_seed(config.seed * 1000)
    autocast = bf16_enabled(config.bf16, torch.device("cpu")) and slip != "autocast"
    log = []
    step_module.train(slip != "eval")
    for step in range(config.steps):
        if slip == "generator":
            generator = torch.Generator().manual_seed(config.seed * 1000)
        lr = config.lr * lr_factor(step + (slip == "lr ahead"), config)
        for group in optimizer.param_groups:
            group["lr"] = config.lr if slip == "peak" else lr
        indices = batch_indices(step, config.batch_size, len(items), config.seed)
        batch = default_collate([items[i] for i in indices])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = step_module(batch, generator)
        if slip != "no zero_grad":
            optimizer.zero_grad()
        loss.backward()
        if slip == "ema first":
            ema.update(step_module)
        if slip != "clip after":
            grad_norm = clip_grad_norm(trainable, config.grad_clip)
        optimizer.step()
        if slip == "clip after":
            grad_norm = clip_grad_norm(trainable, config.grad_clip)
        if slip != "ema first":
            ema.update(step_module)
        log.append({"step": step + 1, "loss": loss.item(), "lr": lr})
        log[-1]["grad_norm"] = float(grad_norm)
        if callback is not None:
            callback(step + 1, ema)
    step_module.eval()
    return log


def reference_train_loop(
    step_module: nn.Module,
    items: list[dict],
    config: TrainConfig,
    ema: EMA,
    callback: Callable | None = None,
) -> list[dict]:
    """The package's `train` without its checkpoints, logs and processes: the
    same losses, weights and EMA for the same config (tests hold it to that).

    Returns:
        a log entry per step: "step" (from 1), "loss", "lr", "grad_norm".
    """
    return _slipped_loop(step_module, items, config, ema, callback)


LOG_KEYS = ("loss", "lr", "grad_norm")


def _trained(fn: Callable) -> Callable:
    """The learner's loop on a fresh toy, in eval mode as a model comes: (losses,
    learning rates, gradient norms, final weights, EMA, eval mode after)."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> tuple:
        items, config = inputs.args
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = ToyLoss().eval()
            ema = EMA(model, config.ema_decay)
            log = fn(model, items, config, ema)
        if not isinstance(log, list) or len(log) != config.steps:
            return (f"return the log, a list of {config.steps} dicts, one a step",)
        if not all(isinstance(e, dict) and set(LOG_KEYS) <= set(e) for e in log):
            return ('each log entry is a dict with "loss", "lr" and "grad_norm"',)
        columns = [torch.tensor([float(e[k]) for e in log]) for k in LOG_KEYS]
        flat = [
            torch.cat([v.flatten().float() for v in s.values()])
            for s in (model.state_dict(), ema.shadow)
        ]
        return (*columns, *flat, torch.tensor(float(not model.training)))

    return call


WHAT_TRAINED = ("losses", "learning rates", "gradient norms", "weights", "EMA weights")


def _loop_problem(actual: tuple, case: Case) -> str | None:
    if len(actual) == 1:
        return actual[0]
    for what, a, e in zip(WHAT_TRAINED, actual, case.expected, strict=False):
        if not torch.allclose(a, e, atol=1e-5, rtol=1e-4):
            step = (
                (a - e).abs().argmax().item() + 1 if a.ndim and len(a) == len(e) else 0
            )
            where = f" from step {step}" if what in WHAT_TRAINED[:3] else ""
            return f"the {what} differ from the reference's{where}"
    if not actual[-1]:
        return "leave the module in eval mode at the end: step_module.eval()"
    return None


LOOP_SLIPS = {
    "the gradients add up from step to step: zero them (optimizer.zero_grad()) "
    "before each backward": "no zero_grad",
    "the learning rate is one step ahead: step `step` (from 0) uses "
    "config.lr * lr_factor(step, config)": "lr ahead",
    "the learning rate stays at its peak: set every param group's lr to "
    "config.lr * lr_factor(step, config) at each step": "peak",
    "the gradients were clipped after the optimiser step, where they change "
    "nothing: clip between backward and step": "clip after",
    "the EMA was updated before the optimiser step: it averages the weights "
    "after each step": "ema first",
    "a new generator at every step draws the same noise each time: make one "
    "before the loop and hand it to every step": "generator",
    "torch.optim.Adam adds the weight decay to the gradient, where Adam's "
    "normalisation shrinks it: the recipe is AdamW, decay applied to the "
    "weights directly": "adam",
    "the loss did not run under bfloat16 autocast where the config asks for "
    "it (bf16_enabled(config.bf16, ...))": "autocast",
    "the module trained in eval mode (its BatchNorm used running statistics): "
    "call step_module.train() before the loop": "eval",
}
LOOP_HINTS = [
    "before the loop: AdamW over the trainable parameters, one generator; each "
    "step: set the learning rate, take the batch, the loss, zero the gradients, "
    "backward, clip, step, update the EMA, log.",
    "the generator is torch.Generator().manual_seed(config.seed * 1000); the "
    "batch is default_collate([items[i] for i in batch_indices(step, "
    "config.batch_size, len(items), config.seed)]); the loss is "
    "step_module(batch, generator)[0], under torch.autocast('cpu', "
    "dtype=torch.bfloat16, enabled=bf16_enabled(config.bf16, torch.device('cpu'))).",
    "optimizer.zero_grad(); loss.backward(); grad_norm = clip_grad_norm("
    "trainable, config.grad_clip); optimizer.step(); ema.update(step_module); "
    'log.append({"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": '
    "float(grad_norm)})",
]


def check_train_loop(fn: Callable) -> Verdict:
    """Exercise 07.8: `train_loop(step_module, items, config, ema, callback=None)`,
    the package's `train` without checkpoints (`reference_train_loop`)."""
    cases = []
    configs = (
        TrainConfig(
            steps=8,
            batch_size=4,
            lr=0.05,
            warmup_steps=3,
            grad_clip=2.0,
            weight_decay=0.5,
            ema_decay=0.9,
            seed=1,
            bf16="off",
        ),
        TrainConfig(
            steps=5,
            batch_size=6,
            lr=0.02,
            warmup_steps=0,
            grad_clip=3.0,
            weight_decay=0.1,
            ema_decay=0.5,
            seed=2,
            bf16="on",
        ),
    )
    for i, config in enumerate(configs):
        items = _toy_items(10, seed=600 + i)
        inputs = Inputs(
            f"for a toy loss module (a BatchNorm and a Linear) trained {config.steps} "
            f"steps of {config.batch_size} on 10 items, grad_clip {config.grad_clip}, "
            f"bf16 {config.bf16!r}",
            items,
            config,
        )
        cases.append(Case((inputs,), _trained(reference_train_loop)(inputs)))
    mistakes = {
        message: _trained(functools.partial(_slipped_loop, slip=slip))
        for message, slip in LOOP_SLIPS.items()
    }
    return check(
        "Exercise 07.8",
        _trained(fn),
        cases,
        rtol=1e-4,
        compare=_loop_problem,
        hints=LOOP_HINTS,
        mistakes=mistakes,
        keep="training:train_loop",
    )
