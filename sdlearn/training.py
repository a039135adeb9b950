"""Chapter 07: the training loop every stage of the course uses.

One loop trains the VAE, the contrastive CLIP and the UNet. A stage supplies a
module whose forward computes the loss of one batch (so that DistributedDataParallel
can wrap it), a dataset and the weights to ship; this module supplies the rest,
the way a practitioner expects it:

- AdamW with linear warm-up and cosine decay, gradient clipping, an EMA of the
  weights, bfloat16 autocast where the hardware has it;
- a data order that depends only on (seed, step), so a run can stop anywhere;
- checkpoints written atomically (temp file + rename) every N steps, loaded with
  `torch.load(weights_only=True)`, and `resume=True` continuing exactly: same
  batches, same noise, same optimiser and EMA state, same weights at the end;
- several processes through `torchrun` (DistributedDataParallel; gloo on CPUs,
  NCCL on GPUs): each process takes its share of every batch;
- a `run.json` with the config, seed, wall time and final metrics.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from sdlearn.devices import pick_device

CHECKPOINT = "checkpoint.pt"

# settings that do not change the numbers a run computes, free to change on resume
NOT_RESULTS = ("checkpoint_every", "log_every", "device")


@dataclass(frozen=True)
class TrainConfig:
    """How to train; every field can be set from the command line.

    Args:
        steps: optimiser steps in the whole run.
        batch_size: items per step, summed over all processes.
        lr: peak learning rate, reached after the warm-up.
        warmup_steps: linear warm-up from 0 to `lr`.
        min_lr_ratio: the cosine decay ends at lr * min_lr_ratio.
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's moment decay rates.
        grad_clip: clip the gradient norm to this; 0 turns clipping off.
        ema_decay: decay of the exponential moving average of the weights;
            0 turns the EMA off.
        seed: the one seed the whole run follows (data order, noise, init).
        checkpoint_every: write a resumable checkpoint every N steps.
        log_every: append the loss to log.jsonl every N steps.
        bf16: "auto" uses bfloat16 autocast where the hardware runs it fast,
            "on" and "off" force it.
        device: "auto" picks cuda, then mps, then cpu.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    bf16: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name} must be at least 1, got {getattr(self, name)}"
                )
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be 'auto', 'on' or 'off', got {self.bf16!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The config from a dict such as a run.json's; unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown training settings {unknown}; known: {sorted(known)}"
            )
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def updated(self, **changes) -> TrainConfig:
        """A copy with the given fields changed; None values are ignored."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def bf16_enabled(setting: str, device: torch.device) -> bool:
    """Whether to autocast to bfloat16: fast on CPUs with AMX/AVX512-BF16 and GPUs."""
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return (
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    return False


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then cosine decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scales the gradients of `parameters` together, by one factor, so that
    their global norm (of all of them as one vector) is at most `max_norm`:
    the direction is kept, only the length is capped (Pascanu et al. 2013).
    Parameters without a gradient are skipped. torch's clip_grad_norm_.

    Returns:
        the global norm before clipping, a 0-dim tensor.
    """
    return nn.utils.clip_grad_norm_(parameters, max_norm)


def batch_indices(
    step: int, batch_size: int, length: int, seed: int, rank: int = 0, world: int = 1
) -> list[int]:
    """The dataset indices of this process's share of batch `step`.

    Every epoch is a fresh permutation drawn from (seed, epoch), and batch `step`
    takes the next `batch_size` positions of the endless sequence of epochs, so
    the order depends on nothing but the seed and the step: a resumed run reads
    exactly the batches an uninterrupted one would have.
    """
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, length)
    indices = []
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(length)
        indices.extend(perm[offsets[epochs == epoch]].tolist())
    return indices[rank::world]


class EMA:
    """An exponential moving average of a model's floating-point weights.

    Sampling from the average of the last few hundred steps' weights gives
    smoother results than the last step's weights (Song & Ermon 2020). The
    decay warms up as (1 + n) / (10 + n) after n updates, diffusers' EMAModel's
    rule (which counts one update later: its first update copies the weights).
    With a fixed 0.999 from the start, the random initial weights would still
    make up 0.999^2000 = 13% of the average after 2000 steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        # the average starts at the model's weights, buffers included
        state = model.state_dict()
        self.shadow = {name: p.detach().clone() for name, p in state.items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.state_dict().items():
            if p.dtype.is_floating_point:
                self.shadow[name].lerp_(p.detach(), 1 - decay)
            else:
                self.shadow[name].copy_(p)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename it into place.

    A crash mid-write leaves the previous checkpoint intact, never half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    """Loads a training checkpoint without unpickling code (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable training checkpoint: {error}"
        ) from None


