"""The `sdlearn` command's arguments: every command's options, with the
defaults each stage's function or config holds (`sdlearn train STAGE --help`).

Nothing heavy is imported at the top, so that `sdlearn --help` answers at once;
the defaults are read from the stages' modules when a parser is built.
"""

from __future__ import annotations

import argparse

# the fine-tuning commands of sdlearn.fine_tune_io.METHODS (not imported here:
# the parser stays light)
FINE_TUNE_NAMES = ("lora", "dreambooth", "textual-inversion")
# --targets' choices: the keys of sdlearn.fine_tuning.LORA_TARGETS
LORA_TARGET_NAMES = ("attention", "cross-kv", "attention+convs")

# --scheduler's choices -> the scheduler classes' names
SCHEDULER_NAMES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


def positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def merge_ratio(text: str) -> float:
    """argparse type: a share of tokens to merge, 0 to 0.75."""
    value = float(text)
    if not 0 <= value <= 0.75:
        raise argparse.ArgumentTypeError(f"expected 0 to 0.75, got {value}")
    return value


def _scheduler_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler",
        choices=list(SCHEDULER_NAMES),
        help="sampler (default: the checkpoint's own)",
    )
    p.add_argument(
        "--karras",
        action="store_true",
        help="Karras et al.'s noise levels (euler, dpmpp_2m)",
    )


def _steps_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--steps", type=positive, help="denoising steps (default: 50; 20 with --fast)"
    )


