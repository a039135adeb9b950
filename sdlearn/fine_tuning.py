"""Fine-tuning the shipped model on what it never saw (chapter 09).

Three ways to teach a trained pipeline a new concept, a shape of
`shapes.NEW_SHAPES` or a style of `shapes.NEW_STYLES`, each with the training
loop of chapter 07 (`sdlearn.training.train`) and its diffusion loss, each
scoring the new concept and the base shapes before and after:

- LoRA (`sdlearn train lora`): low-rank adapters on the UNet's attention
  projections (`sdlearn.lora`); the base weights stay frozen; a small file.
- DreamBooth (`sdlearn train dreambooth`, Ruiz et al. 2022): the whole UNet
  trains, on captions that name the concept by a rare token ("sks"), with
  pictures of the base shapes mixed in (prior preservation); a whole pipeline.
- Textual inversion (`sdlearn train textual-inversion`, Gal et al. 2022): one
  new word ("<diamond>") and its embedding row train, everything else frozen
  (`sdlearn.textual_inversion`); a file of 64 numbers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from sdlearn.lora import ATTENTION_TARGETS, RESNET_CONV_TARGETS
from sdlearn.shapes import (
    ALL_SHAPES,
    ALL_STYLES,
    NEW_SHAPES,
    NEW_STYLES,
    SHAPES,
    STYLES,
    ShapesDataset,
)

if TYPE_CHECKING:
    from sdlearn.pipeline import StableDiffusionPipeline
from sdlearn.training import (
    CHECKPOINT,
    DiffusionLoss,
    TrainConfig,
    TrainResult,
    _command,
    _is_main_process,
    check_can_ship,
    encode_shapes,
    load_checkpoint,
    loss_history,
    train,
)

METHODS: tuple[str, ...] = ("lora", "dreambooth", "textual-inversion")

# what a fine-tune can teach: a new shape ("a red diamond") or a new style of the
# base shapes ("a red hollow square")
CONCEPTS: tuple[str, ...] = NEW_SHAPES + NEW_STYLES

# the word a new shape's captions use, per method: its own (LoRA), a rare token
# of CLIP's vocabulary that names it (DreamBooth), or a new word (textual inversion)
DREAMBOOTH_TOKEN = "sks"

# the word of the vocabulary a new word's embedding starts from
INITIALIZERS: dict[str, str] = {"diamond": "square", "ring": "circle", "hollow": "ring"}

# which layers of the UNet a LoRA adapts
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_TARGETS,
    "cross-kv": ("attn2.to_k", "attn2.to_v"),
    "attention+convs": ATTENTION_TARGETS + RESNET_CONV_TARGETS,
}

# where `--ship` puts the records (and the small files) of chapter 09's runs
FINE_TUNES_DIR = Path(__file__).resolve().parent / "data" / "fine_tunes"

# the text encoder's trained weights, with `train_text_encoder`
TEXT_ENCODER_FILE = "text_encoder.safetensors"

# the scores along a run (`eval_every`), a line per evaluation
SCORES_LOG = "scores.jsonl"

# what each method writes next to its METHOD.json record
ARTIFACTS: dict[str, str] = {
    "lora": "lora.safetensors",
    "dreambooth": "pipeline",  # a diffusers folder: sdlearn generate --checkpoint
    "textual-inversion": "learned_embeds.safetensors",
}


class Reworded(Dataset):
    """A dataset whose captions say `wording`'s words instead: {"diamond": "sks"}."""

    def __init__(self, data: Dataset, wording: dict[str, str]) -> None:
        self.data, self.wording = data, wording

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        from sdlearn.evaluate import reword

        item = dict(self.data[index])
        item["caption"] = reword(item["caption"], self.wording)
        return item


