"""Checks for chapter 07's last exercise: the training loop itself (its parts,
clipping, the EMA and the order of the batches, are in `training_loop`).

The reference is `reference_train_loop`, the package's `train` without its
checkpoints and logs (tests/test_training_loop_checks.py holds the two to the
same numbers). The loop trains a toy loss module for a few steps; each usual
slip is a reference loop with that slip, so a wrong loop is named by what it
did. The log must hold plain numbers, the callback the package's step numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from sdlearn.checks import Case, Verdict, check, randn
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
    seed = config.seed if slip == "seed" else config.seed * 1000
    generator = torch.Generator().manual_seed(seed)
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
        if slip == "zeroed":
            optimizer.zero_grad()
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
    learning rates, gradient norms, final weights, EMA, eval mode after), or a
    tuple whose first item says what is wrong with the log, the callback or the
    weights."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> tuple:
        items, config = inputs.args
        steps = []  # the step numbers the callback gets
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = ToyLoss().eval()
            before = [p.detach().clone() for p in model.parameters()]
            ema = EMA(model, config.ema_decay)
            log = fn(model, items, config, ema, lambda step, _: steps.append(step))
        problem = _log_problem(log, config.steps) or _steps_problem(steps, config)
        if problem:
            return (problem,)
        columns = [torch.tensor([e[k] for e in log]) for k in LOG_KEYS]
        if all(
            torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)
        ):  # (with the norms logged: a slip that logs them too is named)
            return (
                "the weights never changed: the optimiser saw no gradients (were "
                "they zeroed between backward and step?) or never stepped; each "
                "step runs zero_grad, backward, clip, step, in that order",
                columns[2],
            )
        flat = [
            torch.cat([v.flatten().float() for v in s.values()])
            for s in (model.state_dict(), ema.shadow)
        ]
        return (*columns, *flat, torch.tensor(float(not model.training)))

    return call


def _log_problem(log: object, steps: int) -> str | None:
    """What is wrong with the form of the log: a list of dicts of plain floats."""
    if not isinstance(log, list) or len(log) != steps:
        return f"return the log, a list of {steps} dicts, one a step"
    if not all(isinstance(e, dict) and set(LOG_KEYS) <= set(e) for e in log):
        return 'each log entry is a dict with "loss", "lr" and "grad_norm"'
    for step, entry in enumerate(log, start=1):
        for key in LOG_KEYS:
            if not isinstance(entry[key], float):
                return (
                    f'the "{key}" logged at step {step} is a '
                    f"{type(entry[key]).__name__}, not a float: log plain Python "
                    "numbers (loss.item(), float(grad_norm)), which a JSON log "
                    "can hold and which keep no tensor (or its graph) alive"
                )
    return None


def _steps_problem(steps: list, config: TrainConfig) -> str | None:
    """What is wrong with the step numbers the callback got."""
    expected = list(range(1, config.steps + 1))
    if steps == expected:
        return None
    if not steps:
        return (
            "the callback was never called: after each step, call "
            "callback(step + 1, ema) when one is given"
        )
    return (
        f"the callback got the step numbers {steps[:4]}...: the package numbers a "
        f"step by the steps done, {expected[:4]}...; call callback(step + 1, ema) "
        "once, after each step"
    )


WHAT_TRAINED = ("losses", "learning rates", "gradient norms", "weights", "EMA weights")


def _loop_problem(actual: tuple, case: Case) -> str | None:
    if isinstance(actual[0], str):
        return actual[0]
    (loss, _, norm), expected = actual[:3], case.expected
    same_loss = torch.allclose(loss[0], expected[0][0], atol=1e-5, rtol=1e-4)
    if same_loss and not torch.allclose(norm[0], expected[2][0], atol=1e-5, rtol=1e-4):
        return (
            f"the grad_norm logged at step 1 is {norm[0].item():.4g}, but the "
            f"gradients' norm was {expected[2][0].item():.4g}: log the norm "
            "that clip_grad_norm(trainable, config.grad_clip) returns, the norm "
            "before clipping (was the clipping skipped?)"
        )
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
    "the optimiser stepped with gradients not clipped (clipping skipped, or "
    "done after the step, where it changes nothing): clip between backward and "
    "step": "clip after",
    "the EMA was updated before the optimiser step: it averages the weights "
    "after each step": "ema first",
    "a new generator at every step draws the same noise each time: make one "
    "before the loop and hand it to every step": "generator",
    "torch.optim.Adam adds the weight decay to the gradient, where Adam's "
    "normalisation shrinks it: the recipe is AdamW, decay applied to the "
    "weights directly": "adam",
    "the loss did not run under bfloat16 autocast where the config asks for "
    "it (bf16_enabled(config.bf16, ...))": "autocast",
    "gradients zeroed between backward and step: the optimiser saw no "
    "gradients; zero them before backward": "zeroed",
    "the noise generator was seeded with config.seed: the package seeds it with "
    "config.seed * 1000, so that the loop draws the noise train draws": "seed",
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
