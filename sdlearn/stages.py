"""Chapter 07: the stages `sdlearn train STAGE` runs, each a recipe for the loop.

A stage builds its model, its data and the module whose forward is the loss of
one batch, hands them to `sdlearn.training.train`, evaluates what comes out and
writes the weights with a record (the model and training configs, the command
that repeats the run, wall time, hardware and metrics):

- `train_vae`: the autoencoder of chapter 02 on the shapes images;
- `train_clip`: the contrastive CLIP of chapter 03 on images and captions;
- `train_unet`: the UNet of chapter 04 on the frozen VAE's latents,
  conditioned on the frozen CLIP's text tokens, with `DiffusionLoss`.

`--ship` writes into the package (sdlearn/data/tiny/), from a source checkout
only.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from sdlearn import shapes as S
from sdlearn.clip import (
    ContrastiveCLIP,
    ContrastiveCLIPConfig,
    ContrastiveLoss,
    contrastive_config_from_record,
    zero_shot_accuracy,
)
from sdlearn.diffusion_loss import DiffusionLoss
from sdlearn.evaluate import evaluate_pipeline, evaluation_prompts, flat_metrics, score
from sdlearn.pipeline import StableDiffusionPipeline
from sdlearn.schedulers.common import scheduler_to_config
from sdlearn.schedulers.ddpm import DDPMScheduler
from sdlearn.shapes import ALL_SHAPES, ALL_STYLES, SHAPES, STYLES, ShapesDataset
from sdlearn.tokenizer import CLIPTokenizer
from sdlearn.training import (
    NOT_RESULTS,
    TrainConfig,
    TrainResult,
    is_main_process,
    train,
)
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig, VAELoss, psnr
from sdlearn.weights import (
    SHIPPED_DIR,
    config_from_json,
    load_checked,
    read_shipped,
    write_shipped,
)

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


def command_line(stage: str, config: TrainConfig, ship: bool = True, **options) -> str:
    """The `sdlearn train` command line that repeats a run with these settings
    (with --ship for the stages whose weights the package ships)."""
    defaults = STAGE_DEFAULTS[stage].to_dict()
    settings = {
        key: value
        for key, value in config.to_dict().items()
        if value != defaults[key] and key not in NOT_RESULTS
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


@dataclass(frozen=True)
class UNetStageConfig:
    """What stage 3 trains the UNet on, besides the `TrainConfig`."""

    # where vae.safetensors and clip.safetensors are (with their .json
    # records); None: the ones shipped in the package
    parts_dir: str | Path | None = None
    # how often the caption becomes the empty prompt
    caption_dropout: float = 0.1
    # how many training images to encode once and sample batches from
    images: int = 40_000
    # the diffusion's number of noise levels T
    num_train_timesteps: int = 1000
    # the noise schedule, one of DDPMScheduler's (SD 1.x's "scaled_linear");
    # the record keeps the scheduler's config
    beta_schedule: str = "scaled_linear"
    # about how many images the end-of-run evaluation draws, a few seeds of
    # every evaluation prompt (see `sdlearn.evaluate`); 0 skips it
    eval_images: int = 256


def train_unet(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    ship: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    **settings,
) -> dict:
    """Stage 3: the tiny UNet, on the latents of the frozen tiny VAE, conditioned
    on the frozen tiny CLIP's text tokens (chapter 07).

    Args:
        settings: fields of `UNetStageConfig`, by name (images=10_000, ...).
        (the rest as for `train_vae`)

    Returns:
        the record written to unet.json.
    """
    stage = UNetStageConfig(**settings)
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)

    # 1. the frozen parts, and the dataset through them once
    vae, clip = _frozen_parts(stage.parts_dir)
    tokenizer = CLIPTokenizer()
    data = ShapesDataset("train", length=stage.images, image_size=64, seed=config.seed)
    items, text_tokens, _ = encode_shapes(
        vae, clip.text_model, tokenizer, data, progress=progress
    )

    # 2. train the UNet to predict the noise
    unet = UNet(UNetConfig.tiny(cross_attention_dim=clip.text_model.config.hidden_size))
    scheduler = DDPMScheduler(
        num_train_timesteps=stage.num_train_timesteps,
        beta_schedule=stage.beta_schedule,
    )
    loss = DiffusionLoss(
        unet, scheduler, text_tokens, vae.config.scaling_factor, stage.caption_dropout
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
    pipe = StableDiffusionPipeline(tokenizer, clip.text_model, vae, unet, scheduler)
    metrics = _pipeline_scores(pipe, stage.eval_images) if stage.eval_images else {}
    recorded = ("caption_dropout", "images", "num_train_timesteps", "beta_schedule")
    options = {k: getattr(stage, k) for k in recorded}
    parts_dir = None
    if stage.parts_dir is not None:
        # relative to this run's folder, so that loading the run finds them
        parts_dir = os.path.relpath(Path(stage.parts_dir).resolve(), out_dir.resolve())
    return _finish_stage(
        "unet",
        unet,
        asdict(unet.config),
        config,
        result,
        metrics,
        ship,
        extra_record={
            "scheduler_config": scheduler_to_config(scheduler),
            # where its VAE and CLIP came from (None: the package's)
            "parts_dir": parts_dir,
        },
        **options,
    )


def _pipeline_scores(pipe: StableDiffusionPipeline, images: int) -> dict[str, float]:
    """The evaluation's accuracies for about `images` images, a few seeds of
    every evaluation prompt (`sdlearn.evaluate`)."""
    prompts = sum(len(p) for p in evaluation_prompts().values())
    table, _ = evaluate_pipeline(pipe, seeds=max(1, round(images / prompts)))
    return flat_metrics(table)


def _frozen_parts(
    parts_dir: str | Path | None,
) -> tuple[AutoencoderKL, ContrastiveCLIP]:
    """The trained VAE and CLIP in `parts_dir` (or, as `sdlearn train all`
    leaves them, in its vae/ and clip/ subfolders; the package's for None), in
    eval mode."""
    parts = SHIPPED_DIR if parts_dir is None else Path(parts_dir)

    def folder(name: str) -> Path:
        inside = parts / name
        return inside if (inside / f"{name}.safetensors").exists() else parts

    state, record = read_shipped("vae", folder=folder("vae"))
    vae = AutoencoderKL(VAEConfig(**config_from_json(record["model_config"])))
    load_checked(vae, state, str(folder("vae") / "vae.safetensors")).eval()
    state, record = read_shipped("clip", folder=folder("clip"))
    clip = ContrastiveCLIP(contrastive_config_from_record(record["model_config"]))
    load_checked(clip, state, str(folder("clip") / "clip.safetensors")).eval()
    return vae, clip


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

    log = result.out_dir / "log.jsonl"
    history = loss_history(log) if log.is_file() else {}
    record = {
        "model_config": model_config,
        "train_config": config.to_dict(),
        **options,
        "command": command_line(stage, config, **options),
        "seconds": round(result.seconds, 1),
        "hardware": result.hardware,
        "metrics": {**result.metrics, **metrics},
        "versions": {"torch": torch.__version__},
        **(extra_record or {}),
        "loss_history": history,
    }
    if is_main_process():
        write_shipped(stage, model.state_dict(), record, folder=result.out_dir)
        if ship:
            check_can_ship(shipped_files(stage))
            write_shipped(stage, model.state_dict(), record, folder=SHIPPED_DIR)
    return record


def shipped_files(stage: str) -> list[Path]:
    """The files of the package that `sdlearn train STAGE --ship` overwrites."""

    return [SHIPPED_DIR / f"{stage}.safetensors", SHIPPED_DIR / f"{stage}.json"]


STAGES: dict[str, Callable[..., dict]] = {
    "vae": train_vae,
    "clip": train_clip,
    "unet": train_unet,
}
