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

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import ConcatDataset, Dataset

from sdlearn import fine_tune_io
from sdlearn.diffusion_loss import DiffusionLoss
from sdlearn.evaluate import (
    concept_prompts,
    evaluate_pipeline,
    evaluation_prompts,
    flat_metrics,
    reword,
)
from sdlearn.fine_tune_io import (
    ARTIFACTS,
    METHODS,
    TEXT_ENCODER_FILE,
    base_digest,
    shipped_fine_tune_files,
    trained_text_encoder,
)
from sdlearn.lora import (
    ATTENTION_TARGETS,
    RESNET_CONV_TARGETS,
    add_lora,
    save_lora,
)
from sdlearn.pipeline import StableDiffusionPipeline
from sdlearn.pipeline_io import from_pretrained, save_pretrained
from sdlearn.shapes import (
    ALL_SHAPES,
    ALL_STYLES,
    NEW_SHAPES,
    NEW_STYLES,
    SHAPES,
    STYLES,
    ShapesDataset,
)
from sdlearn.stages import check_can_ship, command_line, encode_shapes, loss_history
from sdlearn.textual_inversion import (
    NewTokenEmbedding,
    TextEncoderLoss,
    add_token,
    save_learned_embeds,
)
from sdlearn.training import (
    CHECKPOINT,
    EvalHook,
    TrainConfig,
    TrainResult,
    is_main_process,
    train,
)

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

# the scores along a run (`eval_every`), a line per evaluation
SCORES_LOG = "scores.jsonl"


class Reworded(Dataset):
    """A dataset whose captions say `wording`'s words instead: {"diamond": "sks"}."""

    def __init__(self, data: Dataset, wording: dict[str, str]) -> None:
        self.data, self.wording = data, wording

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:

        item = dict(self.data[index])
        item["caption"] = reword(item["caption"], self.wording)
        return item


@dataclass(frozen=True)
class FineTuneConfig:
    """What a fine-tune teaches and how (chapter 09). `fine_tune` builds one from
    its keyword settings, `sdlearn train METHOD` from its flags."""

    # how: one of `METHODS`, "lora", "dreambooth" or "textual-inversion"
    method: str = "lora"
    # what to teach, one of `CONCEPTS`: a new shape (its pictures in every
    # colour), or a new style (the base shapes in it, in the colour-shape pairs
    # the base model trained on)
    concept: str = "diamond"
    # the word for it in captions and prompts; None: the shape's own name
    # (LoRA), "sks" (DreamBooth), "<concept>" (textual inversion). A word the
    # tokenizer does not know as one token, like "<diamond>", is added, and its
    # embedding trains beside the rest (any method)
    token: str | None = None
    # the base pipeline (`sdlearn.pipeline_io.from_pretrained`'s path); None:
    # the tiny model shipped in the package
    checkpoint: str | Path | None = None
    # pictures of the new concept to train on
    images: int = 2000
    # pictures of the base shapes mixed in (DreamBooth's prior preservation), so
    # that the model learns the new concept without unlearning the old ones;
    # for a style, the first of them are the concept pictures' scenes in the
    # base style
    prior_images: int = 0
    # how often the caption becomes the empty prompt
    caption_dropout: float = 0.1
    # LoRA's adapters' rank and alpha (see `sdlearn.lora.LoRALinear`)
    rank: int = 8
    alpha: float | None = None
    # which layers LoRA adapts, a key of `LORA_TARGETS`: "attention" (every
    # attention projection, the usual choice), "cross-kv" (only the
    # cross-attention's keys and values, where the text enters: Custom
    # Diffusion's choice, Kumari et al. 2022), or "attention+convs" (and the
    # ResnetBlocks' 3x3 convolutions, as LyCORIS's LoCon does)
    targets: str = "attention"
    # the word a new word's embedding starts from; `INITIALIZERS`' by default
    initializer: str | None = None
    # also train the text encoder's blocks (not its token table), as diffusers'
    # DreamBooth script can: the captions' words can then change what the words
    # after them mean ("sks circle"). DreamBooth only: its pipeline folder holds
    # the text encoder, the record's "text_encoder" file the trained weights
    train_text_encoder: bool = False
    # how many times more often the noisier half of the timesteps is drawn
    # (`sdlearn.diffusion_loss.DiffusionLoss`)
    timestep_bias: float = 1.0
    # the learning rate of what trains in the text encoder (a new word's
    # embedding, the blocks with `train_text_encoder`); the run's by default.
    # Pivotal tuning gives the new word a larger one. Refused when nothing of
    # the text encoder trains
    text_encoder_lr: float | None = None
    # about how many images per prompt set the end-of-run evaluation draws (the
    # concept's prompts, and the base model's before and after, all scored with
    # the new shapes among the shapes, or for a style with the styles told
    # apart); 0 skips it
    eval_images: int = 60
    # also score the concept and the base prompts every this many steps (with
    # the EMA on, its weights), as at the end: the record's "scores_by_step"
    # shows when the concept was learnt; training goes on exactly as without
    # it (`sdlearn.training.EvalHook`). 0: only at the end
    eval_every: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"expected a method of {METHODS}, got {self.method!r}")
        if self.concept not in CONCEPTS:
            raise ValueError(
                f"expected a concept of {CONCEPTS} (new shapes and styles), "
                f"got {self.concept!r}"
            )
        if self.train_text_encoder and self.method != "dreambooth":
            raise ValueError(
                f"train_text_encoder is for dreambooth, got method {self.method!r} "
                "(a LoRA adapter or a learned word is a file for the UNet or the "
                "vocabulary)"
            )
        if self.targets not in LORA_TARGETS:
            raise ValueError(
                f"expected targets of {tuple(LORA_TARGETS)}, got {self.targets!r}"
            )
        if self.eval_every < 0 or (self.eval_every and not self.eval_images):
            raise ValueError(
                f"eval_every={self.eval_every} scores the run every so many steps "
                f"with eval_images images; expected eval_every >= 0, and "
                f"eval_images > 0 when it is not 0 (got {self.eval_images})"
            )
        lr = self.text_encoder_lr
        if lr is not None and lr <= 0:
            raise ValueError(f"expected a positive text_encoder_lr, got {lr}")

    @property
    def word(self) -> str:
        """The token that captions and prompts use for the concept."""
        if self.token is not None:
            return self.token
        defaults = {"lora": self.concept, "dreambooth": DREAMBOOTH_TOKEN}
        return defaults.get(self.method, f"<{self.concept}>")


