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
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from sdlearn.devices import pick_device

CHECKPOINT = "checkpoint.pt"

# settings that do not change the numbers a run computes, free to change on resume
_NOT_RESULTS = ("checkpoint_every", "log_every", "device")


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
        self.shadow = {
            name: p.detach().clone() for name, p in model.state_dict().items()
        }

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
        progress: show a progress bar (on the first process only).
        description: the progress bar's label.
        stop_at: stop after this step, as an interruption would, with a
            checkpoint to resume from (the learning-rate schedule still follows
            `config.steps`).

    Returns:
        A `TrainResult` with the metrics of the last step.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    collate_fn = collate_fn or default_collate
    rank, world = _distributed()
    device = pick_device(config.device)
    autocast = bf16_enabled(config.bf16, device)
    model = step_module.to(device)

    # 1. the optimiser, its schedule, the EMA and the noise generator
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
    torch.manual_seed(config.seed * 1000 + rank)  # dropout and other layers

    # 2. resume from the last checkpoint
    start, elapsed = 0, 0.0
    checkpoint_path = out_dir / CHECKPOINT
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        saved = json.loads(state["config"])
        current = json.loads(json.dumps(config.to_dict()))
        differ = sorted(
            k for k in current if k not in _NOT_RESULTS and saved.get(k) != current[k]
        )
        if differ:
            raise ValueError(
                f"{checkpoint_path} was written with other settings ("
                + ", ".join(f"{k}: {saved.get(k)} now {current[k]}" for k in differ)
                + "); resume with the same ones to continue exactly"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, elapsed = int(state["step"]), float(state["seconds"])
    elif not resume and rank == 0:
        (out_dir / "log.jsonl").unlink(missing_ok=True)

    wrapped = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model)

    # 3. the loop
    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=description,
        disable=not progress or rank,
    )
    metrics: dict[str, float] = {}
    began = time.perf_counter() - elapsed
    model.train()
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    for step, batch in _batches(dataset, config, start, end, rank, world, collate_fn):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, metrics = wrapped(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(model)
        metrics = {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        done = step + 1
        if rank == 0 and (done % config.log_every == 0 or done == config.steps):
            record = {"step": done, "lr": schedule.get_last_lr()[0], **metrics}
            record["seconds"] = round(time.perf_counter() - began, 3)
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if rank == 0 and (done % config.checkpoint_every == 0 or done == end):
            save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "ema": ema.state_dict() if ema is not None else {},
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "step": done,
                    "seconds": time.perf_counter() - began,
                    "config": json.dumps(config.to_dict()),
                },
                checkpoint_path,
            )
    bar.close()
    seconds = time.perf_counter() - began

    # 4. the EMA weights are the ones to keep
    if ema is not None:
        model.load_state_dict(ema.shadow)
    model.eval()
    if rank == 0:
        run = {
            "config": config.to_dict(),
            "seconds": round(seconds, 1),
            "metrics": metrics,
        }
        run["world_size"] = world
        run["bf16"] = autocast
        run["device"] = str(device)
        (out_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    hardware = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "world_size": world,
        "bf16": autocast,
    }
    return TrainResult(metrics, seconds, out_dir, hardware)


# --- the stages: what `sdlearn train STAGE` trains ----------------------------

STAGE_DEFAULTS: dict[str, TrainConfig] = {
    "vae": TrainConfig(
        steps=2000, batch_size=16, lr=2e-3, warmup_steps=100, ema_decay=0.999
    ),
    "clip": TrainConfig(steps=800, batch_size=64, lr=1e-3, warmup_steps=50),
    # bfloat16 autocast makes the tiny UNet's step slower on a CPU (0.27 s
    # against 0.19 s at batch 64: its matmuls are too small to pay for the
    # casts); the VAE and the text encoder run as fast either way
    "unet": TrainConfig(
        steps=6000,
        batch_size=64,
        lr=2e-3,
        warmup_steps=200,
        ema_decay=0.999,
        bf16="off",
    ),
    # fine-tuning the shipped UNet through rank-8 adapters: a few minutes
    "lora": TrainConfig(
        steps=1200, batch_size=32, lr=2e-3, warmup_steps=50, bf16="off"
    ),
    # the whole tiny UNet, from the shipped weights: a smaller learning rate
    "dreambooth": TrainConfig(
        steps=800, batch_size=32, lr=2e-4, warmup_steps=50, bf16="off"
    ),
    # one embedding row of 64 numbers, no weight decay pulling it to zero
    "textual-inversion": TrainConfig(
        steps=800,
        batch_size=32,
        lr=5e-3,
        warmup_steps=50,
        weight_decay=0.0,
        bf16="off",
    ),
}


