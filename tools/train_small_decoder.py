"""Trains chapter 10's small decoder for the tiny VAE, and ships it with --ship.

A decoder of half the width (`sdlearn.small_decoder.smaller_config`) is taught
to give the shipped tiny VAE's decoded images from the same latents
(`distill_decoder`). Its PSNR against the full decoder, and against the images,
is measured on 256 images the training never saw, and kept in the record
beside the weights.

Usage:
    python tools/train_small_decoder.py            # writes outputs/small_decoder/
    python tools/train_small_decoder.py --ship     # into sdlearn/data/tiny/
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlearn.pipeline_io import from_pretrained  # noqa: E402
from sdlearn.shapes import ALL_SHAPES, ALL_STYLES, ShapesDataset  # noqa: E402
from sdlearn.small_decoder import (  # noqa: E402
    SmallDecoder,
    distill_decoder,
    record_of,
    smaller_config,
)
from sdlearn.vae import psnr  # noqa: E402
from sdlearn.weights import write_shipped  # noqa: E402


def held_out_psnr(vae, decoder: SmallDecoder, count: int = 256) -> dict[str, float]:
    """Mean PSNR in dB on `count` images of another seed than the training's."""
    data = ShapesDataset("all", count, seed=123, shapes=ALL_SHAPES, styles=ALL_STYLES)
    images = torch.stack([data[i]["pixel_values"] for i in range(count)])
    with torch.no_grad():
        z = vae.encode(images).mode()
        full, small = vae.decode(z), decoder(z)
    return {
        "to_full_decoder": psnr(small, full).mean().item(),
        "to_images": psnr(small, images).mean().item(),
        "full_decoder_to_images": psnr(full, images).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pool", type=int, default=4096, help="training images")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ship", action="store_true", help="into the package")
    args = parser.parse_args()

    vae = from_pretrained().vae
    torch.manual_seed(args.seed)
    decoder = SmallDecoder(smaller_config(vae.config, args.width))
    log = distill_decoder(
        vae,
        decoder,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        pool=args.pool,
        seed=args.seed,
    )
    scores = held_out_psnr(vae, decoder)
    print(log[-1], scores, flush=True)
    record = record_of(
        decoder,
        command="python tools/train_small_decoder.py " + " ".join(sys.argv[1:]),
        training={k: v for k, v in vars(args).items() if k != "ship"},
        seconds=log[-1]["seconds"],
        log=log,
        held_out_psnr_db=scores,
        parameters=sum(p.numel() for p in decoder.parameters()),
        full_decoder_parameters=sum(
            p.numel()
            for p in [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        ),
        torch=torch.__version__,
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
    )
    folder = {} if args.ship else {"folder": ROOT / "outputs" / "small_decoder"}
    path = write_shipped("small_decoder", decoder.state_dict(), record, **folder)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