def _guidance(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a guidance scale >= 0, got {value}")
    return value


STAGE_SUMMARIES = {
    "vae": "the VAE: images <-> latents (chapter 02)",
    "clip": "a contrastive CLIP, whose text encoder conditions the UNet (chapter 03)",
    "unet": "the UNet on the VAE's latents and CLIP's text (chapter 07)",
    "all": "vae, clip and unet in order, each in a subfolder of --out",
    "lora": "fine-tune: low-rank adapters on the UNet's attention (chapter 09)",
    "dreambooth": "fine-tune: the whole UNet, with a rare token (chapter 09)",
    "textual-inversion": "fine-tune: one new word's embedding (chapter 09)",
}


def _stage_settings(stage: str):
    """What takes a stage's own settings: its function, or the config class
    its function builds from them (the UNet's, the fine-tunes')."""
    from sdlearn.fine_tuning import FineTuneConfig
    from sdlearn.stages import STAGES, UNetStageConfig

    return {"unet": UNetStageConfig}.get(stage) or STAGES.get(stage, FineTuneConfig)


def stage_default(function, name: str):
    """The default of a stage's setting: what a run uses unflagged."""
    import dataclasses
    import inspect

    if isinstance(function, str):
        function = _stage_settings(function)
    if dataclasses.is_dataclass(function):
        return {f.name: f.default for f in dataclasses.fields(function)}[name]
    return inspect.signature(function).parameters[name].default


def _stage_help(stage: str) -> dict:
    """The stage's help: for a fine-tune, the commands that made the shipped
    ones (whose settings differ from the defaults)."""
    import json

    from sdlearn.fine_tune_io import FINE_TUNES_DIR

    summary = STAGE_SUMMARIES[stage]
    help_text = {"description": f"sdlearn train {stage}: {summary}."}
    if stage in FINE_TUNE_NAMES:
        lines = []
        for path in sorted(FINE_TUNES_DIR.glob(f"{stage}-*.json")):
            record = json.loads(path.read_text())
            command = record["command"].replace(" --ship", "")
            lines.append(f"  {path.stem}:\n    {command}")
        if lines:
            help_text["epilog"] = (
                "The shipped fine-tunes were made with (`--checkpoint NAME` "
                "or `--lora CONCEPT` uses them):\n" + "\n".join(lines)
            )
        help_text["formatter_class"] = argparse.RawDescriptionHelpFormatter
    return help_text


def _train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `sdlearn train STAGE`: the training settings every stage
    takes, then the stage's own, each with its default."""
    from sdlearn.stages import STAGE_DEFAULTS, STAGES

    stage = p.prog.split()[-1]
    parts = list(STAGES) if stage == "all" else [stage]

    def default(name: str) -> str:
        values = {str(getattr(STAGE_DEFAULTS[s], name)) for s in parts}
        if len(values) == 1:
            return f" (default: {values.pop()})"
        return (
            " (default: "
            + ", ".join(f"{s} {getattr(STAGE_DEFAULTS[s], name)}" for s in parts)
            + ")"
        )

    def own(name: str, parameter: str | None = None, part: str = stage) -> str:
        return f" (default: {stage_default(part, parameter or name)})"

    p.add_argument("--out", help=f"run folder (default: runs/{stage})")
    p.add_argument("--config", help="JSON file of training settings")
    p.add_argument("--steps", type=positive, help="optimizer steps" + default("steps"))
    p.add_argument("--batch-size", type=positive, help="images" + default("batch_size"))
    p.add_argument("--lr", type=float, help="peak learning rate" + default("lr"))
    p.add_argument(
        "--warmup-steps", type=int, help="linear warm-up" + default("warmup_steps")
    )
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        help="the cosine decay ends at lr times this (1: a constant lr)"
        + default("min_lr_ratio"),
    )
    p.add_argument(
        "--weight-decay", type=float, help="AdamW's" + default("weight_decay")
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        help="average of the weights (0: none)" + default("ema_decay"),
    )
    p.add_argument(
        "--seed", type=int, help="data and initial weights" + default("seed")
    )
    p.add_argument(
        "--checkpoint-every", type=positive, help="steps" + default("checkpoint_every")
    )
    p.add_argument(
        "--bf16",
        choices=["auto", "on", "off"],
        help="bfloat16 autocast" + default("bf16"),
    )
    p.add_argument("--device", help="cpu, cuda, mps" + default("device"))
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="float32, or bfloat16 autocast (the same as --bf16 on)",
    )
    p.add_argument(
        "--eval-images",
        type=non_negative,
        help="images to score at the end (0: none)"
        + ("" if stage == "all" else own("eval_images")),
    )
    _stage_arguments(p, stage, own)
    if stage in FINE_TUNE_NAMES:
        _fine_tune_arguments(p, stage, own)
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument(
        "--ship",
        action="store_true",
        help="maintainers, in a source checkout: also replace the weights "
        "shipped in the package",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _stage_arguments(p: argparse.ArgumentParser, stage: str, own) -> None:
    """The options of the VAE's, the UNet's and the fine-tunes' own settings."""
    from sdlearn.schedulers.common import BETA_SCHEDULES

    if stage in ("vae", "all"):
        p.add_argument(
            "--kl-weight",
            type=float,
            help="weight of the KL term" + own("kl_weight", part="vae"),
        )
        p.add_argument(
            "--shapes",
            choices=["base", "all"],
            help="all shapes, new ones included, or the base ones"
            + own("shapes", part="vae"),
        )
    if stage in ("unet", "all", *FINE_TUNE_NAMES):
        part = "unet" if stage == "all" else stage
        p.add_argument(
            "--caption-dropout",
            type=float,
            help="how often the caption is dropped" + own("caption_dropout", part=part),
        )
        p.add_argument(
            "--images",
            type=positive,
            help="training images" + own("images", part=part),
        )
    if stage in ("unet", "all"):
        p.add_argument(
            "--num-train-timesteps",
            type=positive,
            help="diffusion steps T" + own("num_train_timesteps", part="unet"),
        )
        p.add_argument(
            "--beta-schedule",
            choices=BETA_SCHEDULES,
            help="the noise schedule" + own("beta_schedule", part="unet"),
        )


def _fine_tune_arguments(p: argparse.ArgumentParser, stage: str, own) -> None:
    """The options of `sdlearn train lora|dreambooth|textual-inversion`: the
    fields of `sdlearn.fine_tuning.FineTuneConfig`."""
    p.add_argument("--base", help="the pipeline to teach (default: the shipped one)")
    p.add_argument(
        "--concept",
        help="the new shape or style to teach: diamond, ring, hollow" + own("concept"),
    )
    p.add_argument(
        "--token",
        help="its word in captions (default: the concept's name for lora, "
        "sks for dreambooth, <concept> for textual-inversion)",
    )
    p.add_argument(
        "--prior-images",
        type=non_negative,
        help="base-shape images mixed in" + own("prior_images"),
    )
    p.add_argument(
        "--initializer",
        help="the word a new word (<name>) starts from (default: the "
        "concept's nearest base word)",
    )
    p.add_argument(
        "--train-text-encoder",
        action="store_true",
        default=None,
        help="also train the text encoder's blocks (dreambooth)",
    )
    p.add_argument(
        "--text-encoder-lr",
        type=float,
        help="learning rate of a new word's embedding and of the text "
        "encoder's blocks (default: --lr)",
    )
    p.add_argument(
        "--timestep-bias",
        type=float,
        help="how many times more often the noisier half of the timesteps "
        "is drawn (1: uniform)" + own("timestep_bias"),
    )
    p.add_argument(
        "--eval-every",
        type=non_negative,
        help="also score every N steps, the record's scores_by_step (0: never)"
        + own("eval_every"),
    )
    if stage == "lora":
        p.add_argument("--rank", type=positive, help="the adapters' rank" + own("rank"))
        p.add_argument(
            "--lora-alpha", type=float, help="scale = alpha / rank (default: rank)"
        )
        p.add_argument(
            "--targets",
            choices=LORA_TARGET_NAMES,
            help="every attention projection, the cross-attention's k and v, "
            "or every attention projection and the ResnetBlocks' convolutions"
            + own("targets"),
        )


def _device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or mps (default: auto, the best there is)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the models' precision (default: float32; with --fast, bfloat16 "
        "where the CPU is fast at it, float16 on a GPU)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="chapter 10's recipe: bfloat16 where the CPU is fast at it, 20 DDIM "
        "steps, half the outermost tokens merged (--steps, --scheduler and "
        "--merge still choose)",
    )
    p.add_argument(
        "--merge",
        type=merge_ratio,
        metavar="RATIO",
        help="with --fast: the share of the outermost level's tokens merged before "
        "its self-attention, 0 (none) to 0.75 (default: 0.5)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="with --fast: torch.compile the UNet (a minute or more, once per run; "
        "pays when drawing many images)",
    )


# the `sdlearn` command's parser: one subcommand each, every option with its default
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlearn", description="Stable Diffusion from scratch in PyTorch."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("tour", help="the four parts, and a grid of the dataset")
    p.add_argument("--out", default="outputs/shapes_grid.png", help="PNG to write")
    p.add_argument("--rows", type=positive, default=4)
    p.add_argument("--cols", type=positive, default=6)
    p.add_argument("--seed", type=int, default=0)

    p = commands.add_parser(
        "train",
        help="train a stage of the tiny Stable Diffusion, or fine-tune it",
        description="Train a stage of the tiny Stable Diffusion (vae, clip, "
        "unet, or all three in order), or teach it a new shape or style "
        "(lora, dreambooth, textual-inversion). `sdlearn train STAGE --help` "
        "lists a stage's options and defaults.",
    )
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, summary in STAGE_SUMMARIES.items():
        _train_arguments(stages.add_parser(stage, help=summary, **_stage_help(stage)))

    p = commands.add_parser("generate", help="draw images for a prompt")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--negative", help="what to steer away from")
    _steps_argument(p)
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale")
    _scheduler_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=positive, help="pixels, a multiple of 8")
    p.add_argument("--width", type=positive, help="pixels, a multiple of 8")
    p.add_argument("--num-images", type=positive, default=1)
    p.add_argument(
        "--checkpoint",
        help="a diffusers folder, a single-file SD 1.x checkpoint, a run folder "
        "of `sdlearn train`, or a shipped fine-tune's name (dreambooth-ring) "
        "(default: the tiny shapes model shipped with sdlearn)",
    )
    _device_arguments(p)
    p.add_argument("--image", help="img2img: the picture to start from")
    p.add_argument("--strength", type=float, help="img2img: how far to noise it")
    p.add_argument("--mask", help="inpainting: white where to repaint")
    p.add_argument(
        "--lora",
        help="a LoRA adapter (.safetensors) for the UNet, or a shipped one's "
        "concept (diamond)",
    )
    p.add_argument(
        "--lora-scale", type=float, default=1.0, help="how much of the adapter"
    )
    p.add_argument(
        "--embedding",
        help="a learned token (.safetensors, textual inversion) to use in the "
        "prompt, or a shipped one's concept (diamond: the word <diamond>)",
    )
    p.add_argument("--out", default="outputs/generated.png", help="PNG to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = commands.add_parser(
        "evaluate", help="score a model on held-out prompts (the shapes model)"
    )
    p.add_argument(
        "--checkpoint",
        help="as generate's (default: the tiny model shipped with sdlearn)",
    )
    _device_arguments(p)
    p.add_argument("--seeds", type=positive, default=4, help="images per prompt")
    _steps_argument(p)
    p.add_argument(
        "--guidance",
        type=_guidance,
        nargs="+",
        default=[7.5, 1.0],
        help="guidance scales to compare",
    )
    _scheduler_arguments(p)
    p.add_argument("--out", default="outputs/evaluation.png", help="grid PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser
