"""Time sdlearn's UNet against diffusers' UNet2DConditionModel on identical weights.

Both models are Stable Diffusion 1.x's UNet with the same random weights (made by
diffusers, copied into sdlearn). For each latent size and precision, the two run
the same denoising step, a batch of 2 as with classifier-free guidance, taking
turns so that a change in the machine's load hits both alike; the table gives the
median seconds per step and the median ratio sdlearn / diffusers of back-to-back
runs (below 1: sdlearn is faster).

A second table measures sdlearn against itself: each speed-up the chapter teaches
(the readable attention instead of the fused kernel, channels_last memory, bf16
autocast, both together) taking turns with plain float32 on the same weights and
input; the ratio is variant / plain float32 (below 1: the variant is faster).
Both tables are printed and written to tools/bench_unet_results.md.

Usage:
    python tools/bench_unet.py                 # 32x32 and 64x64, float32 and bf16
    python tools/bench_unet.py --sizes 32 --precisions float32 --repeats 3 --no-write
    python tools/bench_unet.py --sizes --variant-size 32 --no-write  # variants only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlearn.attention import set_attention_backend  # noqa: E402
from sdlearn.fast import time_alternating  # noqa: E402
from sdlearn.interop.unet import (  # noqa: E402
    unet_config_to_diffusers,
    unet_from_diffusers,
)
from sdlearn.unet import UNet, UNetConfig  # noqa: E402

RESULTS = ROOT / "tools" / "bench_unet_results.md"
PRECISIONS = ("float32", "bf16-autocast")
BATCH = 2  # classifier-free guidance: the conditional and the unconditional pass
TEXT_TOKENS = 77  # CLIP's context length


def bench_case(ours, theirs, size: int, precision: str, repeats: int) -> dict:
    """Median seconds per step of both models on one latent size and precision."""
    sample, timestep, context = inputs(size)
    autocast = torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=precision != "float32"
    )

    def step_ours() -> torch.Tensor:
        with autocast:
            return ours(sample, timestep, context)

    def step_theirs() -> torch.Tensor:
        with autocast:
            return theirs(sample, timestep, context, return_dict=False)[0]

    result = alternate({"sdlearn": step_ours, "diffusers": step_theirs}, repeats)
    runs, outputs = result["runs"], result["outputs"]
    # the ratio of each back-to-back pair, then the median: a drift in the
    # machine's load between pairs cancels out
    pairs = zip(runs["sdlearn"], runs["diffusers"], strict=True)
    return {
        "size": size,
        "precision": precision,
        "sdlearn": statistics.median(runs["sdlearn"]),
        "diffusers": statistics.median(runs["diffusers"]),
        "ratio": statistics.median(ours / theirs for ours, theirs in pairs),
        "max_diff": (outputs["sdlearn"].float() - outputs["diffusers"].float())
        .abs()
        .max()
        .item(),
        "runs": runs,
    }


def inputs(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's input: latents, the timestep of each, the text tokens."""
    g = torch.Generator().manual_seed(size)
    sample = torch.randn(BATCH, 4, size, size, generator=g)
    timestep = torch.tensor([500] * BATCH)
    context = torch.randn(BATCH, TEXT_TOKENS, 768, generator=g)
    return sample, timestep, context


