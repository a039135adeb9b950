"""Tests for sdlearn/lora.py: adapters that start as the identity, merge and
unmerge exactly, save and load, and read the same in diffusers."""

from __future__ import annotations

import pytest
import torch

from sdlearn.interop.unet import unet_config_to_diffusers
from sdlearn.lora import (
    ATTENTION_TARGETS,
    RESNET_CONV_TARGETS,
    LoRAConv2d,
    LoRALinear,
    add_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_lora,
    set_lora_scale,
    unmerge_lora,
)
from sdlearn.unet import UNet
from tests.helpers import UNET_CONFIG, has, needs_diffusers, randomize_

# the adapted layers: attention projections only, or the ResnetBlocks' 3x3
# convolutions too
TARGETS = {
    "attention": ATTENTION_TARGETS,
    "attention+convs": ATTENTION_TARGETS + RESNET_CONV_TARGETS,
}


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, UNET_CONFIG.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 700]), text


def random_unet() -> UNet:
    return randomize_(UNet(UNET_CONFIG), 3, 0.1)


def train_adapters_(unet: UNet, seed: int = 1, scale: float = 0.05) -> None:
    """Stand-in for training: random B (and A) so the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in lora_layers(unet):
            for weight in (adapter.lora_A.weight, adapter.lora_B.weight):
                weight.copy_(scale * torch.randn(weight.shape, generator=g))


@torch.no_grad()
def test_zero_initialised_adapters_leave_the_outputs_unchanged():
    unet = random_unet()
    before = unet(*unet_inputs())
    adapters = add_lora(unet, rank=4, alpha=8)
    # the attention projections of 2 levels x (down, up) ... one per to_q/k/v/out
    assert (
        len(adapters)
        == 4 * sum(1 for n, _ in unet.named_modules() if n.endswith("attn1")) * 2
    )
    assert all(a.lora_B.weight.abs().max() == 0 for a in adapters.values())
    torch.testing.assert_close(unet(*unet_inputs()), before, rtol=0, atol=0)


def test_only_the_adapters_train():
    unet = random_unet()
    adapters = add_lora(unet, rank=2)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    expected = sum(
        a.rank * (a.base.in_features + a.base.out_features) for a in adapters.values()
    )
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == expected


@torch.no_grad()
def test_a_conv_adapter_is_a_low_rank_kernel():
    conv = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)
    layer = LoRAConv2d(conv, rank=2, alpha=4)
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)  # B = 0
    train_adapters_(layer)
    assert layer.lora_A.weight.shape == (2, 6, 3, 3)
    assert layer.lora_B.weight.shape == (5, 2, 1, 1)
    # the update is the convolution with the kernel scale * B A, of rank 2
    delta = layer.delta_weight()
    assert delta.shape == conv.weight.shape
    assert torch.linalg.matrix_rank(delta.flatten(1)) == 2
    expected = torch.nn.functional.conv2d(
        x, conv.weight + delta, conv.bias, stride=2, padding=1
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="LoRAConv2d adapts Conv2d layers"):
        LoRAConv2d(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="LoRALinear adapts Linear layers"):
        LoRALinear(conv)


@pytest.mark.parametrize("targets", TARGETS)
@torch.no_grad()
def test_merge_then_unmerge_restores_the_base_weights_exactly(targets):
    unet = random_unet()
    add_lora(unet, rank=4, alpha=2, targets=TARGETS[targets])
    train_adapters_(unet)
    base = {n: p.clone() for n, p in unet.named_parameters() if ".base." in n}
    unmerged = unet(*unet_inputs())
    merge_lora(unet)
    changed = [
        n
        for n, p in unet.named_parameters()
        if ".base." in n and not torch.equal(p, base[n])
    ]
    assert len(changed) == len(list(lora_layers(unet)))  # every adapted weight moved
    # merged and unmerged compute the same function (up to float rounding)
    torch.testing.assert_close(unet(*unet_inputs()), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merged already"):
        merge_lora(unet)
    unmerge_lora(unet)
    for name, parameter in unet.named_parameters():
        if ".base." in name:
            torch.testing.assert_close(parameter, base[name], rtol=0, atol=0)
    torch.testing.assert_close(unet(*unet_inputs()), unmerged, rtol=0, atol=0)


@torch.no_grad()
def test_scale_zero_is_the_base_model_and_scale_is_linear():
    unet = random_unet()
    base = unet(*unet_inputs())
    add_lora(unet, rank=4)
    train_adapters_(unet)
    full = unet(*unet_inputs())
    set_lora_scale(unet, 0.0)
    torch.testing.assert_close(unet(*unet_inputs()), base, rtol=0, atol=0)
    # a single layer's update is linear in the scale
    layer = LoRALinear(torch.nn.Linear(6, 5), rank=2)
    train_adapters_(layer)
    x = torch.randn(3, 6)
    half = layer(x) - layer.base(x)
    layer.multiplier = 0.5
    torch.testing.assert_close(layer(x) - layer.base(x), 0.5 * half)
    assert (full - base).abs().max() > 1e-4  # the adapters do change the UNet


@pytest.mark.parametrize("targets", TARGETS)
@torch.no_grad()
def test_save_and_load_give_the_same_outputs(tmp_path, targets):
    unet = random_unet()
    # scale 2, folded into lora_B on saving
    add_lora(unet, rank=3, alpha=6, targets=TARGETS[targets])
    train_adapters_(unet)
    expected = unet(*unet_inputs())
    path = save_lora(unet, tmp_path / "adapter.safetensors")
    # the adapters' numbers in float32 and a header: nothing of the base model
    numbers = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n)
    assert path.stat().st_size < 4 * numbers + 30_000
    reloaded = random_unet()
    adapters = load_lora(reloaded, path)
    assert {a.rank for a in adapters.values()} == {3}
    assert len(adapters) == len(list(lora_layers(unet)))
    torch.testing.assert_close(reloaded(*unet_inputs()), expected, rtol=1e-6, atol=1e-6)


def test_load_names_the_file_and_the_keys_that_do_not_fit(tmp_path):
    unet = random_unet()
    add_lora(unet, rank=2)
    state = lora_state_dict(unet)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match="lora_A or lora_B missing"):
        load_lora(random_unet(), broken)
    renamed = {k.replace("attn1", "attn9"): v for k, v in state.items()}
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d named"):
        load_lora(random_unet(), renamed)
    path = tmp_path / "empty.safetensors"
    from safetensors.torch import save_file

    save_file({"text_encoder.x.weight": torch.zeros(1)}, str(path))
    with pytest.raises(
        ValueError, match="empty.safetensors has no 'unet.<module>.lora_A"
    ):
        load_lora(random_unet(), path)
    with pytest.raises(ValueError, match="rank must be between 1 and"):
        LoRALinear(torch.nn.Linear(4, 3), rank=4)


@needs_diffusers
@pytest.mark.skipif(not has("peft"), reason="diffusers reads LoRA through peft")
@pytest.mark.parametrize("targets", TARGETS)
@torch.no_grad()
def test_diffusers_reads_and_writes_the_same_adapters(targets):
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    unet = random_unet()
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(UNET_CONFIG))
    theirs.load_state_dict(unet.state_dict())
    theirs.eval()
    add_lora(unet, rank=4, alpha=2, targets=TARGETS[targets])
    train_adapters_(unet)
    sample, timesteps, text = unet_inputs()
    expected = unet(sample, timesteps, text)
    # sdlearn -> diffusers: the file's layout is the one load_lora_weights reads
    theirs.load_lora_adapter(lora_state_dict(unet), prefix="unet", adapter_name="x")
    actual = theirs(sample, timesteps, text).sample
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # diffusers -> sdlearn: its own state dict of the adapter loads back
    state = get_peft_model_state_dict(theirs, adapter_name="x")
    again = random_unet()
    load_lora(again, {f"unet.{k}": v for k, v in state.items()})
    torch.testing.assert_close(
        again(sample, timesteps, text), expected, rtol=1e-5, atol=1e-5
    )


def test_pipeline_and_cli_load_an_adapter(tmp_path, capsys):
    from PIL import Image

    from sdlearn.cli import main
    from sdlearn.pipeline import StableDiffusionPipeline
    from tests.helpers import random_pipeline

    folder = random_pipeline().save_pretrained(tmp_path / "pipe")
    tuned = StableDiffusionPipeline.from_pretrained(folder)
    add_lora(tuned.unet, rank=4)
    train_adapters_(tuned.unet, scale=0.3)
    adapter = save_lora(tuned.unet, tmp_path / "adapter.safetensors")
    flags = ["--checkpoint", str(folder), "--steps", "3", "--no-progress"]
    outputs = {}
    for name, extra in {
        "base": [],
        "lora": ["--lora", str(adapter)],
        "zero": ["--lora", str(adapter), "--lora-scale", "0"],
    }.items():
        out = tmp_path / f"{name}.png"
        assert (
            main(["generate", "a red circle", *flags, *extra, "--out", str(out)]) == 0
        )
        with Image.open(out) as image:
            outputs[name] = image.tobytes()
    capsys.readouterr()
    assert outputs["zero"] == outputs["base"] != outputs["lora"]
    # the pipeline's own call draws what the CLI drew
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.progress = False
    pipe.load_lora(adapter)
    image = pipe(
        "a red circle",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.tobytes() == outputs["lora"]
    assert main(["generate", "a red circle", *flags, "--lora-scale", "0.5"]) == 1
    assert "--lora-scale needs --lora" in capsys.readouterr().err