def source_checkout() -> Path | None:
    """The repository's root when sdlearn runs from a source checkout (a git
    clone installed with `pip install -e .`), else None."""
    root = Path(__file__).resolve().parents[1]
    is_checkout = (root / "pyproject.toml").is_file() and (root / ".git").exists()
    return root if is_checkout else None


def check_can_ship(files: list[Path]) -> None:
    """Refuses `ship` where the package is not a source checkout: the shipped
    weights every chapter loads live inside the installed package, and only a
    maintainer replaces them, in a checkout, where git shows and undoes it.

    Raises:
        ValueError: not a source checkout; names the files it would overwrite.
    """
    if source_checkout() is None:
        names = ", ".join(str(f) for f in files)
        raise ValueError(
            f"--ship replaces the weights shipped inside the sdlearn package "
            f"({names}), which only a maintainer does, in a source checkout; "
            "this sdlearn is an installed package: train into a run folder "
            "(--out) and load it with --checkpoint instead"
        )


def _is_main_process() -> bool:
    """Only the first of several torchrun processes writes the results."""
    return int(os.environ.get("RANK", "0")) == 0


def _command(stage: str, config: TrainConfig, ship: bool = True, **options) -> str:
    """The `sdlearn train` command line that repeats a run with these settings
    (with --ship for the stages whose weights the package ships)."""
    defaults = STAGE_DEFAULTS[stage].to_dict()
    settings = {
        key: value
        for key, value in config.to_dict().items()
        if value != defaults[key] and key not in _NOT_RESULTS
    }
    flags = [
        f"--{key.replace('_', '-')}"
        + ("" if value is True else f" {shlex.quote(str(value))}")  # a switch
        for key, value in {**settings, **options}.items()
    ]
    return " ".join([f"sdlearn train {stage}", *flags, *(["--ship"] if ship else [])])


def _channels_last(items: list[dict]) -> dict:
    batch = default_collate(items)
    batch["pixel_values"] = batch["pixel_values"].contiguous(
        memory_format=torch.channels_last
    )
    return batch


