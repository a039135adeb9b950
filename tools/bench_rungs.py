"""Chapter 10's later rungs: settings, fused layers, merged tokens, a small decoder.

1. settings: the allocator and OpenMP's thread placement, which a process
   fixes when it starts, so each setting runs in a process of its own, the
   processes taking turns: the glibc default, jemalloc and tcmalloc (by
   LD_PRELOAD, where installed: `make bench-deps`), and threads bound to cores
   (OMP_PROC_BIND=close, OMP_PLACES=cores). Each process times the recipe's
   UNet step: Stable Diffusion 1.5, bfloat16 weights in channels_last memory,
   64x64 latents, a batch of 2.
2. rungs: the same step in one process, in turns: without merging, with
   fused projections (`sdlearn.fast.fuse_projections`), with tokens merged
   (`sdlearn.merging.merge_tokens`, 25% and 50%, the recipe's), and with both;
   level 0's projections alone, three products against one; the fused
   attention kernel at head widths 40 to 128; and the tiny model's step
   (float32, 8x8 latents) with and without fused projections.
3. kernel: sdlearn's AMX attention kernel (`sdlearn.kernels`) against torch's
   fused one, in turns, on SD 1.5's self-attention at 64x64: level 0 (4,096
   tokens) at head widths 40 (SD 1.5's) to 128, level 0 with half its tokens
   merged (2,048), and level 1 (1,024 tokens, width 80). Skipped where the
   kernel does not run.
4. decoder: SD 1.5's VAE decoder against one of half the width (random
   weights: the time only), bfloat16, channels_last, 64x64 latents to 512x512.
5. quality: `sdlearn evaluate`'s scores on the tiny model (4 seeds, guidance 7.5
   and 1) for the recipe without merging, with fused projections, with half
   the tokens merged (the recipe), with three quarters, and with the course's
   small decoder (`sdlearn.small_decoder`).

Every run's seconds go to tools/bench_rungs_results.json, the tables to
tools/bench_rungs_results.md. Run it on a quiet machine.

Usage:
    python tools/bench_rungs.py                    # all five, about 13 minutes
    python tools/bench_rungs.py --parts rungs --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlearn import kernels  # noqa: E402
from sdlearn.evaluate import evaluate_pipeline, flat_metrics  # noqa: E402
from sdlearn.fast import (  # noqa: E402
    FastRecipe,
    FusedSelfAttention,
    fuse_projections,
    ratio_of_pairs,
    time_alternating,
)
from sdlearn.merging import merge_tokens  # noqa: E402
from sdlearn.pipeline_io import from_pretrained  # noqa: E402
from sdlearn.small_decoder import (  # noqa: E402
    SmallDecoder,
    WithDecoder,
    shipped_small_decoder,
    smaller_config,
)
from sdlearn.unet import UNet, UNetConfig  # noqa: E402
from sdlearn.vae import VAEConfig  # noqa: E402
from tools.bench_fast import environment, finish  # noqa: E402

RESULTS = ROOT / "tools" / "bench_rungs_results"
PARTS = ("settings", "rungs", "kernel", "decoder", "quality")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# jemalloc's settings from PyTorch's CPU performance guide: keep freed pages
# for reuse, rather than give them back to the system after every step
JEMALLOC_CONF = (
    "oversize_threshold:1,background_thread:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
)


def find_library(name: str) -> str | None:
    for folder in LIBRARY_DIRS:
        path = Path(folder) / name
        if path.exists():
            return str(path)
    return None


def settings() -> dict[str, dict[str, str] | None]:
    """Each setting's environment variables; None where its library is missing."""
    jemalloc = find_library("libjemalloc.so.2")
    tcmalloc = find_library("libtcmalloc_minimal.so.4")
    return {
        "default": {},
        "jemalloc": jemalloc and {"LD_PRELOAD": jemalloc, "MALLOC_CONF": JEMALLOC_CONF},
        "tcmalloc": tcmalloc and {"LD_PRELOAD": tcmalloc},
        "threads bound to cores": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},
    }


