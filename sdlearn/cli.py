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
                 [--fast [--compile] [--merge RATIO]] [--out PATH]
    draw images and print the paths of the PNGs written; --fast turns on
    chapter 10's recipe (sdlearn.fast.FastRecipe).
sdlearn evaluate [--checkpoint PATH|NAME] [--seeds N] [--steps N] [--guidance S ...]
                 [--scheduler NAME [--karras]] [--device D] [--dtype T]
                 [--fast [--compile] [--merge RATIO]] [--out PATH]
    draw the evaluation prompts, score them (sdlearn.evaluate) and print a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdlearn.cli_parser import (
    FINE_TUNE_NAMES,
    SCHEDULER_NAMES,
    build_parser,
    stage_default,
)

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


def _make_fast(pipe, args: argparse.Namespace) -> int:
    """--fast, --compile and --merge: chapter 10's recipe on `pipe`, said on stderr;
    returns the denoising steps to run (--steps, else the recipe's or 50)."""
    from sdlearn.fast import FastRecipe

    if not args.fast:
        for name in ("compile", "merge"):
            if getattr(args, name) not in (None, False):
                raise ValueError(f"--{name} needs --fast: it is a part of the recipe")
        return args.steps or 50
    given = {"merge_ratio": args.merge, "steps": args.steps}  # None: the recipe's
    chosen = {name: value for name, value in given.items() if value is not None}
    recipe = FastRecipe(dtype=args.dtype or "auto", compile=args.compile, **chosen)
    done = recipe.apply(pipe)
    print(f"sdlearn {args.command}: fast: {'; '.join(done)}", file=sys.stderr)
    return recipe.steps


def tour(args: argparse.Namespace) -> int:
    """`sdlearn tour`: print the four parts and draw a grid of the shapes dataset."""
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

    from sdlearn.stages import STAGE_DEFAULTS
    from sdlearn.training import TrainConfig

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
    """`sdlearn train STAGE`: train a stage (or all three) into a run folder."""
    from sdlearn.fine_tune_io import shipped_fine_tune_files
    from sdlearn.fine_tuning import FINE_TUNES
    from sdlearn.stages import STAGES, check_can_ship, shipped_files

    commands = {**STAGES, **FINE_TUNES}
    names = list(STAGES) if args.stage == "all" else [args.stage]
    if args.ship:
        files = []
        for name in names:
            if name in FINE_TUNES:
                concept = args.concept or stage_default("fine_tune", "concept")
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
    from sdlearn.fine_tune_io import (
        fine_tune_run_method,
        load_fine_tune,
        load_fine_tune_run,
        shipped_fine_tunes,
    )
    from sdlearn.pipeline_io import from_pretrained

    where = pick_device(device)
    precision = pick_dtype(dtype, where)
    if checkpoint is None:
        pipe = from_pretrained()
    elif Path(checkpoint).exists():
        if Path(checkpoint).is_dir() and fine_tune_run_method(checkpoint):
            pipe, _ = load_fine_tune_run(checkpoint)
        else:
            pipe = from_pretrained(checkpoint)
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
    from sdlearn.fine_tune_io import read_fine_tune, shipped_fine_tunes

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
    """`sdlearn generate PROMPT`: draw images and print the PNGs' paths."""
    import torch
    from PIL import Image

    from sdlearn.lora import load_lora
    from sdlearn.textual_inversion import load_learned_embeds

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
    pipe = load_pipeline(args.checkpoint, args.device, args.dtype or "float32")
    pipe.progress = not args.no_progress
    if any(source != "shipped" for source in pipe.sources.values()):
        where = ", ".join(f"{part} from {s}" for part, s in pipe.sources.items())
        print(f"sdlearn generate: {where}", file=sys.stderr)
    if args.lora is not None:
        adapter = _shipped_file(args.lora, "lora")
        load_lora(pipe.unet, adapter, prefix="unet", multiplier=args.lora_scale)
        pipe.to(dtype=pipe.dtype)  # the adapters' new weights too
    elif args.lora_scale != 1.0:
        raise ValueError("--lora-scale needs --lora: the adapter to scale")
    if args.embedding is not None:
        embedding = _shipped_file(args.embedding, "textual-inversion")
        load_learned_embeds(pipe.tokenizer, pipe.text_encoder, embedding)
        pipe.to(dtype=pipe.dtype)
    steps = _make_fast(pipe, args)  # after the adapters: it wraps the UNet
    _choose_scheduler(pipe, args)  # --scheduler wins over the recipe's
    output = pipe(
        args.prompt,
        negative_prompt=args.negative,
        height=args.height,
        width=args.width,
        num_inference_steps=steps,
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
    """`sdlearn evaluate`: score a model on the evaluation prompts, print a table."""
    import statistics
    import time

    import numpy as np
    import torch
    from PIL import Image

    from sdlearn.evaluate import evaluate_pipeline, format_table
    from sdlearn.shapes import image_grid

    pipe = load_pipeline(args.checkpoint, args.device, args.dtype or "float32")
    steps = _make_fast(pipe, args)
    _choose_scheduler(pipe, args)
    summaries, grids = {}, []
    for guidance in args.guidance:
        scores, images = evaluate_pipeline(
            pipe,
            seeds=args.seeds,
            guidance_scale=guidance,
            num_inference_steps=steps,
            progress=not args.no_progress,
        )
        for name, summary in scores.items():
            summaries[f"{name}, guidance {guidance:g}"] = summary
        # the first seed's image of every prompt, one row per prompt set
        grids.append(np.concatenate([drawn[0] for drawn in images.values()]))
    print(
        f"{args.seeds} seed(s) per prompt, {steps} steps of "
        f"{type(pipe.scheduler).__name__} in {str(pipe.dtype).removeprefix('torch.')} "
        f"on {pipe.device.type} "
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
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
        )
        seconds.append(time.perf_counter() - start)
    print(
        f"one image, {steps} steps with guidance: "
        f"{statistics.median(seconds):.2f} s (median of 3, "
        f"{torch.get_num_threads()} threads)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = len(grids) * len(images)
    Image.fromarray(image_grid(np.concatenate(grids), rows=rows)).save(out)
    print(f"wrote {out}: one row per prompt set and guidance scale, first seed")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the `sdlearn` command; errors print one line and return 1."""
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.out is None:
        args.out = "runs" if args.stage == "all" else f"runs/{args.stage}"
    run = {"tour": tour, "train": train, "generate": generate, "evaluate": evaluate}
    try:
        return run[args.command](args)
    except (ValueError, OSError) as error:
        print(f"sdlearn {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