def train_vae(
    config: TrainConfig,
    out_dir: str | Path,
    kl_weight: float = 1e-6,
    resume: bool = False,
    ship: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    eval_images: int = 256,
    shapes: str = "all",
) -> dict:
    """Stage 1: the tiny VAE on 64x64 shapes images.

    After training, sets the latent scaling factor to 1 / std of the latents of
    training images (SD's 0.18215 was chosen the same way), measures the PSNR of
    reconstructions of held-out images and how often the scorer reads the
    reconstructions of base and of new shapes right, and writes vae.safetensors
    and vae.json to `out_dir` (and into the package with `ship=True`).

    Args:
        shapes: "all" (the default, and the shipped VAE) trains on the base
            shapes and on the new ones (`shapes.NEW_SHAPES`), filled and hollow
            (`shapes.NEW_STYLES`), which the UNet stage never shows, so that a
            later fine-tuning can draw them (Stable Diffusion's VAE, too, has
            seen far more than any one fine-tuning teaches); "base" on the
            filled `shapes.SHAPES` only.

    Returns:
        the record written to vae.json.
    """
    from sdlearn.shapes import ALL_SHAPES, ALL_STYLES, SHAPES, STYLES, ShapesDataset
    from sdlearn.vae import AutoencoderKL, VAEConfig, VAELoss, psnr

    if shapes not in ("base", "all"):
        raise ValueError(f"expected shapes 'base' or 'all', got {shapes!r}")
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(VAEConfig.tiny()).to(memory_format=torch.channels_last)
    data = ShapesDataset(
        "train",
        length=100_000,
        image_size=64,
        seed=config.seed,
        shapes=ALL_SHAPES if shapes == "all" else SHAPES,
        styles=ALL_STYLES if shapes == "all" else STYLES,
    )
    result = train(
        VAELoss(vae, kl_weight),
        data,
        config,
        out_dir,
        resume=resume,
        collate_fn=_channels_last,
        progress=progress,
        description="train vae",
        stop_at=stop_at,
    )
    vae = vae.cpu().eval()
    with torch.no_grad():
        n = eval_images
        train_images = _channels_last([data[i] for i in range(n)])["pixel_values"]
        latents = vae.encode(train_images).mode()
        scaling_factor = round(1.0 / latents.std().item(), 5)
        held_out = ShapesDataset("held_out", length=n, image_size=64, seed=1)
        images = _channels_last([held_out[i] for i in range(n)])["pixel_values"]
        scores = psnr(vae.decode(vae.encode(images).mode()), images)
    model_config = {**asdict(vae.config), "scaling_factor": scaling_factor}
    metrics = {
        "held_out_psnr_db": round(scores.mean().item(), 2),
        **_reconstructions_read_right(vae, n),
    }
    options = {"kl_weight": kl_weight, "shapes": shapes}
    return _finish_stage(
        "vae", vae, model_config, config, result, metrics, ship, **options
    )


@torch.no_grad()
def _reconstructions_read_right(vae: nn.Module, n: int) -> dict[str, float]:
    """How often the scorer reads a VAE's reconstruction as its caption, in
    percent, for base shapes, each new shape and the base shapes in each new
    style: what a UNet on these latents can draw at best."""
    from sdlearn import shapes as S
    from sdlearn.evaluate import score

    n = max(1, n)
    result = {}
    concepts = [("base", S.SHAPES, S.STYLES)]
    concepts += [(shape, (shape,), S.STYLES) for shape in S.NEW_SHAPES]
    concepts += [(style, S.SHAPES, (style,)) for style in S.NEW_STYLES]
    for name, shapes, styles in concepts:
        data = S.ShapesDataset(
            "all", length=n, seed=2, shapes=shapes, styles=styles, random_captions=False
        )
        items = [data[i] for i in range(n)]
        pixels = torch.stack([item["pixel_values"] for item in items])
        images = S.to_image(vae.decode(vae.encode(pixels).mode()))
        # a hollow circle is read as a ring when rings are told apart
        told_apart = S.SHAPES if styles != S.STYLES else S.ALL_SHAPES
        right = [
            score(image, item["caption"], told_apart, S.ALL_STYLES)["all"]
            for image, item in zip(images, items, strict=True)
        ]
        result[f"{name}_read_right"] = round(100 * sum(right) / n, 1)
    return result


def train_clip(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    ship: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    eval_images: int = 256,
) -> dict:
    """Stage 2: the tiny contrastive CLIP on captioned 64x64 shapes images.

    Its text encoder is what the tiny Stable Diffusion conditions on. After
    training, measures zero-shot accuracy (colour and shape both right, among
    all 18 "a {color} {shape}" prompts) on held-out and on training
    combinations, and writes clip.safetensors and clip.json.

    Returns:
        the record written to clip.json.
    """
    from sdlearn.clip import (
        ContrastiveCLIP,
        ContrastiveCLIPConfig,
        ContrastiveLoss,
        zero_shot_accuracy,
    )
    from sdlearn.shapes import ShapesDataset
    from sdlearn.tokenizer import CLIPTokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    model_config = ContrastiveCLIPConfig.tiny()
    model = ContrastiveCLIP(model_config)
    tokenizer = CLIPTokenizer()
    data = ShapesDataset("train", length=100_000, image_size=64, seed=config.seed)
    result = train(
        ContrastiveLoss(model, tokenizer),
        data,
        config,
        out_dir,
        resume=resume,
        progress=progress,
        description="train clip",
        stop_at=stop_at,
    )
    model = model.cpu().eval()
    held_out = zero_shot_accuracy(model, tokenizer, "held_out", eval_images)
    seen = zero_shot_accuracy(model, tokenizer, "train", eval_images)
    metrics = {
        "zero_shot_held_out": round(held_out, 4),
        "zero_shot_train": round(seen, 4),
    }
    return _finish_stage(
        "clip", model, asdict(model_config), config, result, metrics, ship
    )