def recipe_unet() -> UNet:
    """SD 1.5's UNet as the recipe runs it: bfloat16, channels_last."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.sd15()).eval().to(torch.bfloat16)
    return unet.to(memory_format=torch.channels_last)


def sd15_inputs(batch: int = 2, size: int = 64):
    g = torch.Generator().manual_seed(64)
    sample = torch.randn(batch, 4, size, size, generator=g).bfloat16()
    sample = sample.contiguous(memory_format=torch.channels_last)
    text = torch.randn(batch, 77, 768, generator=g).bfloat16()
    return sample, torch.full((batch,), 500), text


def one_process_steps(repeats: int) -> list[float]:
    """The recipe's step, timed `repeats` times after one warm-up, in this process."""
    unet, inputs = recipe_unet(), sd15_inputs()
    return time_alternating({"step": lambda: unet(*inputs)}, repeats)["step"]


def bench_settings(rounds: int, repeats: int) -> dict:
    """Each setting in a process of its own; the processes take turns."""
    found = settings()
    missing = [name for name, env in found.items() if env is None]
    names = [name for name in found if name not in missing]
    runs = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            env = {**os.environ, **found[name]}
            command = [sys.executable, __file__, "--one-process", str(repeats)]
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{name}: the step's process failed:\n{out.stderr}")
            # each round's median, so that rounds pair up for the ratios
            runs[name].append(
                statistics.median(json.loads(out.stdout.splitlines()[-1]))
            )
            print(f"settings round {r}: {name} {runs[name][-1]:.3f} s", flush=True)
    result = {"environments": {n: found[n] for n in names}, "not_installed": missing}
    result["runs"] = runs
    result["median"] = {name: statistics.median(r) for name, r in runs.items()}
    result["ratio_to_default"] = {n: ratio_of_pairs(runs, n, "default") for n in names}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return result


def _sd15_rungs(repeats: int) -> tuple[dict, dict]:
    """SD 1.5's step without merging, fused, merged, both; its projections."""
    base = recipe_unet()
    fused = fuse_projections(copy.deepcopy(base))
    merged = {ratio: copy.deepcopy(base) for ratio in (0.25, 0.5)}
    for ratio, unet in merged.items():
        merge_tokens(unet, ratio)
    both = copy.deepcopy(fused)
    merge_tokens(both, 0.5)
    inputs = sd15_inputs()
    sd15 = time_alternating(
        {
            "no merging": lambda: base(*inputs),
            "fused projections": lambda: fused(*inputs),
            "tokens merged 25%": lambda: merged[0.25](*inputs),
            "tokens merged 50% (--fast)": lambda: merged[0.5](*inputs),
            "fused, tokens merged 50%": lambda: both(*inputs),
        },
        repeats,
    )
    return sd15, bench_projections(base, inputs, repeats * 10)


def bench_rungs(repeats: int) -> dict:
    """Fused projections and merged tokens against the recipe's step, in turns."""
    sd15, projections = _sd15_rungs(repeats)
    pipe = from_pretrained()
    tiny = pipe.unet
    tiny_fused = fuse_projections(copy.deepcopy(tiny))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    tokens = pipe.encode_prompt(["a red circle", "a large blue square on the left"])
    timestep = torch.tensor([500, 500])
    tiny_runs = time_alternating(
        {
            "tiny": lambda: tiny(latents, timestep, tokens),
            "tiny, fused projections": lambda: tiny_fused(latents, timestep, tokens),
        },
        repeats * 20,  # a tiny step takes milliseconds
    )
    result = {
        "sd15": _summary(sd15, "no merging"),
        "projections": projections,
        "attention": bench_attention(repeats),
        "tiny": _summary(tiny_runs, "tiny"),
    }
    print(json.dumps({k: _drop_runs(v) for k, v in result.items()}, indent=1))
    return result


def bench_projections(unet: UNet, inputs: tuple, repeats: int) -> dict:
    """Level 0's first self-attention projections alone, on the tokens it
    sees in the step: three products against the fused one."""
    attention = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    fused = FusedSelfAttention(attention)
    sample = inputs[0]
    B, _, H, W = sample.shape
    x = torch.randn(B, H * W, attention.query_dim).bfloat16()  # (B, T, D)
    runs = time_alternating(
        {
            "three products": lambda: [
                p(x) for p in (attention.to_q, attention.to_k, attention.to_v)
            ],
            "one fused product": lambda: fused.to_qkv(x),
        },
        repeats,
    )
    return _summary(runs, "three products")


def bench_attention(repeats: int) -> dict:
    """The fused attention kernel on level 0's self-attention at 64x64 (2
    images, 8 heads, 4,096 tokens), bfloat16, at head widths 40 (SD 1.5's) to
    128: a time that hardly grows with the width is bound by the softmax's
    exponentials, one per pair of tokens, not by the products."""
    g = torch.Generator().manual_seed(0)
    steps, flops = {}, {}
    for width in (40, 64, 80, 128):
        q, k, v = (
            torch.randn(2, 8, 4096, width, generator=g).bfloat16() for _ in "qkv"
        )
        name = f"head width {width}"
        steps[name] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)
        flops[name] = 4 * 2 * 8 * 4096**2 * width  # QK^T and the weights times V
    result = _summary(time_alternating(steps, repeats * 2), "head width 40")
    result["gflop_per_second"] = {
        name: flops[name] / seconds / 1e9 for name, seconds in result["median"].items()
    }
    return result


def bench_kernel(repeats: int) -> dict | None:
    """sdlearn's AMX attention kernel against torch's, in turns, on SD 1.5's
    self-attention shapes at 64x64 (2 images, 8 heads), bfloat16."""
    if not kernels.amx_attention_available():
        print(f"kernel: skipped, {kernels.why_not()}", flush=True)
        return None
    shapes = {f"level 0, width {width}": (4096, width) for width in (40, 64, 80, 128)}
    shapes["level 0 merged 50%, width 40"] = (2048, 40)
    shapes["level 1, width 80"] = (1024, 80)
    g = torch.Generator().manual_seed(0)
    steps, flops = {}, {}
    for shape, (tokens, width) in shapes.items():
        q, k, v = (
            torch.randn(2, 8, tokens, width, generator=g).bfloat16() for _ in "qkv"
        )
        steps[f"{shape}: torch"] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
            q, k, v
        )
        steps[f"{shape}: sdlearn"] = lambda q=q, k=k, v=v: kernels.amx_attention(
            q, k, v
        )
        for who in ("torch", "sdlearn"):
            flops[f"{shape}: {who}"] = 4 * 2 * 8 * tokens**2 * width
    runs = time_alternating(steps, repeats * 2)
    result = {"runs": runs}
    result["median"] = {name: statistics.median(r) for name, r in runs.items()}
    result["sdlearn_to_torch"] = {
        shape: ratio_of_pairs(runs, f"{shape}: sdlearn", f"{shape}: torch")
        for shape in shapes
    }
    result["gflop_per_second"] = {
        name: flops[name] / seconds / 1e9 for name, seconds in result["median"].items()
    }
    print(json.dumps(_drop_runs(result), indent=1))
    return result


def bench_decoder(repeats: int) -> dict:
    """SD 1.5's VAE decoder against one of half the width (random weights: the
    time only), bfloat16 in channels_last memory, 64x64 latents to a 512x512
    image, in turns."""
    torch.manual_seed(0)
    config = VAEConfig.sd15()
    decoders = {
        "full width": SmallDecoder(config),  # the VAE's own post_quant_conv, decoder
        "half width": SmallDecoder(smaller_config(config)),
    }
    for decoder in decoders.values():
        decoder.eval().to(torch.bfloat16).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 64, 64, generator=g).bfloat16()
    z = z.contiguous(memory_format=torch.channels_last)
    runs = time_alternating({n: lambda d=d: d(z) for n, d in decoders.items()}, repeats)
    result = _summary(runs, "full width")
    result["parameters"] = {
        name: sum(p.numel() for p in d.parameters()) for name, d in decoders.items()
    }
    print(json.dumps(_drop_runs(result), indent=1))
    return result


