"""Tests for sdlearn/fine_tuning.py: `sdlearn train lora` learns, writes an
adapter that loads, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from sdlearn import training
from sdlearn.training import TrainConfig

LORA_STEPS = TrainConfig(
    steps=24,
    batch_size=8,
    lr=5e-3,
    warmup_steps=2,
    log_every=1,
    checkpoint_every=8,
    bf16="off",
)


def lora_run(out_dir, **kwargs):
    from sdlearn.fine_tuning import train_lora

    return train_lora(
        LORA_STEPS, out_dir, progress=False, eval_images=0, images=64, **kwargs
    )


def test_lora_fine_tune_learns_and_writes_a_loadable_adapter(tmp_path):
    from sdlearn.lora import lora_layers
    from sdlearn.pipeline import StableDiffusionPipeline

    record = lora_run(tmp_path, rank=4, prior_images=16)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 24
    saved = json.loads((tmp_path / "lora.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert (
        saved["command"].startswith("sdlearn train lora")
        and "--ship" not in saved["command"]
    )
    # the adapter reloads into the base model and changes what it predicts
    pipe = StableDiffusionPipeline.from_pretrained()
    g = torch.Generator().manual_seed(0)
    sample, text = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 77, 64, generator=g),
    )
    with torch.no_grad():
        before = pipe.unet(sample, 500, text)
        pipe.load_lora(tmp_path / "lora.safetensors")
        after = pipe.unet(sample, 500, text)
    adapters = dict(lora_layers(pipe.unet))
    assert (
        sum(
            p.numel()
            for a in adapters.values()
            for p in (a.lora_A.weight, a.lora_B.weight)
        )
        == record["trainable_parameters"]
    )
    assert (after - before).abs().max() > 1e-4
    # on its training images, with the same timesteps and noise, the adapter
    # predicts the noise better than the base model (the batch losses of so
    # short a run are too noisy to show it)
    from torch.utils.data import default_collate

    from sdlearn.lora import set_lora_scale
    from sdlearn.shapes import ShapesDataset

    data = ShapesDataset("all", length=64, seed=LORA_STEPS.seed, shapes=("diamond",))
    items, tokens, _ = training.encode_shapes(
        pipe.vae, pipe.text_encoder, pipe.tokenizer, data, progress=False
    )
    loss = training.DiffusionLoss(
        pipe.unet, pipe.scheduler, tokens, pipe.vae.config.scaling_factor, 0.0
    )

    def fixed_loss(scale: float) -> float:
        set_lora_scale(pipe.unet, scale)
        with torch.no_grad():
            return loss(default_collate(items), torch.Generator().manual_seed(0))[0]

    assert fixed_loss(1.0) < 0.95 * fixed_loss(0.0)


def test_lora_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    lora_run(tmp_path / "straight")
    lora_run(tmp_path / "stopped", stop_at=8)
    lora_run(tmp_path / "stopped", resume=True)
    straight = load_file(str(tmp_path / "straight" / "lora.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "lora.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_lora_refuses_ship_and_unknown_concepts(tmp_path):
    with pytest.raises(ValueError, match="adapters are not shipped"):
        lora_run(tmp_path, ship=True)
    with pytest.raises(ValueError, match="expected a new shape"):
        lora_run(tmp_path, concept="circle")