class DiffusionLoss(nn.Module):
    """The loss Stable Diffusion trains its UNet with (Rombach et al. 2022, eq. 2):
    noise the latents of a captioned image to a random timestep, ask the UNet
    for the noise, and score it with the mean squared error.

    The frozen VAE and text encoder ran once, before training (see
    `encode_shapes`): each item carries its latent distribution and the index of
    its caption in a table of text tokens. The caption is replaced by the empty
    prompt with probability `caption_dropout`, so that one model learns both
    the conditional and the unconditional prediction classifier-free guidance
    needs (Ho & Salimans 2022).

    Args:
        unet: the model being trained.
        scheduler: the noise schedule (`add_noise`, `num_train_timesteps`).
        text_tokens: (N_captions, 77, D) the text encoder's output per caption;
            row 0 is the empty prompt.
        scaling_factor: the VAE's, so that latents have about unit variance.
        caption_dropout: how often the caption is dropped.
        timestep_bias: how many times more often a timestep of the noisier half
            is drawn than one of the other half (1: uniform, as SD trains; as
            diffusers' training scripts' "later" timestep bias). Where the noise
            hides most of the picture, only the caption can tell what to draw.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        text_tokens: torch.Tensor,
        scaling_factor: float,
        caption_dropout: float = 0.1,
        timestep_bias: float = 1.0,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        # a plain attribute, not a buffer: not trained, not in checkpoints
        self.text_tokens = text_tokens
        self.scaling_factor = scaling_factor
        self.caption_dropout = caption_dropout
        if timestep_bias <= 0:
            raise ValueError(f"expected a positive timestep_bias, got {timestep_bias}")
        self.timestep_bias = timestep_bias

    def timesteps(
        self, B: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """(B,) training timesteps: uniform, or the noisier half `timestep_bias`
        times as likely."""
        T = self.scheduler.config.num_train_timesteps
        if self.timestep_bias == 1:
            return torch.randint(0, T, (B,), generator=generator, device=device)
        weights = torch.ones(T, device=device)
        weights[T // 2 :] = self.timestep_bias
        return torch.multinomial(weights, B, replacement=True, generator=generator)

    def forward(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            batch: "mean" and "std" (B, C, h, w) of the VAE's posterior for each
                image, "caption" (B,) rows of `text_tokens`.
            generator: every random draw of the step.

        Returns:
            (loss, {}).
        """
        mean, std = batch["mean"], batch["std"]
        B, device = mean.shape[0], mean.device

        def randn(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=device)

        # 1. a sample of the posterior, scaled to about unit variance
        z0 = (mean + std * randn(mean.shape)) * self.scaling_factor  # (B, C, h, w)
        # 2. a timestep per image, and the noise to add (eq. 4, Ho et al. 2020)
        t = self.timesteps(B, generator, device)
        noise = randn(z0.shape)
        zt = self.scheduler.add_noise(z0, noise, t)
        # 3. the caption's tokens, or the empty prompt's
        rows = batch["caption"].clone()
        dropped = torch.rand(B, generator=generator, device=device)
        rows[dropped < self.caption_dropout] = 0
        context = self.context(rows)  # (B, 77, D)
        # 4. predict the noise (eq. 14, Ho et al. 2020)
        prediction = self.unet(zt, t, context)
        return F.mse_loss(prediction.float(), noise), {}

    def context(self, rows: torch.Tensor) -> torch.Tensor:
        """The text tokens (B, 77, D) of the captions in `rows` (B,), looked up
        in the table (chapter 09's textual inversion runs the text encoder)."""
        return self.text_tokens.to(rows.device)[rows]


