"""Shared test helpers: reference tensors and optional live libraries."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.pipeline import StableDiffusionPipeline
from sdlearn.schedulers import DDPMScheduler
from sdlearn.tokenizer import CLIPTokenizer
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def load_reference(name: str) -> dict[str, torch.Tensor]:
    """The tensors tools/make_reference.py saved as tests/reference/NAME.safetensors."""
    path = REFERENCE_DIR / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; run `python tools/make_reference.py {name}`"
        )
    return load_file(path)


def reference_versions(name: str) -> dict[str, str]:
    """The library versions recorded when NAME's reference tensors were made."""
    return json.loads((REFERENCE_DIR / "VERSIONS.json").read_text())[name]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# Live comparisons run where the reference library is installed (it is in `dev`).
needs_diffusers = pytest.mark.skipif(not has("diffusers"), reason="needs diffusers")
needs_transformers = pytest.mark.skipif(
    not has("transformers"), reason="needs transformers"
)


# Small random parts with SD's layout: a 2-level VAE (16x16 images <-> 8x8x4
# latents), a 2-level UNet with cross-attention at both levels, a 2-layer CLIP
# text encoder with the real vocabulary (the real tokenizer feeds it).
VAE_CONFIG = VAEConfig(
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    scaling_factor=0.5,
    sample_size=16,
)
UNET_CONFIG = UNetConfig(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_levels=(True, True),
    num_heads=(2, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
)
TEXT_CONFIG = CLIPTextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
SIZE = 16  # pixels
PROMPTS = ["a red circle on the left", "a large blue square"]


def randomize_(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Every parameter N(0, scale^2) from a seeded generator: no zero biases or
    unit norms that would hide a missing term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=g))
    return module.eval()


def random_pipeline() -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of small random parts (seeded)."""
    torch.manual_seed(0)
    text_encoder = randomize_(CLIPTextModel(TEXT_CONFIG), 1, 0.2)
    vae = randomize_(AutoencoderKL(VAE_CONFIG), 2, 0.1)
    unet = randomize_(UNet(UNET_CONFIG), 3, 0.1)
    pipe = StableDiffusionPipeline(
        CLIPTokenizer(), text_encoder, vae, unet, DDPMScheduler()
    )
    pipe.progress = False
    return pipe


# --- the chapters' exercise checks -------------------------------------------


def unsolved(*args, **kwargs):
    """An exercise left as the chapter hands it out."""
    raise NotImplementedError


def assert_refused(check, answer, capsys) -> str:
    """`check(answer)` says no without raising: a falsy Verdict, a ❌ and a hint.

    Returns:
        what the check printed, for more specific assertions.
    """
    from sdlearn.checks import Verdict

    verdict = check(answer)
    out = capsys.readouterr().out
    assert isinstance(verdict, Verdict) and not verdict
    assert "❌" in out and "Hint" in out
    return out


def assert_unsolved_never_raise(checks, capsys) -> None:
    """Every check says "not done yet" to an unsolved exercise, and gives no
    hint before a first try."""
    from sdlearn.checks import Verdict

    for check in checks:
        verdict = check(unsolved)
        assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert out.count("not done yet") == len(checks)
    assert "Hint" not in out


# The two UNets of tools/reference/unet.py ("b": three levels, two transformer
# layers per block, linear projections as in SD 2.x), written out here
# independently of the diffusers configs they were made from
UNET_REFERENCE_CONFIGS = {
    "a": UNetConfig(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_levels=(True, False),
        num_heads=(2, 2),
        cross_attention_dim=12,
        norm_num_groups=4,
    ),
    "b": UNetConfig(
        sample_size=8,
        block_out_channels=(8, 12, 16),
        layers_per_block=2,
        cross_attention_levels=(True, True, False),
        num_heads=(2, 3, 4),
        cross_attention_dim=20,
        transformer_layers_per_block=2,
        norm_num_groups=4,
        use_linear_projection=True,
    ),
}


def fake_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed function of the sample and the timestep, standing in for a UNet."""
    return torch.tanh(0.7 * sample + 0.001 * float(t)) - 0.1 * sample.roll(1, dims=-1)


def sample_loop(scheduler, steps: int, **step_kwargs) -> list[torch.Tensor]:
    """Every prev_sample (and pred_original_sample where there is one) of a
    seeded sampling loop driving `fake_model`, the way the pipeline does:
    starting noise times init_noise_sigma, scale_model_input, then step."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g) * scheduler.init_noise_sigma
    out = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        result = scheduler.step(
            fake_model(model_input, t), t, x, generator=g, **step_kwargs
        )
        x = result.prev_sample
        out.append(x)
        if getattr(result, "pred_original_sample", None) is not None:
            out.append(result.pred_original_sample)
    return out
