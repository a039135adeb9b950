"""The `sdlearn` command line.

sdlearn tour [--out PATH] [--rows N] [--cols N] [--seed N]
    print the parts of Stable Diffusion and render a grid of the shapes
    dataset with its captions to a PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"sdlearn {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
