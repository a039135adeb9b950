"""The `sdlearn` command line.

sdlearn tour [--out PATH] [--rows N] [--cols N] [--seed N]
    print the parts of Stable Diffusion and render a grid of the shapes
    dataset with its captions to a PNG.
sdlearn train vae|clip|unet|all [...]
    train a stage of the tiny Stable Diffusion into a run folder (--out, default
    runs/STAGE) that --checkpoint loads; `sdlearn train STAGE --help` lists the
    stage's options and their defaults.
sdlearn train lora|dreambooth|textual-inversion [--concept diamond] [...]
    teach a pipeline a new shape or style: LoRA adapters on the UNet, the whole UNet
    with a rare token, or one new word's embedding; the help shows the commands
    that made the shipped ones.
sdlearn generate PROMPT [--negative TEXT] [--steps N] [--guidance S] [--seed N]
                 [--scheduler NAME [--karras]] [--height H --width W]
                 [--num-images N] [--checkpoint PATH|NAME]
                 [--device cpu|cuda|mps] [--dtype float32|bfloat16|float16]
                 [--image PATH --strength S] [--mask PATH]
                 [--lora PATH|CONCEPT [--lora-scale S]] [--embedding PATH|CONCEPT]
                 [--out PATH]
    draw images and print the paths of the PNGs written.
sdlearn evaluate [--checkpoint PATH|NAME] [--seeds N] [--steps N] [--guidance S ...]
                 [--scheduler NAME [--karras]] [--device D] [--dtype T] [--out PATH]
    draw the evaluation prompts, score them (sdlearn.evaluate) and print a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# the fine-tuning commands of sdlearn.fine_tuning.METHODS (not imported here:
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
# the samplers that take --karras
KARRAS = ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler")


def _choose_scheduler(pipe, args: argparse.Namespace) -> None:
    """--scheduler and --karras: the same noise schedule, another sampler."""
    from sdlearn.schedulers import with_sampler

    if args.scheduler is None and not args.karras:
        return
    name = type(pipe.scheduler).__name__
    if args.scheduler is not None:
        name = SCHEDULER_NAMES[args.scheduler]
    settings = {"use_karras_sigmas": True} if args.karras else {}
    if args.karras and name not in KARRAS:
        raise ValueError(
            f"--karras needs a sampler with Karras sigmas (euler, dpmpp_2m), got {name}"
        )
    pipe.scheduler = with_sampler(pipe.scheduler, name, **settings)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def tour(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdlearn import shapes
    from sdlearn.tour import PARTS

    print("Stable Diffusion in four parts:")
    for part, flow in PARTS.items():
        print(f"  {part:>13}: {flow}")
    dataset = shapes.ShapesDataset(
        split="all", length=args.rows * args.cols, seed=args.seed
    )
    fig, axes = plt.subplots(
        args.rows, args.cols, figsize=(2 * args.cols, 2.2 * args.rows), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        item = dataset[i]
        ax.imshow(shapes.to_image(item["pixel_values"]))
        ax.set_title(item["caption"], fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("The shapes dataset")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote a {args.rows}x{args.cols} grid of the shapes dataset to {out}")
    return 0


# each stage's own options: --flag's dest -> the stage function's argument
STAGE_OPTIONS: dict[str, dict[str, str]] = {
    "vae": {"kl_weight": "kl_weight", "shapes": "shapes"},
    "clip": {},
    "unet": {
        "caption_dropout": "caption_dropout",
        "images": "images",
        "num_train_timesteps": "num_train_timesteps",
        "beta_schedule": "beta_schedule",
    },
}
FINE_TUNE_OPTIONS = {
    "base": "checkpoint",
    "concept": "concept",
    "token": "token",
    "images": "images",
    "prior_images": "prior_images",
    "caption_dropout": "caption_dropout",
    "timestep_bias": "timestep_bias",
    "train_text_encoder": "train_text_encoder",
    "text_encoder_lr": "text_encoder_lr",
    "eval_every": "eval_every",
    "initializer": "initializer",
}
for _name in FINE_TUNE_NAMES:
    STAGE_OPTIONS[_name] = dict(FINE_TUNE_OPTIONS)
STAGE_OPTIONS["lora"].update(rank="rank", targets="targets", lora_alpha="alpha")
# the settings of TrainConfig that every stage takes
CONFIG_OPTIONS = (
    "steps",
    "batch_size",
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "ema_decay",
    "seed",
    "checkpoint_every",
    "bf16",
    "device",
)


def _train_config(name: str, args: argparse.Namespace):
    """The stage's default TrainConfig, then --config's file, then the flags."""
    import json

    from sdlearn.training import STAGE_DEFAULTS, TrainConfig

    config = STAGE_DEFAULTS[name]
    if args.config:
        config = TrainConfig.from_dict(
            {**config.to_dict(), **json.loads(Path(args.config).read_text())}
        )
    changes = {option: getattr(args, option) for option in CONFIG_OPTIONS}
    if args.dtype is not None:
        # training keeps float32 weights; --dtype bfloat16 autocasts to it
        if args.dtype == "float16":
            raise ValueError(
                "training in float16 needs loss scaling, which sdlearn does not "
                "do; use --dtype bfloat16 (autocast) or float32"
            )
        bf16 = "on" if args.dtype == "bfloat16" else "off"
        if args.bf16 not in (None, bf16):
            raise ValueError(f"--dtype {args.dtype} contradicts --bf16 {args.bf16}")
        changes["bf16"] = bf16
    return config.updated(**changes)


def train(args: argparse.Namespace) -> int:
    from sdlearn.fine_tuning import FINE_TUNES, shipped_fine_tune_files
    from sdlearn.training import STAGES, check_can_ship, shipped_files

    commands = {**STAGES, **FINE_TUNES}
    names = list(STAGES) if args.stage == "all" else [args.stage]
    if args.ship:
        files = []
        for name in names:
            if name in FINE_TUNES:
                concept = args.concept or _default("fine_tune", "concept")
                files += shipped_fine_tune_files(name, concept)
            else:
                files += shipped_files(name)
        check_can_ship(files)
        print(
            "--ship: this run overwrites the package's "
            + ", ".join(str(f) for f in files),
            file=sys.stderr,
        )
    for name in names:
        config = _train_config(name, args)
        out = Path(args.out) / name if args.stage == "all" else Path(args.out)
        extra = {}
        if args.eval_images is not None:
            extra["eval_images"] = args.eval_images
        for dest, argument in STAGE_OPTIONS[name].items():
            if getattr(args, dest, None) is not None:
                extra[argument] = getattr(args, dest)
        if name == "unet" and args.stage == "all" and not args.ship:
            # the VAE and CLIP this run just trained, not the shipped ones
            extra["parts_dir"] = Path(args.out)
        record = commands[name](
            config,
            out,
            resume=args.resume,
            ship=args.ship,
            progress=not args.no_progress,
            **extra,
        )
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
        print(f"{name}: {record['seconds']:.0f} s, {metrics}; wrote {out}")
    return 0


def load_pipeline(checkpoint: str | None, device: str = "auto", dtype: str = "float32"):
    """The pipeline `--checkpoint` names, on `--device` in `--dtype`.

    Args:
        checkpoint: None (the shipped tiny model); a path: a diffusers folder,
            a single-file checkpoint, a `sdlearn train` run folder (a stage's
            or a fine-tune's); or the name of a shipped fine-tune
            ("dreambooth-ring", "lora-diamond"...).
    """
    from sdlearn.devices import pick_device, pick_dtype
    from sdlearn.fine_tuning import (
        fine_tune_run_method,
        load_fine_tune,
        load_fine_tune_run,
        shipped_fine_tunes,
    )
    from sdlearn.pipeline import StableDiffusionPipeline

    where = pick_device(device)
    precision = pick_dtype(dtype, where)
    if checkpoint is None:
        pipe = StableDiffusionPipeline.from_pretrained()
    elif Path(checkpoint).exists():
        if Path(checkpoint).is_dir() and fine_tune_run_method(checkpoint):
            pipe, _ = load_fine_tune_run(checkpoint)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    elif checkpoint in shipped_fine_tunes():
        pipe, _ = load_fine_tune(*shipped_fine_tunes()[checkpoint])
    else:
        raise FileNotFoundError(
            f"{checkpoint} is neither a path nor a shipped model (shipped: "
            f"{', '.join(shipped_fine_tunes())})"
        )
    return pipe.to(where, precision)


def _shipped_file(value: str, method: str) -> str:
    """--lora and --embedding take a file or a shipped fine-tune's concept."""
    from sdlearn.fine_tuning import read_fine_tune, shipped_fine_tunes

    if Path(value).is_file():
        return value
    names = [c for m, c in shipped_fine_tunes().values() if m == method]
    if value in names:
        return str(read_fine_tune(method, value)[1])
    raise FileNotFoundError(
        f"{value} does not exist, and no shipped {method} is named so (shipped: "
        f"{', '.join(names) or 'none'})"
    )


def generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    def read_image(path: str | None) -> Image.Image | None:
        if path is None:
            return None
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist")
        with Image.open(path) as image:
            return image.convert("RGB")

    image, mask = read_image(args.image), read_image(args.mask)
    if mask is not None and image is None:
        raise ValueError("--mask needs --image: the picture to inpaint")
    if args.image is None and args.strength is not None:
        raise ValueError("--strength needs --image: it says how far to noise it")
    pipe = load_pipeline(args.checkpoint, args.device, args.dtype)
    pipe.progress = not args.no_progress
    if any(source != "shipped" for source in pipe.sources.values()):
        where = ", ".join(f"{part} from {s}" for part, s in pipe.sources.items())
        print(f"sdlearn generate: {where}", file=sys.stderr)
    _choose_scheduler(pipe, args)
    if args.lora is not None:
        pipe.load_lora(_shipped_file(args.lora, "lora"), scale=args.lora_scale)
        pipe.to(dtype=pipe.dtype)  # the adapters' new weights too
    elif args.lora_scale != 1.0:
        raise ValueError("--lora-scale needs --lora: the adapter to scale")
    if args.embedding is not None:
        pipe.load_textual_inversion(_shipped_file(args.embedding, "textual-inversion"))
        pipe.to(dtype=pipe.dtype)
    output = pipe(
        args.prompt,
        negative_prompt=args.negative,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed),
        image=image,
        strength=0.8 if args.strength is None else args.strength,
        mask_image=mask,
        num_images_per_prompt=args.num_images,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(output.images):
        path = out if len(output.images) == 1 else out.with_stem(f"{out.stem}_{i}")
        picture.save(path)
        print(path)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    import statistics
    import time

    import numpy as np
    import torch
    from PIL import Image

    from sdlearn.evaluate import evaluate_pipeline, format_table
    from sdlearn.shapes import image_grid

    pipe = load_pipeline(args.checkpoint, args.device, args.dtype)
    _choose_scheduler(pipe, args)
    summaries, grids = {}, []
    for guidance in args.guidance:
        scores, images = evaluate_pipeline(
            pipe,
            seeds=args.seeds,
            guidance_scale=guidance,
            num_inference_steps=args.steps,
            progress=not args.no_progress,
        )
        for name, summary in scores.items():
            summaries[f"{name}, guidance {guidance:g}"] = summary
        # the first seed's image of every prompt, one row per prompt set
        grids.append(np.concatenate([drawn[0] for drawn in images.values()]))
    print(
        f"{args.seeds} seed(s) per prompt, {args.steps} steps of "
        f"{type(pipe.scheduler).__name__} in {args.dtype} on {pipe.device.type} "
        f"(colour+shape: both right in the same image)"
    )
    print(format_table(summaries))

    # the time of one image, as a user waits for it: one prompt, guidance on
    pipe.progress = False
    seconds = []
    for seed in range(3):
        start = time.perf_counter()
        pipe(
            "a red circle",
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(seed),
        )
        seconds.append(time.perf_counter() - start)
    print(
        f"one image, {args.steps} steps with guidance: "
        f"{statistics.median(seconds):.2f} s (median of 3, "
        f"{torch.get_num_threads()} threads)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = len(grids) * len(images)
    Image.fromarray(image_grid(np.concatenate(grids), rows=rows)).save(out)
    print(f"wrote {out}: one row per prompt set and guidance scale, first seed")
    return 0


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


def _stage_function(stage: str):
    from sdlearn.fine_tuning import fine_tune
    from sdlearn.training import STAGES

    return STAGES.get(stage, fine_tune)


def _default(function, name: str):
    """The default of a stage function's argument: what a run uses unflagged."""
    import inspect

    if isinstance(function, str):
        function = _stage_function(function)
    return inspect.signature(function).parameters[name].default


def _stage_help(stage: str) -> dict:
    """The stage's help: for a fine-tune, the commands that made the shipped
    ones (whose settings differ from the defaults)."""
    import json

    from sdlearn.fine_tuning import FINE_TUNES_DIR

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
    from sdlearn.schedulers.common import BETA_SCHEDULES
    from sdlearn.training import STAGE_DEFAULTS, STAGES

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
        return f" (default: {_default(part, parameter or name)})"

    p.add_argument("--out", help=f"run folder (default: runs/{stage})")
    p.add_argument("--config", help="JSON file of training settings")
    p.add_argument("--steps", type=_positive, help="optimizer steps" + default("steps"))
    p.add_argument(
        "--batch-size", type=_positive, help="images" + default("batch_size")
    )
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
        "--checkpoint-every", type=_positive, help="steps" + default("checkpoint_every")
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
        type=_non_negative,
        help="images to score at the end (0: none)"
        + ("" if stage == "all" else own("eval_images")),
    )
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
            type=_positive,
            help="training images" + own("images", part=part),
        )
    if stage in ("unet", "all"):
        p.add_argument(
            "--num-train-timesteps",
            type=_positive,
            help="diffusion steps T" + own("num_train_timesteps", part="unet"),
        )
        p.add_argument(
            "--beta-schedule",
            choices=BETA_SCHEDULES,
            help="the noise schedule" + own("beta_schedule", part="unet"),
        )
    if stage in FINE_TUNE_NAMES:
        p.add_argument(
            "--base", help="the pipeline to teach (default: the shipped one)"
        )
        p.add_argument(
            "--concept",
            help="the new shape or style to teach: diamond, ring, hollow"
            + own("concept"),
        )
        p.add_argument(
            "--token",
            help="its word in captions (default: the concept's name for lora, "
            "sks for dreambooth, <concept> for textual-inversion)",
        )
        p.add_argument(
            "--prior-images",
            type=_non_negative,
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
            type=_non_negative,
            help="also score every N steps, the record's scores_by_step (0: never)"
            + own("eval_every"),
        )
    if stage == "lora":
        p.add_argument(
            "--rank", type=_positive, help="the adapters' rank" + own("rank")
        )
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
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument(
        "--ship",
        action="store_true",
        help="maintainers, in a source checkout: also replace the weights "
        "shipped in the package",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=train)


