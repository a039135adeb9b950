"""Fine-tuning the shipped model on what it never saw (chapter 09).

`sdlearn train lora` teaches a pipeline's UNet a new shape of
`shapes.NEW_SHAPES` through LoRA adapters (`sdlearn.lora`), with the training
loop of chapter 07 (`sdlearn.training.train`) and its diffusion loss, and scores
the new shape and the base shapes before and after.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from sdlearn.training import (
    DiffusionLoss,
    TrainConfig,
    _command,
    _is_main_process,
    encode_shapes,
    loss_history,
    train,
)


def train_lora(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    ship: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    eval_images: int = 60,
    checkpoint: str | Path | None = None,
    concept: str = "diamond",
    rank: int = 8,
    alpha: float | None = None,
    images: int = 2000,
    prior_images: int = 0,
    caption_dropout: float = 0.1,
) -> dict:
    """Fine-tune a pipeline's UNet on a new shape through LoRA adapters (chapter 09).

    The base model stays frozen; adapters on the UNet's attention projections
    learn from captioned pictures of `concept`, a shape of `shapes.NEW_SHAPES`
    the base model never saw. With `prior_images`, pictures of the base shapes
    join the data (DreamBooth's prior preservation), so that the adapters learn
    the new shape without unlearning the old ones.

    Args:
        checkpoint: the base pipeline (`StableDiffusionPipeline.from_pretrained`'s
            path); the tiny model shipped in the package by default.
        concept: the new shape to teach.
        rank, alpha: the adapters' (see `sdlearn.lora.LoRALinear`).
        images: pictures of the new shape to train on.
        prior_images: pictures of the base shapes mixed in.
        caption_dropout: how often the caption becomes the empty prompt.
        eval_images: about how many images per prompt set the end-of-run
            evaluation draws (the concept's prompts, and the base model's before
            and after, all scored with the new shapes among the shapes); 0 skips
            it.
        ship: not for adapters (they are not part of the shipped model).
        (the rest as for `train_vae`)

    Returns:
        the record written to lora.json next to lora.safetensors.
    """
    from torch.utils.data import ConcatDataset

    from sdlearn.lora import add_lora, save_lora, set_lora_scale
    from sdlearn.pipeline import StableDiffusionPipeline
    from sdlearn.shapes import ALL_SHAPES, NEW_SHAPES, ShapesDataset

    if ship:
        raise ValueError("adapters are not shipped; load them with --lora")
    if concept not in NEW_SHAPES:
        raise ValueError(f"expected a new shape of {NEW_SHAPES}, got {concept!r}")
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)

    # 1. the frozen base model, and the new shape's pictures through it once
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    pipe.progress = False
    data = ShapesDataset("all", length=images, seed=config.seed, shapes=(concept,))
    if prior_images:
        prior = ShapesDataset("train", length=prior_images, seed=config.seed + 1)
        data = ConcatDataset([data, prior])
    items, text_tokens, _ = encode_shapes(
        pipe.vae, pipe.text_encoder, pipe.tokenizer, data, progress=progress
    )

    # 2. the base shapes' scores before, then train the adapters
    metrics: dict[str, float] = {}
    sets = {}
    if eval_images:
        from sdlearn.evaluate import concept_prompts, evaluation_prompts

        sets = {"base": evaluation_prompts()["single-object"]}
        seeds = max(1, round(eval_images / len(sets["base"])))
        metrics.update(_scores(pipe, {"base before": sets["base"]}, seeds))
        sets[concept] = concept_prompts(concept)
    adapters = add_lora(pipe.unet, rank=rank, alpha=alpha)
    loss = DiffusionLoss(
        pipe.unet,
        pipe.scheduler,
        text_tokens,
        pipe.vae.config.scaling_factor,
        caption_dropout,
    )
    result = train(
        loss,
        items,
        config,
        out_dir,
        resume=resume,
        progress=progress,
        description=f"train lora ({concept})",
        stop_at=stop_at,
    )
    pipe.unet.cpu().eval()

    # 3. the adapters' scores: the new shape, and what the base shapes kept
    if eval_images:
        set_lora_scale(pipe.unet, 1.0)
        metrics.update(
            _scores(pipe, {concept: sets[concept], "base after": sets["base"]}, seeds)
        )
    options = {
        "concept": concept,
        "rank": rank,
        "alpha": rank if alpha is None else alpha,
        "images": images,
        "prior_images": prior_images,
        "caption_dropout": caption_dropout,
    }
    log = out_dir / "log.jsonl"
    record = {
        "train_config": config.to_dict(),
        **options,
        "command": _command("lora", config, ship=False, **options),
        "seconds": round(result.seconds, 1),
        "hardware": result.hardware,
        "trainable_parameters": sum(
            p.numel()
            for a in adapters.values()
            for p in a.parameters()
            if p.requires_grad
        ),
        "metrics": {**result.metrics, **metrics},
        "shapes_scored": list(ALL_SHAPES),
        "versions": {"torch": torch.__version__},
        "loss_history": loss_history(log) if log.is_file() else {},
    }
    if _is_main_process():
        path = save_lora(pipe.unet, out_dir / "lora.safetensors")
        record["adapter_bytes"] = path.stat().st_size
        (out_dir / "lora.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _scores(pipe, prompt_sets: dict[str, list[str]], seeds: int) -> dict[str, float]:
    """Accuracies of a pipeline on prompt sets, the new shapes among the shapes."""
    from sdlearn.evaluate import evaluate_pipeline
    from sdlearn.shapes import ALL_SHAPES

    table, _ = evaluate_pipeline(
        pipe, seeds=seeds, prompt_sets=prompt_sets, shapes=ALL_SHAPES
    )
    return {
        f"{name} {key}": value
        for name, scores in table.items()
        for key, value in scores.items()
        if key != "n" and value is not None
    }


# the fine-tuning commands: `sdlearn train lora`, not part of `sdlearn train all`
FINE_TUNES: dict[str, Callable[..., dict]] = {"lora": train_lora}