def fine_tune(
    method: str,
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    ship: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    **settings,
) -> dict:
    """Teach a pipeline a new shape or style by one of `METHODS` (chapter 09).

    The pictures of the concept are captioned with its token in place of its
    name ("diamond", "hollow"); `FineTuneConfig` says what else can change.

    Args:
        method: "lora", "dreambooth" or "textual-inversion".
        config: how to train (`sdlearn.stages.STAGE_DEFAULTS[method]`).
        ship: also write the record, and the adapter, the embedding or (for
            DreamBooth) the UNet's weights, into the package's
            `fine_tune_io.FINE_TUNES_DIR` as METHOD-CONCEPT.json and
            .safetensors, for chapter 09 (`fine_tune_io.read_fine_tune`).
        settings: fields of `FineTuneConfig`, by name (concept="hollow", ...).
        (the rest as for `sdlearn.stages.train_vae`)

    Returns:
        the record written to METHOD.json, next to `ARTIFACTS[method]`.
    """
    # 1. what to teach, checked; the base model, and a new word if there is one
    tune = FineTuneConfig(method=method, **settings)
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    pipe, base, new_word = _base_pipeline(tune)

    # 2. the concept's pictures through the base model once; the base's scores
    concept, token = tune.concept, tune.word
    data = concept_data(concept, token, tune.images, tune.prior_images, config.seed)
    items, text_tokens, captions = encode_shapes(
        pipe.vae, pipe.text_encoder, pipe.tokenizer, data, progress=progress
    )
    sets, seeds, metrics = _scores_before(pipe, tune)

    # 3. what trains, and the loss
    loss = _fine_tune_loss(pipe, tune, new_word, text_tokens, captions)
    trainable = sum(p.numel() for p in loss.parameters() if p.requires_grad)

    # 4. train, scored along the way with `eval_every`
    scorer = _score_along(pipe, tune, sets, seeds, _scores_log(out_dir, resume))
    hook = EvalHook(tune.eval_every, scorer) if tune.eval_every else None
    result = train(
        loss,
        items,
        config,
        out_dir,
        resume=resume,
        progress=progress,
        description=f"train {method} ({concept})",
        stop_at=stop_at,
        evaluate=hook,
    )
    pipe.unet.cpu().eval()
    pipe.text_encoder.cpu().eval()
    if new_word:
        embeddings = pipe.text_encoder.embeddings
        embeddings["token_embedding"] = embeddings.token_embedding.to_embedding()

    # 5. the scores after (the concept, what the base kept), and the record
    if tune.eval_images:
        after = {concept: sets[concept], "base after": sets["base"]}
        metrics.update(_scores(pipe, after, seeds, concept, {concept: token}))
    record = _fine_tune_record(tune, config, ship, new_word, base)
    record |= _run_record(result, metrics, tune, out_dir, trainable)
    if is_main_process():
        _write_fine_tune(pipe, tune, record, out_dir, new_word, ship)
    return record