@torch.no_grad()
def encode_shapes(
    vae: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    dataset: Dataset,
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[list[dict], torch.Tensor, list[str]]:
    """Runs the frozen VAE and text encoder over a dataset once.

    Returns:
        items: per image, the posterior's "mean" and "std" (C, h, w) and the
            row of its "caption" in `text_tokens`;
        text_tokens: (N_captions, 77, D), row 0 the empty prompt;
        captions: the N_captions texts, "" first.
    """
    from tqdm.auto import tqdm

    captions = [""]
    row_of = {"": 0}
    items = []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="encode images", disable=not progress):
        batch = default_collate(
            [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        )
        posterior = vae.encode(batch["pixel_values"])
        for i, caption in enumerate(batch["caption"]):
            if caption not in row_of:
                row_of[caption] = len(captions)
                captions.append(caption)
            items.append(
                {
                    "mean": posterior.mean[i].clone(),
                    "std": posterior.std[i].clone(),
                    "caption": row_of[caption],
                }
            )
    text_tokens = torch.cat(
        [
            text_encoder(tokenizer(captions[i : i + 256]))
            for i in range(0, len(captions), 256)
        ]
    )  # (N_captions, 77, D)
    return items, text_tokens, captions


def train_unet(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    ship: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    eval_images: int = 256,
    parts_dir: str | Path | None = None,
    caption_dropout: float = 0.1,
    images: int = 40_000,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
) -> dict:
    """Stage 3: the tiny UNet, on the latents of the frozen tiny VAE, conditioned
    on the frozen tiny CLIP's text tokens (chapter 07).

    Args:
        parts_dir: where vae.safetensors and clip.safetensors are (with their
            .json records); the ones shipped in the package by default.
        caption_dropout: how often the caption becomes the empty prompt.
        images: how many training images to encode once and sample batches from.
        num_train_timesteps: the diffusion's number of noise levels T.
        beta_schedule: the noise schedule, one of DDPMScheduler's (SD 1.x's
            "scaled_linear" by default); the record keeps the scheduler's config.
        eval_images: about how many images the end-of-run evaluation draws, a
            few seeds of every evaluation prompt (see `sdlearn.evaluate`); 0
            skips it.
        (the rest as for `train_vae`)

    Returns:
        the record written to unet.json.
    """
    from sdlearn.clip import ContrastiveCLIP, _config_from_record
    from sdlearn.schedulers import DDPMScheduler, scheduler_to_config
    from sdlearn.shapes import ShapesDataset
    from sdlearn.tokenizer import CLIPTokenizer
    from sdlearn.unet import UNet, UNetConfig
    from sdlearn.vae import AutoencoderKL, VAEConfig
    from sdlearn.weights import (
        SHIPPED_DIR,
        config_from_json,
        load_checked,
        read_shipped,
    )

    out_dir = Path(out_dir)
    parts = SHIPPED_DIR if parts_dir is None else Path(parts_dir)
    torch.manual_seed(config.seed)

    # 1. the frozen parts, and the dataset through them once
    def folder(name: str) -> Path:
        # `sdlearn train all` leaves each stage in its own subfolder
        inside = parts / name
        return inside if (inside / f"{name}.safetensors").exists() else parts

    state, record = read_shipped("vae", folder=folder("vae"))
    vae = AutoencoderKL(VAEConfig(**config_from_json(record["model_config"])))
    load_checked(vae, state, str(folder("vae") / "vae.safetensors")).eval()
    state, record = read_shipped("clip", folder=folder("clip"))
    clip = ContrastiveCLIP(_config_from_record(record["model_config"]))
    load_checked(clip, state, str(folder("clip") / "clip.safetensors")).eval()
    tokenizer = CLIPTokenizer()
    data = ShapesDataset("train", length=images, image_size=64, seed=config.seed)
    items, text_tokens, _ = encode_shapes(
        vae, clip.text_model, tokenizer, data, progress=progress
    )

    # 2. train the UNet to predict the noise
    unet = UNet(UNetConfig.tiny(cross_attention_dim=clip.text_model.config.hidden_size))
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule
    )
    loss = DiffusionLoss(
        unet, scheduler, text_tokens, vae.config.scaling_factor, caption_dropout
    )
    result = train(
        loss,
        items,
        config,
        out_dir,
        resume=resume,
        progress=progress,
        description="train unet",
        stop_at=stop_at,
    )
    unet = unet.cpu().eval()

    # 3. draw and score images for held-out prompts
    metrics = {}
    if eval_images:
        from sdlearn.evaluate import (
            evaluate_pipeline,
            evaluation_prompts,
            flat_metrics,
        )
        from sdlearn.pipeline import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(tokenizer, clip.text_model, vae, unet, scheduler)
        prompts = sum(len(p) for p in evaluation_prompts().values())
        seeds = max(1, round(eval_images / prompts))
        table, _ = evaluate_pipeline(pipe, seeds=seeds)
        metrics = flat_metrics(table)
    model_config = asdict(unet.config)
    return _finish_stage(
        "unet",
        unet,
        model_config,
        config,
        result,
        metrics,
        ship,
        caption_dropout=caption_dropout,
        images=images,
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        extra_record={
            "scheduler_config": scheduler_to_config(scheduler),
            # where its VAE and CLIP came from, relative to this run's folder
            # (None: the package's), so that loading the run finds them
            "parts_dir": None
            if parts_dir is None
            else os.path.relpath(Path(parts_dir).resolve(), out_dir.resolve()),
        },
    )


