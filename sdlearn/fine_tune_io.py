"""Chapter 09: the fine-tunes the package ships and the runs of `sdlearn train
lora|dreambooth|textual-inversion`: reading them and applying them to the base
pipeline they were trained on (checked by its weights' digest).

    pipe, record = load_fine_tune("lora", "diamond")  # shipped
    pipe, record = load_fine_tune_run("runs/lora")  # a run folder
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sdlearn.lora import load_lora
from sdlearn.pipeline import StableDiffusionPipeline
from sdlearn.pipeline_io import from_pretrained
from sdlearn.textual_inversion import load_learned_embeds
from sdlearn.weights import load_checked, weights_digest

METHODS: tuple[str, ...] = ("lora", "dreambooth", "textual-inversion")

# where `--ship` puts the records (and the small files) of chapter 09's runs
FINE_TUNES_DIR = Path(__file__).resolve().parent / "data" / "fine_tunes"

# the text encoder's trained weights, with `train_text_encoder`
TEXT_ENCODER_FILE = "text_encoder.safetensors"

# what each method writes next to its METHOD.json record
ARTIFACTS: dict[str, str] = {
    "lora": "lora.safetensors",
    "dreambooth": "pipeline",  # a diffusers folder: sdlearn generate --checkpoint
    "textual-inversion": "learned_embeds.safetensors",
}


def shipped_fine_tune_files(method: str, concept: str) -> list[Path]:
    """The files of the package that `sdlearn train METHOD --concept CONCEPT
    --ship` writes (and overwrites where they exist)."""
    name = f"{method}-{concept}"
    return [FINE_TUNES_DIR / f"{name}.safetensors", FINE_TUNES_DIR / f"{name}.json"]


def read_fine_tune(method: str, concept: str = "diamond") -> tuple[dict, Path]:
    """The record of a shipped fine-tune (`sdlearn train METHOD --ship`) and its
    .safetensors file: the LoRA adapter, the learned embedding, or DreamBooth's
    UNet weights (diffusers' names, as `UNet.load_state_dict` takes them).
    """
    name = f"{method}-{concept}"
    path = FINE_TUNES_DIR / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run `sdlearn train {method} --concept {concept} "
            "--ship` to make it"
        )
    artifact = FINE_TUNES_DIR / f"{name}.safetensors"
    if not artifact.exists():
        raise FileNotFoundError(f"{artifact} is missing, though {path.name} is there")
    return json.loads(path.read_text()), artifact


def load_fine_tune(
    method: str, concept: str = "diamond"
) -> tuple[StableDiffusionPipeline, dict]:
    """The shipped pipeline with a shipped fine-tune applied (its adapter, UNet
    or learned word, and the learned word of a LoRA or DreamBooth run that
    trained one), and the fine-tune's record.

    Returns:
        (pipeline, record); prompts name the concept by `record["token"]`.
    """

    record, artifact = read_fine_tune(method, concept)
    files = {
        "artifact": artifact,
        "embedding": artifact.with_name(f"{artifact.stem}-embedding.safetensors"),
        "text_encoder": artifact.with_name(f"{artifact.stem}-text-encoder.safetensors"),
    }
    pipe = from_pretrained()
    apply_fine_tune(pipe, record, files, artifact.stem)
    return pipe, record


def shipped_fine_tunes() -> dict[str, tuple[str, str]]:
    """The fine-tunes shipped in the package by name ("lora-diamond",
    "dreambooth-ring"...): {name: (method, concept)}."""
    found = {}
    for path in sorted(FINE_TUNES_DIR.glob("*.json")):
        record = json.loads(path.read_text())
        found[path.stem] = (record["method"], path.stem[len(record["method"]) + 1 :])
    return found


def fine_tune_run_method(folder: str | Path) -> str | None:
    """The method of a `sdlearn train lora|dreambooth|textual-inversion` run
    folder (the one whose METHOD.json record it holds), or None."""
    found = [m for m in METHODS if (Path(folder) / f"{m}.json").is_file()]
    return found[0] if found else None


def load_fine_tune_run(
    folder: str | Path, base: str | Path | None = None
) -> tuple[StableDiffusionPipeline, dict]:
    """A pipeline with the fine-tune a run folder holds, and the run's record.

    Args:
        folder: what `sdlearn train lora|dreambooth|textual-inversion --out`
            wrote.
        base: the pipeline the run fine-tuned (its `--base`); the shipped one
            by default. Its weights must be the ones the record names.
    """

    folder = Path(folder)
    method = fine_tune_run_method(folder)
    if method is None:
        raise FileNotFoundError(
            f"{folder} holds no fine-tune record (one of "
            f"{', '.join(f'{m}.json' for m in METHODS)})"
        )
    record = json.loads((folder / f"{method}.json").read_text())
    files = {
        "artifact": folder / ARTIFACTS[method],
        "embedding": folder / record.get("embedding", ARTIFACTS["textual-inversion"]),
        "text_encoder": folder / record.get("text_encoder", TEXT_ENCODER_FILE),
    }
    if method == "dreambooth":  # the run saved its whole pipeline
        pipe = from_pretrained(files["artifact"])
        if "text_encoder" in record:
            load_text_encoder_blocks(pipe.text_encoder, files["text_encoder"])
        return pipe, record
    pipe = from_pretrained(base)
    apply_fine_tune(pipe, record, files, str(folder))
    return pipe, record


def apply_fine_tune(
    pipe: StableDiffusionPipeline, record: dict, files: dict[str, Path], name: str
) -> None:
    """Apply a fine-tune's files to the base pipeline it was trained on:
    {"artifact": the adapter, UNet or embedding; "embedding": a new word's
    embedding; "text_encoder": the text encoder's trained blocks}."""

    method, artifact = record["method"], files["artifact"]
    if record.get("base") != (digest := base_digest(pipe)):
        raise ValueError(
            f"{name} was trained on another base pipeline (weights digest "
            f"{record.get('base')}, this one's is {digest}): "
            f"re-make it with `{record['command']}`"
        )
    if method == "lora":
        load_lora(pipe.unet, artifact, prefix="unet")
    elif method == "dreambooth":
        load_checked(pipe.unet, load_file(artifact), str(artifact))
    if method == "textual-inversion":
        load_learned_embeds(pipe.tokenizer, pipe.text_encoder, artifact)
    elif "embedding" in record:
        load_learned_embeds(pipe.tokenizer, pipe.text_encoder, files["embedding"])
    if "text_encoder" in record:
        load_text_encoder_blocks(pipe.text_encoder, files["text_encoder"])


def base_digest(pipe: StableDiffusionPipeline) -> str:
    """The digest of a pipeline's UNet, VAE and text encoder weights
    (`sdlearn.weights.weights_digest`): a fine-tune's record keeps its base's."""

    return weights_digest(pipe.unet, pipe.vae, pipe.text_encoder)


def trained_text_encoder(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """What `train_text_encoder` trains: every weight but the token table."""
    return {
        key: value.detach().contiguous()
        for key, value in text_encoder.state_dict().items()
        if not key.startswith("embeddings.token_embedding")
    }


def load_text_encoder_blocks(text_encoder: nn.Module, path: str | Path) -> nn.Module:
    """Loads a fine-tune's text-encoder file (every weight but the token table)
    into `text_encoder`, checking every key and shape against it."""

    state = text_encoder.state_dict()
    trained = load_file(str(path))
    missing = sorted(set(trained_text_encoder(text_encoder)) - set(trained))
    if missing:
        raise ValueError(f"{path} lacks the text encoder's {missing}")
    return load_checked(text_encoder, {**state, **trained}, str(path))