def _device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or mps (default: auto, the best there is)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the models' precision (default: float32; bfloat16 on a CPU, "
        "float16 on a GPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlearn", description="Stable Diffusion from scratch in PyTorch."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("tour", help="the four parts, and a grid of the dataset")
    p.add_argument("--out", default="outputs/shapes_grid.png", help="PNG to write")
    p.add_argument("--rows", type=_positive, default=4)
    p.add_argument("--cols", type=_positive, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=tour)

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
    p.add_argument("--steps", type=_positive, default=50, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale")
    _scheduler_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=_positive, help="pixels, a multiple of 8")
    p.add_argument("--width", type=_positive, help="pixels, a multiple of 8")
    p.add_argument("--num-images", type=_positive, default=1)
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
    p.set_defaults(run=generate)

    p = commands.add_parser(
        "evaluate", help="score a model on held-out prompts (the shapes model)"
    )
    p.add_argument(
        "--checkpoint",
        help="as generate's (default: the tiny model shipped with sdlearn)",
    )
    _device_arguments(p)
    p.add_argument("--seeds", type=_positive, default=4, help="images per prompt")
    p.add_argument("--steps", type=_positive, default=50, help="denoising steps")
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
    p.set_defaults(run=evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.out is None:
        args.out = "runs" if args.stage == "all" else f"runs/{args.stage}"
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"sdlearn {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