def loss_history(log: Path, points: int = 100) -> dict[str, list]:
    """The run's loss curve from log.jsonl, averaged down to about `points` points.

    Returns:
        {"step": [...], "loss": [...]}: each loss is the mean of the logged
        losses in one window, at the window's last step. Small enough to keep
        in the shipped record, so a learner can plot the full run.
    """
    rows = [json.loads(line) for line in log.read_text().splitlines() if line]
    window = max(1, math.ceil(len(rows) / points))
    steps, losses = [], []
    for start in range(0, len(rows), window):
        chunk = rows[start : start + window]
        steps.append(chunk[-1]["step"])
        losses.append(round(sum(r["loss"] for r in chunk) / len(chunk), 6))
    return {"step": steps, "loss": losses}


def _finish_stage(
    stage: str,
    model: nn.Module,
    model_config: dict,
    config: TrainConfig,
    result: TrainResult,
    metrics: dict[str, float],
    ship: bool,
    extra_record: dict | None = None,
    **options,
) -> dict:
    """Writes STAGE.safetensors and STAGE.json (into the package too with `ship`).

    Returns:
        the record: model and training configs, stage options, the command that
        repeats the run, wall time, hardware, and the training and evaluation
        metrics.
    """
    from sdlearn.weights import SHIPPED_DIR, write_shipped

    log = result.out_dir / "log.jsonl"
    history = loss_history(log) if log.is_file() else {}
    record = {
        "model_config": model_config,
        "train_config": config.to_dict(),
        **options,
        "command": _command(stage, config, **options),
        "seconds": round(result.seconds, 1),
        "hardware": result.hardware,
        "metrics": {**result.metrics, **metrics},
        "versions": {"torch": torch.__version__},
        **(extra_record or {}),
        "loss_history": history,
    }
    if _is_main_process():
        write_shipped(stage, model.state_dict(), record, folder=result.out_dir)
        if ship:
            check_can_ship(shipped_files(stage))
            write_shipped(stage, model.state_dict(), record, folder=SHIPPED_DIR)
    return record


def shipped_files(stage: str) -> list[Path]:
    """The files of the package that `sdlearn train STAGE --ship` overwrites."""
    from sdlearn.weights import SHIPPED_DIR

    return [SHIPPED_DIR / f"{stage}.safetensors", SHIPPED_DIR / f"{stage}.json"]


STAGES: dict[str, Callable[..., dict]] = {
    "vae": train_vae,
    "clip": train_clip,
    "unet": train_unet,
}