def _summary(runs: dict[str, list[float]], baseline: str) -> dict:
    return {
        "runs": runs,
        "median": {name: statistics.median(r) for name, r in runs.items()},
        "ratio": {name: ratio_of_pairs(runs, name, baseline) for name in runs},
    }


def _drop_runs(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "runs"}


def bench_quality(seeds: int) -> dict:
    """The tiny model's scores: the recipe, with fused projections, with
    merging, with the small decoder."""

    def unchanged(pipe) -> None:
        pass

    def fused(pipe) -> None:
        fuse_projections(pipe.unet)

    def small_decoder(pipe) -> None:
        decoder = shipped_small_decoder().to(pipe.dtype)
        pipe.vae = WithDecoder(pipe.vae, decoder.to(memory_format=torch.channels_last))

    ways = {  # the recipe without merging, the baseline; then each rung on it
        "no merging": (FastRecipe(merge_ratio=0), unchanged),
        "fused projections": (FastRecipe(merge_ratio=0), fused),
        "tokens merged 50% (--fast)": (FastRecipe(), unchanged),
        "tokens merged 75%": (FastRecipe(merge_ratio=0.75), unchanged),
        "small decoder": (FastRecipe(merge_ratio=0), small_decoder),
    }
    scores = {}
    for name, (recipe, change) in ways.items():
        pipe = from_pretrained()
        recipe.apply(pipe)
        change(pipe)
        for guidance in (7.5, 1.0):
            summaries, _ = evaluate_pipeline(
                pipe,
                seeds=seeds,
                guidance_scale=guidance,
                num_inference_steps=recipe.steps,
            )
            scores[f"{name}, guidance {guidance:g}"] = flat_metrics(summaries)
    base = "no merging"
    losses = {
        name: max(
            scores[f"{base}, guidance {g:g}"][key]
            - scores[f"{name}, guidance {g:g}"][key]
            for g in (7.5, 1.0)
            for key in scores[f"{base}, guidance {g:g}"]
        )
        for name in ways
    }
    result = {"seeds": seeds, "scores": scores, "largest_loss": losses}
    print(json.dumps(result, indent=1))
    return result


