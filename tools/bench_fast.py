"""Chapter 10's benchmark: sdlearn's fast path against diffusers, same weights.

1. The machine: its matrix-multiply peak in float32 and bfloat16 (two 4096 x
   4096 matrices, the median of 5), the roof a UNet step can approach; part 2
   measures the bfloat16 one again, in turns with the steps it is set against.
2. Stable Diffusion 1.5's UNet, one step on 64x64 latents (a 512x512 image), a
   batch of 2 (classifier-free guidance), weights in bfloat16: sdlearn,
   sdlearn compiled (`sdlearn.fast.compiled`: inductor with frozen weights) and
   sdlearn in channels_last memory, sdlearn compiled with its own attention
   kernel (`sdlearn.kernels`, where the CPU has AMX), and diffusers the first
   three ways, taking turns; the step's FLOPs over its time, as a fraction of
   the bfloat16 peak.
3. One 512x512 image end to end (text encoder, UNet steps, VAE decoder), Stable
   Diffusion 1.5's architecture with random weights shared by both libraries,
   guidance 7.5: diffusers' default (float32, PNDM, 50 steps), diffusers' CPU
   recipe from its Intel example (bfloat16, channels_last UNet and VAE,
   DPM-Solver++, 20 steps; without the Intel extension), and `sdlearn generate --fast`'s
   recipe (`FastRecipe()`). The recipes take turns; diffusers' default, 8 to 9
   minutes an image on 2 cores, runs `--default-repeats` times.
4. The recipe's cost in quality, on the course's tiny model: `sdlearn evaluate`'s
   scores (4 seeds, guidance 7.5 and 1) with the defaults and with `--fast`.

Every run's seconds go to tools/bench_fast_results.json, the tables to
tools/bench_fast_results.md. Run it on a quiet machine: nothing else running.

Usage:
    python tools/bench_fast.py                    # all four, about 25 minutes
    python tools/bench_fast.py --parts unet --repeats 3 --no-write
    python tools/bench_fast.py --parts unet   # again; the other parts' results stay
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlearn import kernels  # noqa: E402
from sdlearn.attention import set_attention_backend  # noqa: E402
from sdlearn.evaluate import evaluate_pipeline, flat_metrics  # noqa: E402
from sdlearn.fast import (  # noqa: E402
    FastRecipe,
    compiled,
    matmul_peak,
    ratio_of_pairs,
    step_flops,
    time_alternating,
)
from sdlearn.unet import UNetConfig  # noqa: E402

RESULTS = ROOT / "tools" / "bench_fast_results"
PROMPT = "a photograph of an astronaut riding a horse"
PARTS = ("peak", "unet", "image", "quality")


def environment() -> dict:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "diffusers": metadata.version("diffusers"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }


def bench_peak() -> dict:
    return {
        str(dtype).removeprefix("torch."): matmul_peak(dtype, n=4096)
        for dtype in (torch.float32, torch.bfloat16)
    }


def sd15_unets():
    """SD 1.5's UNet in both libraries, diffusers' random initialisation."""
    from diffusers import UNet2DConditionModel

    from sdlearn.interop.unet import unet_config_to_diffusers, unet_from_diffusers

    torch.manual_seed(0)  # diffusers' initialisation draws from the global generator
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(UNetConfig.sd15()))
    return unet_from_diffusers(theirs).eval(), theirs.eval()


def bench_unet(repeats: int) -> dict:
    """One bf16 step at 64x64: each way in turns; the FLOPs and the roofline.

    The roof is measured in the same turns: 4 products of two 4096 x 4096
    bfloat16 matrices, so that the peak and the steps see the same machine
    (a shared machine's speed drifts by tens of percent from minute to minute).
    """
    ours, theirs = sd15_unets()
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    g = torch.Generator().manual_seed(64)
    sample = torch.randn(2, 4, 64, 64, generator=g).bfloat16()
    timestep = torch.tensor([500, 500])
    text = torch.randn(2, 77, 768, generator=g).bfloat16()
    ours_amx = None
    if kernels.amx_attention_available():
        ours_amx = compiled(set_attention_backend(copy.deepcopy(ours), "amx"))
    ours_compiled, theirs_compiled = compiled(ours), compiled(theirs)
    last = torch.channels_last
    ours_last = copy.deepcopy(ours).to(memory_format=last)
    theirs_last = copy.deepcopy(theirs).to(memory_format=last)
    sample_last = sample.contiguous(memory_format=last)
    outputs, compile_seconds = {}, {}
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(4096, 4096, generator=g).bfloat16() for _ in range(2))

    def matmuls() -> torch.Tensor:
        for _ in range(3):
            a @ b
        return a @ b

    steps = {
        "sdlearn": lambda: ours(sample, timestep, text),
        "sdlearn compiled": lambda: ours_compiled(sample, timestep, text),
        "sdlearn channels_last": lambda: ours_last(sample_last, timestep, text),
        **(
            {
                "sdlearn compiled, AMX attention": lambda: ours_amx(
                    sample, timestep, text
                )
            }
            if ours_amx is not None
            else {}
        ),
        "diffusers": lambda: theirs(sample, timestep, text, return_dict=False)[0],
        "diffusers compiled": lambda: theirs_compiled(
            sample, timestep, text, return_dict=False
        )[0],
        "diffusers channels_last": lambda: theirs_last(
            sample_last, timestep, text, return_dict=False
        )[0],
    }
    with torch.inference_mode():
        for name, step in steps.items():  # the first call compiles
            start = time.perf_counter()
            outputs[name] = step().float()
            compile_seconds[name] = time.perf_counter() - start
            print(f"unet {name}: first call {compile_seconds[name]:.1f} s", flush=True)
    matmuls()  # its warm-up; the steps' first calls were theirs
    runs = time_alternating({**steps, "peak": matmuls}, repeats, warmup=0)
    peak = 4 * 2 * 4096**3 / statistics.median(runs.pop("peak"))
    flops = step_flops(UNetConfig.sd15(), 64)
    result = {"flops": flops, "first_call_seconds": compile_seconds, "runs": runs}
    result["bf16_peak"] = peak
    result["median"] = {name: statistics.median(r) for name, r in runs.items()}
    result["ratio_to_diffusers"] = {
        name: ratio_of_pairs(runs, name, "diffusers") for name in runs
    }
    result["ratio_to_diffusers_compiled"] = {
        name: ratio_of_pairs(runs, name, "diffusers compiled") for name in runs
    }
    result["peak_fraction"] = {
        name: flops / seconds / peak for name, seconds in result["median"].items()
    }
    result["vae_decode"] = bench_vae_decode(repeats)
    reference = outputs["diffusers"]
    result["max_abs_diff_to_diffusers"] = {
        name: (out - reference).abs().max().item() for name, out in outputs.items()
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return result


def bench_vae_decode(repeats: int) -> dict:
    """SD 1.5's VAE decoder, bfloat16, 64x64 latents to a 512x512 image:
    contiguous against channels_last memory, in turns."""
    from sdlearn.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.sd15()).eval().to(torch.bfloat16)
    vae_last = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    latents = latents.bfloat16()
    last = latents.contiguous(memory_format=torch.channels_last)
    runs = time_alternating(
        {
            "contiguous": lambda: vae.decode(latents),
            "channels_last": lambda: vae_last.decode(last),
        },
        repeats,
    )
    return {
        "runs": runs,
        "median": {name: statistics.median(r) for name, r in runs.items()},
        "ratio": ratio_of_pairs(runs, "channels_last", "contiguous"),
    }


def sd15_pipelines():
    """SD 1.5's architecture with random weights, in both libraries."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import PNDMScheduler
    from diffusers import StableDiffusionPipeline as DiffusersPipeline
    from transformers import CLIPTextConfig as TheirTextConfig
    from transformers import CLIPTextModel as TheirTextModel

    from sdlearn.clip import CLIPTextConfig
    from sdlearn.interop.clip import (
        text_config_to_transformers,
        text_encoder_from_transformers,
    )
    from sdlearn.interop.vae import vae_config_to_diffusers, vae_from_diffusers
    from sdlearn.pipeline import StableDiffusionPipeline
    from sdlearn.schedulers import DDPMScheduler
    from sdlearn.tokenizer import CLIPTokenizer
    from sdlearn.vae import VAEConfig
    from tools.reference.tokenizer import build_transformers_tokenizer

    unet, their_unet = sd15_unets()
    vae = DiffusersVAE(**vae_config_to_diffusers(VAEConfig.sd15())).eval()
    text = text_config_to_transformers(CLIPTextConfig.sd15())
    text_encoder = TheirTextModel(TheirTextConfig(**text)).eval()
    ours = StableDiffusionPipeline(
        CLIPTokenizer(),
        text_encoder_from_transformers(text_encoder),
        vae_from_diffusers(vae),
        unet,
        DDPMScheduler(),  # SD 1.5's noise schedule; the recipe picks the sampler
    )
    ours.progress = False
    # SD 1.5's own scheduler_config.json
    pndm = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    theirs = DiffusersPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_transformers_tokenizer(Path(tempfile.mkdtemp())),
        unet=their_unet,
        scheduler=pndm,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def bench_image(repeats: int, default_repeats: int) -> dict:
    """One 512x512 image: diffusers' default, diffusers' CPU recipe, sdlearn's."""
    from diffusers import DPMSolverMultistepScheduler

    ours, theirs = sd15_pipelines()
    fast = FastRecipe()
    turned_on = fast.apply(ours)

    # its Intel example's recipe without the Intel extension (which the
    # example uses to cast to bfloat16): bfloat16 weights, channels_last UNet
    # and VAE, DPM-Solver++; 20 steps, fewer than the example's 50
    recipe = copy.deepcopy(theirs).to(torch.bfloat16)
    recipe.unet.to(memory_format=torch.channels_last)
    recipe.vae.to(memory_format=torch.channels_last)
    recipe.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)

    def draw(pipe, steps: int):
        def run():
            g = torch.Generator().manual_seed(0)
            settings = {"height": 512, "width": 512, "guidance_scale": 7.5}
            return pipe(PROMPT, num_inference_steps=steps, generator=g, **settings)

        return run

    runs = time_alternating(
        {
            "sdlearn --fast": draw(ours, fast.steps),
            "diffusers CPU recipe": draw(recipe, 20),
        },
        repeats,
    )
    print(json.dumps(runs), flush=True)
    if default_repeats:
        runs |= time_alternating(
            {"diffusers default": draw(theirs, 50)}, default_repeats, warmup=0
        )
    medians = {name: statistics.median(r) for name, r in runs.items()}
    result = {"recipe": turned_on, "runs": runs, "median": medians}
    if default_repeats:
        result["fraction_of_diffusers_default"] = {
            name: seconds / medians["diffusers default"]
            for name, seconds in medians.items()
        }
    result["ratio_to_diffusers_recipe"] = ratio_of_pairs(
        runs, "sdlearn --fast", "diffusers CPU recipe"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return result


def bench_quality(seeds: int) -> dict:
    """`sdlearn evaluate`'s scores on the tiny model, default and --fast."""
    from sdlearn.pipeline_io import from_pretrained

    scores = {}
    for name in ("default", "--fast"):
        pipe = from_pretrained()
        steps = 50
        if name == "--fast":
            FastRecipe().apply(pipe)
            steps = FastRecipe().steps
        for guidance in (7.5, 1.0):
            summaries, _ = evaluate_pipeline(
                pipe, seeds=seeds, guidance_scale=guidance, num_inference_steps=steps
            )
            scores[f"{name}, guidance {guidance:g}"] = flat_metrics(summaries)
    losses = {
        f"{key}, guidance {g:g}": scores[f"default, guidance {g:g}"][key]
        - scores[f"--fast, guidance {g:g}"][key]
        for g in (7.5, 1.0)
        for key in scores[f"default, guidance {g:g}"]
    }
    result = {"seeds": seeds, "scores": scores, "loss_in_points": losses}
    result["largest_loss"] = max(losses.values())
    print(json.dumps(result, indent=1))
    return result


def tables(record: dict) -> str:
    lines = ["# Fast on a CPU: sdlearn against diffusers", ""]
    lines.append(
        "Written by `make bench` (`python tools/bench_fast.py`); every run's "
        "seconds are in `bench_fast_results.json`. Chapter 10 explains each rung."
    )
    env = record["environment"]
    lines += [
        "",
        f"Machine: {env['cpus']} CPUs, {env['threads']} threads, {env['machine']}; "
        f"torch {env['torch']}, diffusers {env['diffusers']}; load average "
        f"{record['load'][0]:.1f} before, {record['load'][1]:.1f} after.",
    ]
    if "peak" in record:
        peak = record["peak"]
        lines += [
            "",
            f"Matrix-multiply peak: {peak['float32'] / 1e9:.0f} GFLOP/s in float32, "
            f"{peak['bfloat16'] / 1e9:.0f} GFLOP/s in bfloat16.",
        ]
    if "unet" in record:
        unet = record["unet"]
        lines += [
            "",
            "## SD 1.5's UNet, one step: 64x64 latents, batch 2, bfloat16 weights",
            "",
            "Contiguous memory unless the row says channels_last.",
            "",
            f"{unet['flops'] / 1e9:.0f} GFLOP a step (matrix products and "
            "convolutions). Ratios: the median over rounds of back-to-back pairs. "
            "The bfloat16 peak, measured in the same turns (four 4096 x 4096 "
            f"products a round): {unet['bf16_peak'] / 1e9:.0f} GFLOP/s.",
            "",
            "| | s/step | / diffusers | / diffusers compiled | of the bf16 peak "
            "| first call, s |",
            "|---|---|---|---|---|---|",
        ]
        for name, seconds in unet["median"].items():
            fraction = unet.get("peak_fraction", {}).get(name)
            lines.append(
                f"| {name} | {seconds:.3f} | {unet['ratio_to_diffusers'][name]:.2f} "
                f"| {unet['ratio_to_diffusers_compiled'][name]:.2f} "
                f"| {'' if fraction is None else f'{fraction:.0%}'} "
                f"| {unet['first_call_seconds'][name]:.0f} |"
            )
        vae = unet["vae_decode"]
        lines += [
            "",
            "SD 1.5's VAE decoder, bfloat16, 64x64 latents to 512x512 pixels: "
            f"{vae['median']['contiguous']:.2f} s contiguous, "
            f"{vae['median']['channels_last']:.2f} s channels_last "
            f"(ratio {vae['ratio']:.2f}).",
        ]
    if "image" in record:
        image = record["image"]
        lines += [
            "",
            "## One 512x512 image: SD 1.5's architecture, random weights",
            "",
            f"sdlearn --fast: {'; '.join(image['recipe'])}. diffusers' CPU "
            "recipe (its Intel example's, without the Intel extension): bfloat16, "
            "channels_last UNet and VAE, DPM-Solver++, 20 steps. "
            "diffusers' default: float32, PNDM, 50 steps.",
            "",
            "| | s/image | runs | of diffusers' default |",
            "|---|---|---|---|",
        ]
        fraction = image.get("fraction_of_diffusers_default", {})
        for name, seconds in image["median"].items():
            share = f"1/{1 / fraction[name]:.1f}" if name in fraction else ""
            lines.append(
                f"| {name} | {seconds:.1f} | {len(image['runs'][name])} | {share} |"
            )
        lines += [
            "",
            "sdlearn --fast / diffusers' CPU recipe (median of pairs): "
            f"{image['ratio_to_diffusers_recipe']:.2f}.",
        ]
    if "quality" in record:
        quality = record["quality"]
        lines += [
            "",
            "## The recipe's cost in quality: the tiny model, `sdlearn evaluate`",
            "",
            f"Percent of images right, {quality['seeds']} seeds a prompt; the loss "
            "is default minus --fast, in points.",
            "",
            "| score | guidance | default | --fast | loss |",
            "|---|---|---|---|---|",
        ]
        for g in ("7.5", "1"):
            default = quality["scores"][f"default, guidance {g}"]
            fast = quality["scores"][f"--fast, guidance {g}"]
            for key, value in default.items():
                lines.append(
                    f"| {key} | {g} | {value:.1f} | {fast[key]:.1f} "
                    f"| {value - fast[key]:.1f} |"
                )
        lines += ["", f"Largest loss: {quality['largest_loss']:.1f} points."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each")
    parser.add_argument(
        "--default-repeats",
        type=int,
        default=1,
        help="runs of diffusers' default 50-step float32 image (0: skip it)",
    )
    parser.add_argument("--seeds", type=int, default=4, help="the quality's seeds")
    parser.add_argument("--no-write", action="store_true", help="only print")
    args = parser.parse_args()

    record = {}
    if args.parts != list(PARTS) and RESULTS.with_suffix(".json").exists():
        # some parts again: the others' results stay as the file has them
        record = json.loads(RESULTS.with_suffix(".json").read_text())
    record["environment"] = environment()
    load_before = os.getloadavg()[0]
    if "peak" in args.parts:
        record["peak"] = bench_peak()
        print(record["peak"], flush=True)
    if "unet" in args.parts:
        record["unet"] = bench_unet(args.repeats)
    if "image" in args.parts:
        record["image"] = bench_image(max(args.repeats - 2, 1), args.default_repeats)
    if "quality" in args.parts:
        record["quality"] = bench_quality(args.seeds)
    finish(record, args.parts, load_before, RESULTS, tables, write=not args.no_write)


def finish(
    record: dict,
    parts: list[str],
    load_before: float,
    results: Path,
    tables: Callable[[dict], str],
    write: bool = True,
) -> None:
    """Stamps `record` with the load and the parts run, prints its tables, and
    writes both, `results`.json and .md (unless `write` is False)."""
    record["load"] = [load_before, os.getloadavg()[0]]
    when = record["environment"]["date"]
    record.setdefault("parts_run", {}).update({part: when for part in parts})
    text = tables(record)
    print(text)
    if write:
        results.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        results.with_suffix(".md").write_text(text)
        print(f"wrote {results.relative_to(ROOT)}.json and .md")


if __name__ == "__main__":
    main()