class TextEncoderLoss(DiffusionLoss):
    """The diffusion loss with the text encoder in the loop: the captions' token
    ids go through it every step, so the gradient reaches the new token's row
    (and, with `fine_tune(train_text_encoder=True)`, the encoder's blocks).

    Args:
        text_encoder: its token embedding a `NewTokenEmbedding` (or frozen),
            the rest frozen or training.
        caption_ids: (N_captions, 77) token ids, row 0 the empty prompt.
        text_encoder_lr: the learning rate of the text encoder's trainable
            weights; the UNet's (the run's) when None.
        (the rest as for `DiffusionLoss`)
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        text_encoder: nn.Module,
        caption_ids: torch.Tensor,
        scaling_factor: float,
        caption_dropout: float = 0.1,
        timestep_bias: float = 1.0,
        text_encoder_lr: float | None = None,
    ) -> None:
        super().__init__(
            unet, scheduler, caption_ids, scaling_factor, caption_dropout, timestep_bias
        )
        self.text_encoder = text_encoder
        self.text_encoder_lr = text_encoder_lr

    def param_groups(self, lr: float) -> list[dict]:
        """The optimiser's groups: the text encoder's trainable weights at
        `text_encoder_lr`, the rest (the UNet's, if any train) at `lr`."""
        text = [p for p in self.text_encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in text}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [
            {"params": rest, "lr": lr},
            {"params": text, "lr": self.text_encoder_lr or lr},
        ]
        return [group for group in groups if group["params"]]

    def context(self, rows: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(self.text_tokens.to(rows.device)[rows])


def fine_tune(
    method: str,
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    ship: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    eval_images: int = 60,
    checkpoint: str | Path | None = None,
    concept: str = "diamond",
    token: str | None = None,
    images: int = 2000,
    prior_images: int = 0,
    caption_dropout: float = 0.1,
    rank: int = 8,
    targets: str = "attention",
    alpha: float | None = None,
    initializer: str | None = None,
    train_text_encoder: bool = False,
    timestep_bias: float = 1.0,
    text_encoder_lr: float | None = None,
    eval_every: int = 0,
) -> dict:
    """Teach a pipeline a new shape or style by one of `METHODS` (chapter 09).

    The pictures of `concept` are captioned with `token` in place of its name
    ("diamond", "hollow"); with `prior_images`, pictures of the base shapes join
    them (DreamBooth's prior preservation), so that the model learns the new
    concept without unlearning the old ones.

    Args:
        method: "lora", "dreambooth" or "textual-inversion".
        checkpoint: the base pipeline (`StableDiffusionPipeline.from_pretrained`'s
            path); the tiny model shipped in the package by default.
        concept: what to teach, one of `CONCEPTS`: a new shape (its pictures
            in every colour), or a new style (the base shapes in it, in the
            colour-shape pairs the base model trained on).
        token: the word for it in captions and prompts: the shape's own name
            (LoRA), "sks" (DreamBooth), "<concept>" (textual inversion) by default.
            A word the tokenizer does not know as one token, like "<diamond>",
            is added, and its embedding trains beside the rest (any method).
        images: pictures of the new concept to train on.
        prior_images: pictures of the base shapes mixed in; for a style, the
            first of them are the concept pictures' scenes in the base style.
        caption_dropout: how often the caption becomes the empty prompt.
        rank, alpha: LoRA's adapters' (see `sdlearn.lora.LoRALinear`).
        targets: which layers LoRA adapts, a key of `LORA_TARGETS`:
            "attention" (every attention projection, the usual choice),
            "cross-kv" (only the cross-attention's keys and values, where the
            text enters: Custom Diffusion's choice, Kumari et al. 2022), or
            "attention+convs" (and the ResnetBlocks' 3x3 convolutions, as
            LyCORIS's LoCon does).
        initializer: the word a new word's embedding starts from
            (`INITIALIZERS`' by default).
        text_encoder_lr: the learning rate of what trains in the text encoder
            (a new word's embedding, the blocks with `train_text_encoder`); the
            run's by default. Pivotal tuning gives the new word a larger one.
            Refused when nothing of the text encoder trains.
        timestep_bias: how many times more often the noisier half of the
            timesteps is drawn (`sdlearn.training.DiffusionLoss`).
        train_text_encoder: also train the text encoder's blocks (not its
            token table), as diffusers' DreamBooth script can: the captions'
            words can then change what the words after them mean ("sks
            circle"). DreamBooth only: its pipeline folder holds the text
            encoder; the record's "text_encoder" file the trained weights.
        eval_images: about how many images per prompt set the end-of-run
            evaluation draws (the concept's prompts, and the base model's before
            and after, all scored with the new shapes among the shapes, or for a
            style with the styles told apart); 0 skips it.
        eval_every: also score the concept and the base prompts every this
            many steps (with the EMA on, its weights), as at the end: the
            record's "scores_by_step" shows when the concept was learnt. The
            run stops at each and resumes exactly, so the weights are those of
            a run without it. 0 (the default): only at the end.
        ship: also write the record, and the adapter, the embedding or (for
            DreamBooth) the UNet's weights, into the package's `FINE_TUNES_DIR`
            as METHOD-CONCEPT.json and .safetensors, for chapter 09
            (`read_fine_tune`).
        (the rest as for `sdlearn.training.train_vae`)

    Returns:
        the record written to METHOD.json, next to `ARTIFACTS[method]`.
    """

    from sdlearn.lora import add_lora, save_lora
    from sdlearn.pipeline import StableDiffusionPipeline
    from sdlearn.textual_inversion import (
        NewTokenEmbedding,
        add_token,
        save_learned_embeds,
    )

    if method not in METHODS:
        raise ValueError(f"expected a method of {METHODS}, got {method!r}")
    if concept not in CONCEPTS:
        raise ValueError(
            f"expected a concept of {CONCEPTS} (new shapes and styles), got {concept!r}"
        )
    if train_text_encoder and method != "dreambooth":
        raise ValueError(
            f"train_text_encoder is for dreambooth, got method {method!r} (a LoRA "
            "adapter or a learned word is a file for the UNet or the vocabulary)"
        )
    if targets not in LORA_TARGETS:
        raise ValueError(f"expected targets of {tuple(LORA_TARGETS)}, got {targets!r}")
    if token is None:
        defaults = {"lora": concept, "dreambooth": DREAMBOOTH_TOKEN}
        token = defaults.get(method, f"<{concept}>")
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)

    # 1. the base model, and the new concept's pictures through it once; a word
    # the tokenizer does not know as one token is added, and its embedding trains
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    pipe.progress = False
    base = base_digest(pipe)
    new_word = len(pipe.tokenizer.encode(token)) != 1
    if text_encoder_lr is not None and not (new_word or train_text_encoder):
        raise ValueError(
            f"text_encoder_lr={text_encoder_lr} sets the rate of the text encoder's "
            f"trainable weights, but with token {token!r} (in the vocabulary) and no "
            "train_text_encoder none train: give a new word like '<hollow>', or "
            "train_text_encoder for dreambooth"
        )
    if eval_every < 0 or (eval_every and not eval_images):
        raise ValueError(
            f"eval_every={eval_every} scores the run every so many steps with "
            f"eval_images images; expected eval_every >= 0, and eval_images > 0 "
            f"when it is not 0 (got {eval_images})"
        )
    if text_encoder_lr is not None and text_encoder_lr <= 0:
        raise ValueError(f"expected a positive text_encoder_lr, got {text_encoder_lr}")
    if method == "textual-inversion" and not new_word:
        raise ValueError(
            f"textual inversion learns a new word; {token!r} is one of the "
            "vocabulary already: choose one like '<diamond>'"
        )
    if new_word:
        initializer = initializer or INITIALIZERS[concept]
        add_token(pipe.tokenizer, pipe.text_encoder, token, initializer)
    data = concept_data(concept, token, images, prior_images, config.seed)
    items, text_tokens, captions = encode_shapes(
        pipe.vae, pipe.text_encoder, pipe.tokenizer, data, progress=progress
    )

    # 2. the base shapes' scores before
    metrics: dict[str, float] = {}
    sets, seeds = {}, 0
    if eval_images:
        from sdlearn.evaluate import concept_prompts, evaluation_prompts

        sets = {"base": evaluation_prompts()["single-object"]}
        seeds = max(1, round(eval_images / len(sets["base"])))
        metrics.update(_scores(pipe, {"base before": sets["base"]}, seeds, concept))
        sets[concept] = concept_prompts(concept)

    # 3. what trains, and the loss
    pipe.unet.requires_grad_(method == "dreambooth")
    pipe.text_encoder.requires_grad_(train_text_encoder)
    pipe.text_encoder.embeddings.token_embedding.requires_grad_(False)
    if method == "lora":
        add_lora(pipe.unet, rank=rank, alpha=alpha, targets=LORA_TARGETS[targets])
    scale = pipe.vae.config.scaling_factor
    if new_word:
        embeddings = pipe.text_encoder.embeddings
        embeddings["token_embedding"] = NewTokenEmbedding(embeddings.token_embedding)
    if new_word or train_text_encoder:
        loss: DiffusionLoss = TextEncoderLoss(
            pipe.unet,
            pipe.scheduler,
            pipe.text_encoder,
            pipe.tokenizer(captions),
            scale,
            caption_dropout,
            timestep_bias,
            text_encoder_lr,
        )
    else:
        loss = DiffusionLoss(
            pipe.unet,
            pipe.scheduler,
            text_tokens,
            scale,
            caption_dropout,
            timestep_bias,
        )
    trainable = sum(p.numel() for p in loss.parameters() if p.requires_grad)
    sets_along = {concept: sets.get(concept), "base": sets.get("base")}
    result = _train_scored(
        loss,
        items,
        config,
        out_dir,
        lambda: _scores(pipe, sets_along, seeds, concept, {concept: token}),
        eval_every,
        resume=resume,
        progress=progress,
        description=f"train {method} ({concept})",
        stop_at=stop_at,
    )
    pipe.unet.cpu().eval()
    pipe.text_encoder.cpu().eval()
    if new_word:
        embeddings["token_embedding"] = embeddings.token_embedding.to_embedding()

    # 4. the scores after: the new concept, and what the base shapes kept
    if eval_images:
        after = {concept: sets[concept], "base after": sets["base"]}
        metrics.update(_scores(pipe, after, seeds, concept, {concept: token}))
    options = {
        "concept": concept,
        "token": token,
        "images": images,
        "prior_images": prior_images,
        "caption_dropout": caption_dropout,
        **(
            {
                "rank": rank,
                "lora_alpha": rank if alpha is None else alpha,
                "targets": targets,
            }
            if method == "lora"
            else {}
        ),
        **({"initializer": initializer} if new_word else {}),
        **({"train_text_encoder": True} if train_text_encoder else {}),
        **({"timestep_bias": timestep_bias} if timestep_bias != 1 else {}),
        **({"text_encoder_lr": text_encoder_lr} if text_encoder_lr else {}),
        **({"eval_every": eval_every} if eval_every else {}),
    }
    log = out_dir / "log.jsonl"
    scored = out_dir / SCORES_LOG
    record = {
        "method": method,
        "train_config": config.to_dict(),
        **options,
        "command": _command(method, config, ship=ship, **options),
        "base": base,
        "seconds": round(result.seconds, 1),
        "hardware": result.hardware,
        "trainable_parameters": trainable,
        "metrics": {**result.metrics, **metrics},
        "shapes_scored": list(_told_apart(concept)[0]),
        "styles_scored": list(_told_apart(concept)[1]),
        "versions": {"torch": torch.__version__},
        "loss_history": loss_history(log) if log.is_file() else {},
        **({"scores_by_step": _scores_by_step(scored)} if eval_every else {}),
    }
    if _is_main_process():
        path = out_dir / ARTIFACTS[method]
        if method == "lora":
            save_lora(pipe.unet, path)
        elif method == "dreambooth":
            pipe.save_pretrained(path)  # the new word too, if there is one
        if new_word:
            embedding = out_dir / ARTIFACTS["textual-inversion"]
            save_learned_embeds(pipe.tokenizer, pipe.text_encoder, token, embedding)
            record["embedding"] = embedding.name
        if train_text_encoder:
            encoder = out_dir / TEXT_ENCODER_FILE
            save_file(_trained_text_encoder(pipe.text_encoder), str(encoder))
            record["text_encoder"] = encoder.name
        files = [path] if path.is_file() else [p for p in path.rglob("*.safetensors")]
        record["artifact"] = path.name
        record["artifact_bytes"] = sum(f.stat().st_size for f in files)
        text = json.dumps(record, indent=2) + "\n"
        (out_dir / f"{method}.json").write_text(text)
        if ship:
            check_can_ship(shipped_fine_tune_files(method, concept))
            FINE_TUNES_DIR.mkdir(parents=True, exist_ok=True)
            name = f"{method}-{concept}"
            (FINE_TUNES_DIR / f"{name}.json").write_text(text)
            shipped = FINE_TUNES_DIR / f"{name}.safetensors"
            if path.is_file():
                shutil.copyfile(path, shipped)
            else:  # DreamBooth: the UNet alone (4 MB), not the whole pipeline
                shutil.copyfile(
                    path / "unet" / "diffusion_pytorch_model.safetensors", shipped
                )
            if new_word and method != "textual-inversion":
                shutil.copyfile(
                    embedding, FINE_TUNES_DIR / f"{name}-embedding.safetensors"
                )
            if train_text_encoder:
                shutil.copyfile(
                    encoder, FINE_TUNES_DIR / f"{name}-text-encoder.safetensors"
                )
    return record


def shipped_fine_tune_files(method: str, concept: str) -> list[Path]:
    """The files of the package that `sdlearn train METHOD --concept CONCEPT
    --ship` writes (and overwrites where they exist)."""
    name = f"{method}-{concept}"
    return [FINE_TUNES_DIR / f"{name}.safetensors", FINE_TUNES_DIR / f"{name}.json"]


def concept_data(
    concept: str, token: str, images: int, prior_images: int = 0, seed: int = 0
) -> Dataset:
    """A fine-tune's training pictures: `images` of the concept, captioned with
    `token` for its name, then `prior_images` of the base shapes (DreamBooth's
    prior preservation).

    A new shape is drawn in every colour. A new style is drawn on the base
    shapes of the training split, and the prior's first pictures are the same
    scenes in the base style: pairs that differ in nothing but the style and
    its word.
    """
    if concept in NEW_STYLES:
        data: Dataset = ShapesDataset(
            "train", length=images, seed=seed, styles=(concept,)
        )
    else:
        data = ShapesDataset("all", length=images, seed=seed, shapes=(concept,))
    data = Reworded(data, {concept: token})
    if prior_images:
        prior_seed = seed if concept in NEW_STYLES else seed + 1
        prior = ShapesDataset("train", length=prior_images, seed=prior_seed)
        data = ConcatDataset([data, prior])
    return data


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
    from sdlearn.pipeline import StableDiffusionPipeline

    record, artifact = read_fine_tune(method, concept)
    files = {
        "artifact": artifact,
        "embedding": artifact.with_name(f"{artifact.stem}-embedding.safetensors"),
        "text_encoder": artifact.with_name(f"{artifact.stem}-text-encoder.safetensors"),
    }
    pipe = StableDiffusionPipeline.from_pretrained()
    _apply_fine_tune(pipe, record, files, artifact.stem)
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
    from sdlearn.pipeline import StableDiffusionPipeline

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
        pipe = StableDiffusionPipeline.from_pretrained(files["artifact"])
        if "text_encoder" in record:
            load_text_encoder_blocks(pipe.text_encoder, files["text_encoder"])
        return pipe, record
    pipe = StableDiffusionPipeline.from_pretrained(base)
    _apply_fine_tune(pipe, record, files, str(folder))
    return pipe, record


def _apply_fine_tune(
    pipe: StableDiffusionPipeline, record: dict, files: dict[str, Path], name: str
) -> None:
    """Apply a fine-tune's files to the base pipeline it was trained on:
    {"artifact": the adapter, UNet or embedding; "embedding": a new word's
    embedding; "text_encoder": the text encoder's trained blocks}."""
    from safetensors.torch import load_file

    from sdlearn.weights import load_checked

    method, artifact = record["method"], files["artifact"]
    if record.get("base") != (digest := base_digest(pipe)):
        raise ValueError(
            f"{name} was trained on another base pipeline (weights digest "
            f"{record.get('base')}, this one's is {digest}): "
            f"re-make it with `{record['command']}`"
        )
    if method == "lora":
        pipe.load_lora(artifact)
    elif method == "dreambooth":
        load_checked(pipe.unet, load_file(artifact), str(artifact))
    if method == "textual-inversion":
        pipe.load_textual_inversion(artifact)
    elif "embedding" in record:
        pipe.load_textual_inversion(files["embedding"])
    if "text_encoder" in record:
        load_text_encoder_blocks(pipe.text_encoder, files["text_encoder"])


def base_digest(pipe: StableDiffusionPipeline) -> str:
    """The digest of a pipeline's UNet, VAE and text encoder weights
    (`sdlearn.weights.weights_digest`): a fine-tune's record keeps its base's."""
    from sdlearn.weights import weights_digest

    return weights_digest(pipe.unet, pipe.vae, pipe.text_encoder)


def _trained_text_encoder(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """What `train_text_encoder` trains: every weight but the token table."""
    return {
        key: value.detach().contiguous()
        for key, value in text_encoder.state_dict().items()
        if not key.startswith("embeddings.token_embedding")
    }


def _train_scored(
    loss: nn.Module,
    items,
    config: TrainConfig,
    out_dir: Path,
    score: Callable[[], dict[str, float]],
    every: int,
    resume: bool = False,
    stop_at: int | None = None,
    **kwargs,
) -> TrainResult:
    """`sdlearn.training.train`, stopped every `every` steps (0: never) to
    `score()` the model, a line of out_dir/SCORES_LOG each. A stopped `train`
    leaves the EMA's weights in the model when the EMA is on, and its
    checkpoint the live ones, from which the run resumes exactly: the weights
    are an unstopped run's."""
    log, checkpoint = out_dir / SCORES_LOG, out_dir / CHECKPOINT
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    done = 0
    if resume and checkpoint.exists():
        done = int(load_checkpoint(checkpoint)["step"])
    elif _is_main_process():
        log.unlink(missing_ok=True)
    for mark in range(every, end, every) if every else ():
        if mark <= done:
            continue
        train(loss, items, config, out_dir, resume=resume, stop_at=mark, **kwargs)
        resume = True
        metrics = score()
        if _is_main_process():
            with open(log, "a") as f:
                f.write(json.dumps({"step": mark, **metrics}) + "\n")
    return train(loss, items, config, out_dir, resume=resume, stop_at=stop_at, **kwargs)


def _scores_by_step(log: Path) -> dict[str, list]:
    """SCORES_LOG as {"step": [...], "<set> <attribute>": [...]}, rounded."""
    lines = log.read_text().splitlines() if log.is_file() else []  # none: too short
    rows = [json.loads(line) for line in lines if line]
    keys = list(rows[0]) if rows else ["step"]
    return {k: [round(r[k], 1) if k != "step" else r[k] for r in rows] for k in keys}


def load_text_encoder_blocks(text_encoder: nn.Module, path: str | Path) -> nn.Module:
    """Loads a fine-tune's text-encoder file (every weight but the token table)
    into `text_encoder`, checking every key and shape against it."""
    from safetensors.torch import load_file

    from sdlearn.weights import load_checked

    state = text_encoder.state_dict()
    trained = load_file(str(path))
    missing = sorted(set(_trained_text_encoder(text_encoder)) - set(trained))
    if missing:
        raise ValueError(f"{path} lacks the text encoder's {missing}")
    return load_checked(text_encoder, {**state, **trained}, str(path))


def train_lora(config: TrainConfig, out_dir: str | Path, **kwargs) -> dict:
    """`fine_tune("lora", ...)`: adapters on the UNet's attention projections."""
    return fine_tune("lora", config, out_dir, **kwargs)


def train_dreambooth(config: TrainConfig, out_dir: str | Path, **kwargs) -> dict:
    """`fine_tune("dreambooth", ...)`: the whole UNet, with a rare token."""
    return fine_tune("dreambooth", config, out_dir, **kwargs)


def train_textual_inversion(config: TrainConfig, out_dir: str | Path, **kwargs) -> dict:
    """`fine_tune("textual-inversion", ...)`: one new word's embedding."""
    return fine_tune("textual-inversion", config, out_dir, **kwargs)


def _told_apart(concept: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The shapes and the styles a concept's evaluation tells apart: for a new
    shape every shape, for a style the base shapes (a hollow circle is not a
    ring there) and every style, so a hollow drawing for a base prompt is wrong."""
    if concept in NEW_STYLES:
        return SHAPES, ALL_STYLES
    return ALL_SHAPES, STYLES


def _scores(
    pipe,
    prompt_sets: dict[str, list[str]],
    seeds: int,
    concept: str,
    wording: dict[str, str] | None = None,
) -> dict[str, float]:
    """Accuracies of a pipeline on prompt sets, scored as `_told_apart(concept)`."""
    from sdlearn.evaluate import evaluate_pipeline, flat_metrics

    shapes, styles = _told_apart(concept)
    table, _ = evaluate_pipeline(
        pipe,
        seeds=seeds,
        prompt_sets=prompt_sets,
        shapes=shapes,
        styles=styles,
        wording=wording,
    )
    return flat_metrics(table)


# the fine-tuning commands (`sdlearn train lora`...), not part of `sdlearn train all`
FINE_TUNES: dict[str, Callable[..., dict]] = {
    "lora": train_lora,
    "dreambooth": train_dreambooth,
    "textual-inversion": train_textual_inversion,
}