def alternate(steps: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict:
    """Seconds of each step, taking turns (`sdlearn.fast.time_alternating`),
    and the output of each one's warm-up run, to compare."""
    with torch.inference_mode():
        outputs = {name: step() for name, step in steps.items()}  # warm-up
    return {"runs": time_alternating(steps, repeats, warmup=0), "outputs": outputs}


# (name, attention backend, channels_last, bf16 autocast)
VARIANTS = (
    ("readable attention", "readable", False, False),
    ("channels_last", "fused", True, False),
    ("bf16 autocast", "fused", False, True),
    ("bf16 autocast + channels_last", "fused", True, True),
)


def bench_variants(ours: UNet, size: int, repeats: int) -> list[dict]:
    """Each speed-up against plain float32 sdlearn (fused attention), in turns."""
    sample, timestep, context = inputs(size)
    # channels_last converts the weights of every convolution: a copy, so the
    # plain model keeps its contiguous layout
    ours_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    sample_cl = sample.contiguous(memory_format=torch.channels_last)

    def make_step(backend: str, channels_last: bool, bf16: bool):
        model = ours_cl if channels_last else ours
        x = sample_cl if channels_last else sample

        def step() -> torch.Tensor:
            set_attention_backend(model, backend)
            cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else None
            with cast or contextlib.nullcontext():
                return model(x, timestep, context)

        return step

    plain = make_step("fused", False, False)
    rows = []
    for name, backend, channels_last, bf16 in VARIANTS:
        result = alternate(
            {"plain": plain, name: make_step(backend, channels_last, bf16)}, repeats
        )
        runs = result["runs"]
        pairs = zip(runs[name], runs["plain"], strict=True)
        out, ref = result["outputs"][name], result["outputs"]["plain"]
        rows.append(
            {
                "size": size,
                "variant": name,
                "seconds": statistics.median(runs[name]),
                "plain": statistics.median(runs["plain"]),
                "ratio": statistics.median(v / p for v, p in pairs),
                "max_diff": (out.float() - ref.float()).abs().max().item(),
                "runs": runs,
            }
        )
    set_attention_backend(ours, "fused")
    return rows


def variants_table(rows: list[dict]) -> str:
    lines = [
        "| latents | sdlearn variant | s/step | plain float32 s/step "
        "| variant / plain (median of pairs) | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        size = f"{row['size']}x{row['size']}"
        lines.append(
            f"| {size} | {row['variant']} | {row['seconds']:.3f} "
            f"| {row['plain']:.3f} | {row['ratio']:.3f} | {row['max_diff']:.1e} |"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| latents | precision | sdlearn s/step | diffusers s/step "
        "| sdlearn / diffusers (median of pairs) | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        size = f"{row['size']}x{row['size']}"
        lines.append(
            f"| {size} | {row['precision']} | {row['sdlearn']:.3f} "
            f"| {row['diffusers']:.3f} | {row['ratio']:.3f} | {row['max_diff']:.1e} |"
        )
    return "\n".join(lines)


def environment() -> str:
    return (
        f"torch {torch.__version__}, diffusers {metadata.version('diffusers')}, "
        f"Python {platform.python_version()}, {torch.get_num_threads()} threads "
        f"({os.cpu_count()} CPUs), {platform.processor() or platform.machine()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[32, 64])
    parser.add_argument(
        "--variant-size",
        type=int,
        default=32,
        help="latent size of the sdlearn-only variants table (0: skip it)",
    )
    parser.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS)
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each")
    parser.add_argument("--no-write", action="store_true", help="only print")
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)  # diffusers' initialisation draws from the global generator
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(UNetConfig.sd15())).eval()
    ours = unet_from_diffusers(theirs).eval()

    print(environment())
    load_before = os.getloadavg()
    rows = []
    for size in args.sizes:
        for precision in args.precisions:
            row = bench_case(ours, theirs, size, precision, args.repeats)
            rows.append(row)
            runs = {k: [round(s, 3) for s in v] for k, v in row["runs"].items()}
            print(f"{size}x{size} {precision}: {runs}", flush=True)
    variant_rows = []
    if args.variant_size:
        variant_rows = bench_variants(ours, args.variant_size, args.repeats)
        for row in variant_rows:
            runs = {k: [round(s, 3) for s in v] for k, v in row["runs"].items()}
            print(f"{args.variant_size} {row['variant']}: {runs}", flush=True)
    load_after = os.getloadavg()
    result = table(rows) if rows else ""
    variants = variants_table(variant_rows) if variant_rows else ""
    print(result, variants, sep="\n\n")
    if args.no_write:
        return
    RESULTS.write_text(
        "# UNet speed: sdlearn vs diffusers\n\n"
        "Written by `make bench` (`python tools/bench_unet.py`). Stable Diffusion "
        "1.x's UNet with the same random weights in both libraries, one denoising "
        f"step on a batch of {BATCH} (classifier-free guidance) with "
        f"{TEXT_TOKENS} text tokens, under `torch.inference_mode()`; "
        f"median of {args.repeats} timed runs each after one warm-up, the two "
        "libraries taking turns in the same process; the ratio is the median of "
        "the ratios of back-to-back pairs. bf16-autocast: "
        '`torch.autocast("cpu", dtype=torch.bfloat16)` around float32 weights.\n\n'
        f"{result}\n\n"
        "## sdlearn's speed-ups against plain float32\n\n"
        "The same UNet in sdlearn alone: each variant takes turns with the plain "
        "float32 model (fused attention, contiguous memory) on the same weights "
        "and input. readable attention: `set_attention_backend(unet, "
        '"readable")`, softmax(QKᵀ/√d)V written out; channels_last: weights and '
        "latents in `torch.channels_last` memory; max abs diff: against the "
        "plain model's output.\n\n"
        f"{variants}\n\n"
        f"Environment: {environment()}.\n\n"
        f"One-minute load average {load_before[0]:.1f} before and "
        f"{load_after[0]:.1f} after the run (the benchmark's own threads count "
        "too; more than the core count means other work shared the CPU). "
        "Absolute times vary with the machine and its load; taking turns in one "
        "process keeps the ratio fair.\n"
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