def _score_along(
    pipe: StableDiffusionPipeline,
    tune: FineTuneConfig,
    sets: dict[str, list[str]],
    seeds: int,
    log: Path,
) -> Callable[[int], None]:
    """`eval_every`'s measurement: scores the concept's and the base's prompts
    and writes them as a line of `log` (on the first process)."""
    concept = tune.concept
    sets_along = {concept: sets.get(concept), "base": sets.get("base")}

    def score(step: int) -> None:
        scores = _scores(pipe, sets_along, seeds, concept, {concept: tune.word})
        if is_main_process():
            with open(log, "a") as f:
                f.write(json.dumps({"step": step, **scores}) + "\n")

    return score


def _base_pipeline(tune: FineTuneConfig) -> tuple[StableDiffusionPipeline, str, bool]:
    """The base pipeline, its weights' digest (before anything changes), and
    whether the token is a new word, which is added to it (from the
    initializer's embedding) to train beside the rest."""
    pipe = from_pretrained(tune.checkpoint)
    pipe.progress = False
    base = base_digest(pipe)
    token = tune.word
    new_word = len(pipe.tokenizer.encode(token)) != 1
    lr = tune.text_encoder_lr
    if lr is not None and not (new_word or tune.train_text_encoder):
        raise ValueError(
            f"text_encoder_lr={lr} sets the rate of the text encoder's "
            f"trainable weights, but with token {token!r} (in the vocabulary) and no "
            "train_text_encoder none train: give a new word like '<hollow>', or "
            "train_text_encoder for dreambooth"
        )
    if tune.method == "textual-inversion" and not new_word:
        raise ValueError(
            f"textual inversion learns a new word; {token!r} is one of the "
            "vocabulary already: choose one like '<diamond>'"
        )
    if new_word:
        initializer = tune.initializer or INITIALIZERS[tune.concept]
        add_token(pipe.tokenizer, pipe.text_encoder, token, initializer)
    return pipe, base, new_word


def _scores_before(
    pipe: StableDiffusionPipeline, tune: FineTuneConfig
) -> tuple[dict[str, list[str]], int, dict[str, float]]:
    """The prompt sets to score (the base shapes', the concept's), the seeds
    per prompt, and the base shapes' scores before training ({} and none
    without `eval_images`)."""
    if not tune.eval_images:
        return {}, 0, {}
    sets = {"base": evaluation_prompts()["single-object"]}
    seeds = max(1, round(tune.eval_images / len(sets["base"])))
    metrics = _scores(pipe, {"base before": sets["base"]}, seeds, tune.concept)
    sets[tune.concept] = concept_prompts(tune.concept)
    return sets, seeds, dict(metrics)


def _fine_tune_loss(
    pipe: StableDiffusionPipeline,
    tune: FineTuneConfig,
    new_word: bool,
    text_tokens: torch.Tensor,
    captions: list[str],
) -> DiffusionLoss:
    """Freezes what the method leaves alone, adds LoRA's adapters or the new
    word's trainable row, and returns the loss: `TextEncoderLoss` when
    anything of the text encoder trains, else `DiffusionLoss` on the text
    tokens computed once."""
    pipe.unet.requires_grad_(tune.method == "dreambooth")
    pipe.text_encoder.requires_grad_(tune.train_text_encoder)
    pipe.text_encoder.embeddings.token_embedding.requires_grad_(False)
    if tune.method == "lora":
        targets = LORA_TARGETS[tune.targets]
        add_lora(pipe.unet, rank=tune.rank, alpha=tune.alpha, targets=targets)
    scale = pipe.vae.config.scaling_factor
    if new_word:
        embeddings = pipe.text_encoder.embeddings
        embeddings["token_embedding"] = NewTokenEmbedding(embeddings.token_embedding)
    if new_word or tune.train_text_encoder:
        return TextEncoderLoss(
            pipe.unet,
            pipe.scheduler,
            pipe.text_encoder,
            pipe.tokenizer(captions),
            scale,
            tune.caption_dropout,
            tune.timestep_bias,
            tune.text_encoder_lr,
        )
    return DiffusionLoss(
        pipe.unet,
        pipe.scheduler,
        text_tokens,
        scale,
        tune.caption_dropout,
        tune.timestep_bias,
    )


def _fine_tune_record(
    tune: FineTuneConfig,
    config: TrainConfig,
    ship: bool,
    new_word: bool,
    base: str,
) -> dict:
    """The record's first keys: the method, the configs and options, the
    command that repeats the run, the base pipeline's digest."""
    method, concept = tune.method, tune.concept
    options = {
        "concept": concept,
        "token": tune.word,
        "images": tune.images,
        "prior_images": tune.prior_images,
        "caption_dropout": tune.caption_dropout,
    }
    if method == "lora":
        alpha = tune.rank if tune.alpha is None else tune.alpha
        options |= {"rank": tune.rank, "lora_alpha": alpha, "targets": tune.targets}
    if new_word:
        options["initializer"] = tune.initializer or INITIALIZERS[concept]
    if tune.train_text_encoder:
        options["train_text_encoder"] = True
    if tune.timestep_bias != 1:
        options["timestep_bias"] = tune.timestep_bias
    if tune.text_encoder_lr:
        options["text_encoder_lr"] = tune.text_encoder_lr
    if tune.eval_every:
        options["eval_every"] = tune.eval_every
    return {
        "method": method,
        "train_config": config.to_dict(),
        **options,
        "command": command_line(method, config, ship=ship, **options),
        "base": base,
    }