@dataclass
class TrainResult:
    """What a run produced: the final metrics and where things were written."""

    metrics: dict[str, float]
    seconds: float
    out_dir: Path
    # where it ran: device, CPU threads, world size, bfloat16 autocast or not
    hardware: dict


def _distributed() -> tuple[int, int]:
    """(rank, world size), starting the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), world


def _batches(
    dataset: Dataset,
    config: TrainConfig,
    start: int,
    end: int,
    rank: int,
    world: int,
    collate: Callable,
) -> Iterator[tuple[int, dict]]:
    if config.batch_size % world:
        raise ValueError(
            f"batch_size {config.batch_size} must divide evenly over {world} processes"
        )
    for step in range(start, end):
        idx = batch_indices(
            step, config.batch_size, len(dataset), config.seed, rank, world
        )
        yield step, collate([dataset[i] for i in idx])


@dataclass(frozen=True)
class EvalHook:
    """Something to measure along a run: `fn(step)` every `every` steps (not at
    the end), on the weights the run keeps (the EMA's when it is on). Training
    then goes on exactly as if it had not been measured: the live weights and
    the random state come back, and its time is not counted."""

    every: int
    fn: Callable[[int], None]


def train(
    step_module: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    collate_fn: Callable | None = None,
    progress: bool = True,
    description: str = "train",
    stop_at: int | None = None,
    evaluate: EvalHook | None = None,
) -> TrainResult:
    """Trains `step_module`, whose forward returns the loss of one batch.

    Args:
        step_module: `forward(batch, generator) -> (loss, metrics)`; parameters
            with requires_grad=False stay frozen. After training it holds the
            EMA weights when the EMA is on. One with a `param_groups(lr)`
            method gives the optimiser its groups (their own learning rates).
        dataset: items that `collate_fn` turns into a batch.
        config: the settings of the run.
        out_dir: where checkpoint.pt, log.jsonl and run.json go.
        resume: continue from out_dir/checkpoint.pt exactly where it stopped.
        collate_fn: list of items -> batch; torch's default_collate by default.
        progress, description: show a progress bar with this label (on the
            first process only).
        stop_at: stop after this step as an interruption would, with a checkpoint
            (the learning-rate schedule still follows `config.steps`).
        evaluate: a measurement to take along the run (see `EvalHook`).

    Returns:
        A `TrainResult` with the metrics of the last step.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _distributed()
    device = pick_device(config.device)
    autocast = bf16_enabled(config.bf16, device)
    hardware = {"device": str(device), "threads": torch.get_num_threads()}
    hardware |= {"world_size": world, "bf16": autocast}

    # 1. the optimiser, its schedule, the EMA and the noise generator
    state = _run_state(step_module.to(device), config, rank, device)
    model, ema = state["model"], state["ema"]

    # 2. resume from the last checkpoint, or start afresh
    start, elapsed = _resume(state, out_dir / CHECKPOINT, config, resume, rank)
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    # 3. the loop
    hide = not progress or rank
    bar = tqdm(total=config.steps, initial=start, desc=description, disable=hide)
    metrics: dict[str, float] = {}
    began = time.perf_counter() - elapsed
    model.train()
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    collate_fn = collate_fn or default_collate
    for step, batch in _batches(dataset, config, start, end, rank, world, collate_fn):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, metrics = wrapped(batch, state["generator"])
        _update(state, loss, config)
        metrics = {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        done = step + 1
        if rank == 0:  # the log and the checkpoint
            _write_step(state, out_dir, config, (done, end), metrics, began)
        if evaluate and done % evaluate.every == 0 and done < end:
            began += _measure(evaluate, done, model, ema)
    bar.close()

    # 4. the EMA weights are the ones to keep
    if ema is not None:
        model.load_state_dict(ema.shadow)
    model.eval()
    result = TrainResult(metrics, time.perf_counter() - began, out_dir, hardware)
    if rank == 0:
        _write_run(result, config)
    return result


def _run_state(
    model: nn.Module, config: TrainConfig, rank: int, device: torch.device
) -> dict:
    """What a run updates and checkpoints: the model, AdamW over its trainable
    parameters (or its `param_groups`) with the warm-up and cosine schedule of
    `lr_factor`, the EMA, and the noise generator, seeded per process (and
    torch's global RNG, for dropout and other layers)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = model.param_groups(config.lr) if hasattr(model, "param_groups") else None
    optimizer = torch.optim.AdamW(
        groups or trainable,
        lr=config.lr,
        betas=config.betas,
        weight_decay=config.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config)
    )
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    generator = torch.Generator(device).manual_seed(config.seed * 1000 + rank)
    torch.manual_seed(config.seed * 1000 + rank)
    return {
        "model": model,
        "trainable": trainable,
        "optimizer": optimizer,
        "schedule": schedule,
        "ema": ema,
        "generator": generator,
    }


def _update(state: dict, loss: torch.Tensor, config: TrainConfig) -> None:
    """One optimiser step on `loss`: backward, clip the gradients, AdamW,
    the learning-rate schedule, then the EMA."""
    state["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        clip_grad_norm(state["trainable"], config.grad_clip)
    state["optimizer"].step()
    state["schedule"].step()
    if state["ema"] is not None:
        state["ema"].update(state["model"])


def _write_step(
    state: dict,
    out_dir: Path,
    config: TrainConfig,
    steps: tuple[int, int],
    metrics: dict[str, float],
    began: float,
) -> None:
    """After step `done` of a run that stops at `end` (`steps`): a line of
    log.jsonl every `log_every` steps and at the last, a checkpoint every
    `checkpoint_every` steps and where the run stops."""
    done, end = steps
    if done % config.log_every == 0 or done == config.steps:
        seconds = round(time.perf_counter() - began, 3)
        lr = state["schedule"].get_last_lr()[0]
        _log(out_dir, {"step": done, "lr": lr, **metrics, "seconds": seconds})
    if done % config.checkpoint_every == 0 or done == end:
        seconds = time.perf_counter() - began
        save_atomic(_checkpoint(state, done, seconds, config), out_dir / CHECKPOINT)


def _write_run(result: TrainResult, config: TrainConfig) -> None:
    """run.json: the config, wall time, final metrics and where it ran."""
    run = {"config": config.to_dict(), "seconds": round(result.seconds, 1)}
    run["metrics"] = result.metrics
    run |= {k: result.hardware[k] for k in ("world_size", "bf16", "device")}
    (result.out_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")


def _log(out_dir: Path, record: dict) -> None:
    """One line of out_dir/log.jsonl."""
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _checkpoint(state: dict, done: int, seconds: float, config: TrainConfig) -> dict:
    """What checkpoint.pt holds: everything a resumed run needs to go on exactly."""
    ema = state["ema"]
    return {
        "model": state["model"].state_dict(),
        "optimizer": state["optimizer"].state_dict(),
        "schedule": state["schedule"].state_dict(),
        "ema": ema.state_dict() if ema is not None else {},
        "generator": state["generator"].get_state(),
        "torch_rng": torch.get_rng_state(),
        "step": done,
        "seconds": seconds,
        "config": json.dumps(config.to_dict()),
    }


def _resume(
    state: dict, path: Path, config: TrainConfig, resume: bool, rank: int
) -> tuple[int, float]:
    """With `resume` and a checkpoint at `path`, loads it into the run's `state`
    (model, optimizer, schedule, ema, generator) and the torch RNG; returns
    (step, seconds) to go on from, (0, 0.0) for a fresh run (whose old log the
    first process deletes).

    Raises:
        ValueError: the checkpoint was written with other settings.
    """
    if not (resume and path.exists()):
        if not resume and rank == 0:
            (path.parent / "log.jsonl").unlink(missing_ok=True)
        return 0, 0.0
    saved_state = load_checkpoint(path)
    saved = json.loads(saved_state["config"])
    current = json.loads(json.dumps(config.to_dict()))
    differ = sorted(
        k for k in current if k not in NOT_RESULTS and saved.get(k) != current[k]
    )
    if differ:
        raise ValueError(
            f"{path} was written with other settings ("
            + ", ".join(f"{k}: {saved.get(k)} now {current[k]}" for k in differ)
            + "); resume with the same ones to continue exactly"
        )
    for name in ("model", "optimizer", "schedule"):
        state[name].load_state_dict(saved_state[name])
    if state["ema"] is not None:
        state["ema"].load_state_dict(saved_state["ema"])
    state["generator"].set_state(saved_state["generator"])
    torch.set_rng_state(saved_state["torch_rng"])
    return int(saved_state["step"]), float(saved_state["seconds"])


def _measure(evaluate: EvalHook, done: int, model: nn.Module, ema: EMA | None) -> float:
    """Runs `evaluate.fn(done)` on the weights the run keeps, then puts the
    live weights, the training mode and the random state back; returns the
    seconds it took, which the run does not count."""
    began = time.perf_counter()
    rng = torch.get_rng_state()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    if ema is not None:
        model.load_state_dict(ema.shadow)
    model.eval()
    evaluate.fn(done)
    model.load_state_dict(live)
    model.train()
    torch.set_rng_state(rng)
    return time.perf_counter() - began


def is_main_process() -> bool:
    """Only the first of several torchrun processes writes the results."""
    return int(os.environ.get("RANK", "0")) == 0
