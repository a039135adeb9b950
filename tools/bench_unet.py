"""Time sdlearn's UNet against diffusers' UNet2DConditionModel on identical weights.

Both models are Stable Diffusion 1.x's UNet with the same random weights (made by
diffusers, copied into sdlearn). For each latent size and precision, the two run
the same denoising step, a batch of 2 as with classifier-free guidance, taking
turns so that a change in the machine's load hits both alike; the table gives the
median seconds per step and the median ratio sdlearn / diffusers of back-to-back
runs (below 1: sdlearn is faster). It is printed and written to
tools/bench_unet_results.md.

Usage:
    python tools/bench_unet.py                 # 32x32 and 64x64, float32 and bf16
    python tools/bench_unet.py --sizes 32 --precisions float32 --repeats 3 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlearn.unet import UNet, UNetConfig  # noqa: E402

RESULTS = ROOT / "tools" / "bench_unet_results.md"
PRECISIONS = ("float32", "bf16-autocast")
BATCH = 2  # classifier-free guidance: the conditional and the unconditional pass
TEXT_TOKENS = 77  # CLIP's context length


def timed(step: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = step()
    return time.perf_counter() - start, out


def bench_case(ours, theirs, size: int, precision: str, repeats: int) -> dict:
    """Median seconds per step of both models on one latent size and precision."""
    g = torch.Generator().manual_seed(size)
    sample = torch.randn(BATCH, 4, size, size, generator=g)
    timestep = torch.tensor([500, 500])
    context = torch.randn(BATCH, TEXT_TOKENS, 768, generator=g)
    autocast = torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=precision != "float32"
    )

    def step_ours() -> torch.Tensor:
        with autocast:
            return ours(sample, timestep, context)

    def step_theirs() -> torch.Tensor:
        with autocast:
            return theirs(sample, timestep, context, return_dict=False)[0]

    runs: dict[str, list[float]] = {"sdlearn": [], "diffusers": []}
    steps = {"sdlearn": step_ours, "diffusers": step_theirs}
    with torch.inference_mode():
        out_ours, out_theirs = step_ours(), step_theirs()  # warm-up
        for r in range(repeats):
            # alternate who goes first, so that neither always follows the other
            order = ("sdlearn", "diffusers") if r % 2 == 0 else ("diffusers", "sdlearn")
            for name in order:
                seconds, _ = timed(steps[name])
                runs[name].append(seconds)
    # the ratio of each back-to-back pair, then the median: a drift in the
    # machine's load between pairs cancels out
    pairs = zip(runs["sdlearn"], runs["diffusers"], strict=True)
    return {
        "size": size,
        "precision": precision,
        "sdlearn": statistics.median(runs["sdlearn"]),
        "diffusers": statistics.median(runs["diffusers"]),
        "ratio": statistics.median(ours / theirs for ours, theirs in pairs),
        "max_diff": (out_ours.float() - out_theirs.float()).abs().max().item(),
        "runs": runs,
    }


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
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS)
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each")
    parser.add_argument("--no-write", action="store_true", help="only print")
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)  # diffusers' initialisation draws from the global generator
    theirs = UNet2DConditionModel(**UNetConfig.sd15().to_diffusers()).eval()
    ours = UNet.from_diffusers(theirs).eval()

    print(environment())
    load_before = os.getloadavg()
    rows = []
    for size in args.sizes:
        for precision in args.precisions:
            row = bench_case(ours, theirs, size, precision, args.repeats)
            rows.append(row)
            runs = {k: [round(s, 3) for s in v] for k, v in row["runs"].items()}
            print(f"{size}x{size} {precision}: {runs}", flush=True)
    load_after = os.getloadavg()
    result = table(rows)
    print(result)
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