def _run_record(
    result: TrainResult,
    metrics: dict,
    tune: FineTuneConfig,
    out_dir: Path,
    trainable: int,
) -> dict:
    """The record's keys about the run: time, hardware, metrics, what the
    scores told apart, versions, the loss curve and the scores along the way."""
    log = out_dir / "log.jsonl"
    shapes, styles = _told_apart(tune.concept)
    return {
        "seconds": round(result.seconds, 1),
        "hardware": result.hardware,
        "trainable_parameters": trainable,
        "metrics": {**result.metrics, **metrics},
        "shapes_scored": list(shapes),
        "styles_scored": list(styles),
        "versions": {"torch": torch.__version__},
        "loss_history": loss_history(log) if log.is_file() else {},
        **(
            {"scores_by_step": _scores_by_step(out_dir / SCORES_LOG)}
            if tune.eval_every
            else {}
        ),
    }


def _write_fine_tune(
    pipe: StableDiffusionPipeline,
    tune: FineTuneConfig,
    record: dict,
    out_dir: Path,
    new_word: bool,
    ship: bool,
) -> None:
    """Writes what the method trained next to METHOD.json (and, with `ship`,
    into the package's `fine_tune_io.FINE_TUNES_DIR`); completes `record` with
    the files."""
    method, concept, token = tune.method, tune.concept, tune.word
    train_text_encoder = tune.train_text_encoder
    path = out_dir / ARTIFACTS[method]
    if method == "lora":
        save_lora(pipe.unet, path)
    elif method == "dreambooth":
        save_pretrained(pipe, path)  # the new word too, if there is one
    if new_word:
        embedding = out_dir / ARTIFACTS["textual-inversion"]
        save_learned_embeds(pipe.tokenizer, pipe.text_encoder, token, embedding)
        record["embedding"] = embedding.name
    if train_text_encoder:
        encoder = out_dir / TEXT_ENCODER_FILE
        save_file(trained_text_encoder(pipe.text_encoder), str(encoder))
        record["text_encoder"] = encoder.name
    files = [path] if path.is_file() else [p for p in path.rglob("*.safetensors")]
    record["artifact"] = path.name
    record["artifact_bytes"] = sum(f.stat().st_size for f in files)
    text = json.dumps(record, indent=2) + "\n"
    (out_dir / f"{method}.json").write_text(text)
    if ship:
        check_can_ship(shipped_fine_tune_files(method, concept))
        fine_tune_io.FINE_TUNES_DIR.mkdir(parents=True, exist_ok=True)
        name = f"{method}-{concept}"
        (fine_tune_io.FINE_TUNES_DIR / f"{name}.json").write_text(text)
        shipped = fine_tune_io.FINE_TUNES_DIR / f"{name}.safetensors"
        if path.is_file():
            shutil.copyfile(path, shipped)
        else:  # DreamBooth: the UNet alone (4 MB), not the whole pipeline
            shutil.copyfile(
                path / "unet" / "diffusion_pytorch_model.safetensors", shipped
            )
        if new_word and method != "textual-inversion":
            shutil.copyfile(
                embedding, fine_tune_io.FINE_TUNES_DIR / f"{name}-embedding.safetensors"
            )
        if train_text_encoder:
            shutil.copyfile(
                encoder,
                fine_tune_io.FINE_TUNES_DIR / f"{name}-text-encoder.safetensors",
            )


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


def _scores_log(out_dir: Path, resume: bool) -> Path:
    """out_dir/SCORES_LOG, where `eval_every` writes a line of scores each time;
    a run that does not resume from a checkpoint starts it afresh."""
    log = out_dir / SCORES_LOG
    if not (resume and (out_dir / CHECKPOINT).exists()) and is_main_process():
        log.unlink(missing_ok=True)
    return log


def _scores_by_step(log: Path) -> dict[str, list]:
    """SCORES_LOG as {"step": [...], "<set> <attribute>": [...]}, rounded."""
    lines = log.read_text().splitlines() if log.is_file() else []  # none: too short
    rows = [json.loads(line) for line in lines if line]
    keys = list(rows[0]) if rows else ["step"]
    return {k: [round(r[k], 1) if k != "step" else r[k] for r in rows] for k in keys}


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
    method: functools.partial(fine_tune, method) for method in METHODS
}