def tables(record: dict) -> str:
    env = record["environment"]
    lines = [
        "# Chapter 10's later rungs: settings, fused projections, merged tokens",
        "",
        "Written by `python tools/bench_rungs.py` (part of `make bench`); every "
        "run's seconds are in `bench_rungs_results.json`.",
        "",
        f"Machine: {env['cpus']} CPUs, {env['threads']} threads, {env['machine']}; "
        f"torch {env['torch']}; load average {record['load'][0]:.1f} before, "
        f"{record['load'][1]:.1f} after.",
        "",
        "The recipe's step: SD 1.5's UNet, bfloat16 weights in channels_last "
        "memory, 64x64 latents, a batch of 2, eager. Ratios: the median over "
        "rounds of back-to-back pairs.",
    ]
    if "settings" in record:
        s = record["settings"]
        lines += ["", "## Process settings: a process each, in turns", ""]
        lines += ["| setting | s/step | / default |", "|---|---|---|"]
        for name, seconds in s["median"].items():
            lines.append(
                f"| {name} | {seconds:.3f} | {s['ratio_to_default'][name]:.2f} |"
            )
        if s["not_installed"]:
            lines += [
                "",
                f"Not installed, so not run: {', '.join(s['not_installed'])}.",
            ]
    if "rungs" in record:
        rungs = record["rungs"]
        lines += [
            "",
            "## Fused projections and merged tokens: one process, in turns",
            "",
            "SD 1.5's step without merging, then each rung on it; level 0's "
            "first self-attention projections alone (three products or one); the "
            "tiny model's step (float32, 8x8 latents).",
            "",
            "| | time | / the first row of its group |",
            "|---|---|---|",
        ]
        for part in ("sd15", "projections", "tiny"):
            r = rungs[part]
            for name, seconds in r["median"].items():
                shown = (
                    f"{seconds:.3f} s" if part == "sd15" else f"{seconds * 1e3:.2f} ms"
                )
                lines.append(f"| {name} | {shown} | {r['ratio'][name]:.2f} |")
        attention = rungs["attention"]
        lines += [
            "",
            "The fused attention kernel, level 0's self-attention at 64x64 (2 images, "
            "8 heads, 4,096 tokens), bfloat16:",
            "",
            "| | ms | GFLOP/s |",
            "|---|---|---|",
        ]
        for name, seconds in attention["median"].items():
            speed = attention["gflop_per_second"][name]
            lines.append(f"| {name} | {seconds * 1e3:.1f} | {speed:.0f} |")
    if record.get("kernel"):
        kernel = record["kernel"]
        lines += [
            "",
            "## sdlearn's AMX attention kernel against torch's: in turns",
            "",
            "SD 1.5's self-attention at 64x64 (2 images, 8 heads), bfloat16.",
            "",
            "| | torch, ms | sdlearn, ms | sdlearn / torch | sdlearn, GFLOP/s |",
            "|---|---|---|---|---|",
        ]
        for shape, ratio in kernel["sdlearn_to_torch"].items():
            theirs = kernel["median"][f"{shape}: torch"] * 1e3
            ours = kernel["median"][f"{shape}: sdlearn"] * 1e3
            speed = kernel["gflop_per_second"][f"{shape}: sdlearn"]
            lines.append(
                f"| {shape} | {theirs:.1f} | {ours:.1f} | {ratio:.2f} | {speed:.0f} |"
            )
    if "decoder" in record:
        d = record["decoder"]
        lines += [
            "",
            "## A decoder of half the width: SD 1.5's VAE, 64x64 latents to 512x512",
            "",
            "bfloat16, channels_last, random weights (the time only), in turns.",
            "",
            "| | s | / full width | parameters |",
            "|---|---|---|---|",
        ]
        for name, seconds in d["median"].items():
            lines.append(
                f"| {name} | {seconds:.3f} | {d['ratio'][name]:.2f} "
                f"| {d['parameters'][name] / 1e6:.1f} M |"
            )
    if "quality" in record:
        q = record["quality"]
        lines += [
            "",
            f"## Quality on the tiny model: `sdlearn evaluate`, {q['seeds']} seeds",
            "",
            "Percent of images right with colour, shape, position and size (every "
            "score is in the .json); the largest loss is against no merging, in "
            "points, over every score and both guidance scales.",
            "",
            "| | guidance | single-object | held-out combos |",
            "|---|---|---|---|",
        ]
        for name, found in q["scores"].items():
            way, guidance = name.rsplit(", guidance ", 1)
            single, held = found["single-object all"], found["held-out combos all"]
            lines.append(f"| {way} | {guidance} | {single:.1f} | {held:.1f} |")
        lines += ["", "| | largest loss |", "|---|---|"]
        lines += [
            f"| {name} | {loss:.1f} |" for name, loss in q["largest_loss"].items()
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each")
    parser.add_argument("--rounds", type=int, default=3, help="turns of the settings")
    parser.add_argument("--seeds", type=int, default=4, help="the quality's seeds")
    parser.add_argument("--no-write", action="store_true", help="only print")
    parser.add_argument("--one-process", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_process:  # a settings' child: print its seconds, nothing else
        print(json.dumps(one_process_steps(args.one_process)))
        return

    record = {}
    if args.parts != list(PARTS) and RESULTS.with_suffix(".json").exists():
        record = json.loads(RESULTS.with_suffix(".json").read_text())
    record["environment"] = environment()
    load_before = os.getloadavg()[0]
    if "settings" in args.parts:
        record["settings"] = bench_settings(args.rounds, args.repeats)
    if "rungs" in args.parts:
        record["rungs"] = bench_rungs(args.repeats)
    if "kernel" in args.parts:
        record["kernel"] = bench_kernel(args.repeats)
    if "decoder" in args.parts:
        record["decoder"] = bench_decoder(args.repeats)
    if "quality" in args.parts:
        record["quality"] = bench_quality(args.seeds)
    finish(record, args.parts, load_before, RESULTS, tables, write=not args.no_write)


if __name__ == "__main__":
    main()
