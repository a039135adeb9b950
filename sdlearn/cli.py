"""The `sdlearn` command line.

sdlearn tour [--out PATH] [--rows N] [--cols N] [--seed N]
    print the parts of Stable Diffusion and render a grid of the shapes
    dataset with its captions to a PNG.
sdlearn train vae|clip|unet|all [...]
    train a stage of the tiny Stable Diffusion (`sdlearn train --help`).
sdlearn train lora|dreambooth|textual-inversion [--concept diamond] [--token T]
              [--prior-images N] [--rank R] [--initializer WORD] [--base PATH]
              [--train-text-encoder] [--text-encoder-lr LR] [--timestep-bias B]
              [--eval-every N]
    teach a pipeline a new shape or style: LoRA adapters on the UNet, the whole UNet
    with a rare token, or one new word's embedding; score it every N steps.
sdlearn generate PROMPT [--negative TEXT] [--steps N] [--guidance S] [--seed N]
                 [--scheduler NAME [--karras]] [--height H --width W]
                 [--num-images N] [--checkpoint PATH]
                 [--image PATH --strength S] [--mask PATH]
                 [--lora PATH [--lora-scale S]] [--embedding PATH] [--out PATH]
    draw images and print the paths of the PNGs written.
sdlearn evaluate [--checkpoint PATH] [--seeds N] [--steps N] [--guidance S ...]
                 [--scheduler NAME [--karras]] [--out PATH]
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


def train(args: argparse.Namespace) -> int:
    import json

    from sdlearn.fine_tuning import FINE_TUNES
    from sdlearn.training import STAGE_DEFAULTS, STAGES, TrainConfig

    commands = {**STAGES, **FINE_TUNES}
    names = list(STAGES) if args.stage == "all" else [args.stage]
    for name in names:
        config = STAGE_DEFAULTS[name]
        if args.config:
            config = TrainConfig.from_dict(
                {**config.to_dict(), **json.loads(Path(args.config).read_text())}
            )
        config = config.updated(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            min_lr_ratio=args.min_lr_ratio,
            weight_decay=args.weight_decay,
            ema_decay=args.ema_decay,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            bf16=args.bf16,
            device=args.device,
        )
        out = Path(args.out) / name if args.stage == "all" else Path(args.out)
        extra = {}
        if args.eval_images is not None:
            extra["eval_images"] = args.eval_images
        if name in FINE_TUNES:
            extra["checkpoint"] = args.base
            options = ["concept", "token", "prior_images", "caption_dropout"]
            options += ["timestep_bias", "train_text_encoder", "text_encoder_lr"]
            options += ["eval_every"]
            options += {
                "lora": ["rank", "targets", "initializer"],
                "dreambooth": ["initializer"],
                "textual-inversion": ["initializer"],
            }[name]
            for option in options:
                if getattr(args, option) is not None:
                    extra[option] = getattr(args, option)
            if name == "lora" and args.lora_alpha is not None:
                extra["alpha"] = args.lora_alpha
            if args.images is not None:
                extra["images"] = args.images
        if name == "vae" and args.kl_weight is not None:
            extra["kl_weight"] = args.kl_weight
        if name == "vae" and args.shapes is not None:
            extra["shapes"] = args.shapes
        if name == "unet":
            if args.caption_dropout is not None:
                extra["caption_dropout"] = args.caption_dropout
            if args.images is not None:
                extra["images"] = args.images
            if args.num_train_timesteps is not None:
                extra["num_train_timesteps"] = args.num_train_timesteps
            if args.beta_schedule is not None:
                extra["beta_schedule"] = args.beta_schedule
            if args.stage == "all" and not args.ship:
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


def generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from sdlearn.pipeline import StableDiffusionPipeline

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
    pipe = StableDiffusionPipeline.from_pretrained(args.checkpoint)
    pipe.progress = not args.no_progress
    _choose_scheduler(pipe, args)
    if args.lora is not None:
        if not Path(args.lora).is_file():
            raise FileNotFoundError(f"{args.lora} does not exist")
        pipe.load_lora(args.lora, scale=args.lora_scale)
    elif args.lora_scale != 1.0:
        raise ValueError("--lora-scale needs --lora: the adapter to scale")
    if args.embedding is not None:
        if not Path(args.embedding).is_file():
            raise FileNotFoundError(f"{args.embedding} does not exist")
        pipe.load_textual_inversion(args.embedding)
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
    from sdlearn.pipeline import StableDiffusionPipeline
    from sdlearn.shapes import image_grid

    pipe = StableDiffusionPipeline.from_pretrained(args.checkpoint)
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
        f"{type(pipe.scheduler).__name__} "
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


def build_parser() -> argparse.ArgumentParser:
    from sdlearn.schedulers.common import BETA_SCHEDULES

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

    p = commands.add_parser("train", help="train a stage of the tiny Stable Diffusion")
    p.add_argument(
        "stage",
        choices=["vae", "clip", "unet", "all", *FINE_TUNE_NAMES],
        help="what to train (lora, dreambooth, textual-inversion: teach a "
        "pipeline a new shape or style)",
    )
    p.add_argument("--out", help="run folder (default runs/STAGE)")
    p.add_argument("--config", help="JSON file of training settings")
    p.add_argument("--steps", type=_positive)
    p.add_argument("--batch-size", type=_positive)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        help="the cosine decay ends at lr times this (1: a constant lr)",
    )
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=_positive)
    p.add_argument("--bf16", choices=["auto", "on", "off"])
    p.add_argument("--device", help="cpu, cuda, mps (default: the best there is)")
    p.add_argument("--kl-weight", type=float, help="vae: weight of the KL term")
    p.add_argument(
        "--shapes",
        choices=["base", "all"],
        help="vae: all shapes, new ones included (default), or the base ones only",
    )
    p.add_argument(
        "--caption-dropout", type=float, help="unet: how often the caption is dropped"
    )
    p.add_argument("--images", type=_positive, help="unet: training images to encode")
    p.add_argument(
        "--num-train-timesteps", type=_positive, help="unet: diffusion steps T"
    )
    p.add_argument(
        "--beta-schedule",
        choices=BETA_SCHEDULES,
        help="unet: the noise schedule",
    )
    p.add_argument(
        "--eval-images", type=_non_negative, help="images to score at the end (0: none)"
    )
    p.add_argument(
        "--eval-every",
        type=_non_negative,
        help="fine-tunes: also score every N steps (the record's scores_by_step)",
    )
    p.add_argument(
        "--base", help="fine-tunes: the pipeline to teach (default: shipped)"
    )
    p.add_argument(
        "--concept",
        help="fine-tunes: the new shape or style to teach (diamond, ring, hollow)",
    )
    p.add_argument(
        "--token",
        help="fine-tunes: its word in captions (default: its name, sks, <name>)",
    )
    p.add_argument(
        "--prior-images",
        type=_non_negative,
        help="fine-tunes: base-shape images mixed in",
    )
    p.add_argument("--rank", type=_positive, help="lora: the adapters' rank")
    p.add_argument("--lora-alpha", type=float, help="lora: scale = alpha / rank")
    p.add_argument(
        "--targets",
        choices=LORA_TARGET_NAMES,
        help="lora: every attention projection, the cross-attention's k and v, "
        "or every attention projection and the ResnetBlocks' convolutions",
    )
    p.add_argument(
        "--initializer", help="fine-tunes: the word a new word (<name>) starts from"
    )
    p.add_argument(
        "--train-text-encoder",
        action="store_true",
        default=None,
        help="dreambooth: also train the text encoder's blocks",
    )
    p.add_argument(
        "--text-encoder-lr",
        type=float,
        help="fine-tunes: the learning rate of a new word's embedding and of the "
        "text encoder's blocks (default: --lr)",
    )
    p.add_argument(
        "--timestep-bias",
        type=float,
        help="fine-tunes: how many times more often the noisier half of the "
        "timesteps is drawn (default 1: uniform)",
    )
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument("--ship", action="store_true", help="write weights into sdlearn")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=train)

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
        help="diffusers folder or single-file SD 1.x checkpoint "
        "(default: the tiny shapes model shipped with sdlearn)",
    )
    p.add_argument("--image", help="img2img: the picture to start from")
    p.add_argument("--strength", type=float, help="img2img: how far to noise it")
    p.add_argument("--mask", help="inpainting: white where to repaint")
    p.add_argument("--lora", help="a LoRA adapter (.safetensors) for the UNet")
    p.add_argument(
        "--lora-scale", type=float, default=1.0, help="how much of the adapter"
    )
    p.add_argument(
        "--embedding",
        help="a learned token (.safetensors, textual inversion) to use in the prompt",
    )
    p.add_argument("--out", default="outputs/generated.png", help="PNG to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=generate)

    p = commands.add_parser(
        "evaluate", help="score a model on held-out prompts (the shapes model)"
    )
    p.add_argument("--checkpoint", help="default: the tiny model shipped with sdlearn")
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
