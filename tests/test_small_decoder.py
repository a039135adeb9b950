"""Tests for sdlearn/small_decoder.py: the smaller config, the decoder swapped
into a pipeline's VAE, distillation lowering its loss, and the shipped small
decoder drawing what the full one draws."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sdlearn.shapes import ALL_SHAPES, ALL_STYLES, ShapesDataset
from sdlearn.small_decoder import (
    SmallDecoder,
    WithDecoder,
    distill_decoder,
    shipped_small_decoder,
    smaller_config,
)
from sdlearn.vae import AutoencoderKL, VAEConfig, psnr
from tests.helpers import VAE_CONFIG, random_pipeline, randomize_

# the shipped decoder measured 34.3 dB to the full decoder on 256 held-out images
# (its record, small_decoder.json); 16 images here, so some room below that
PSNR_FLOOR = 30.0


def test_smaller_config_shrinks_every_level_and_its_groups():
    half = smaller_config(VAEConfig.tiny())
    assert half.block_out_channels == (8, 16, 32, 32)
    assert half.norm_num_groups == 8 and half.latent_channels == 4
    quarter = smaller_config(VAE_CONFIG, 0.25)  # (8, 16) in groups of 4
    assert quarter.block_out_channels == (2, 4) and quarter.norm_num_groups == 2


def test_with_decoder_encodes_with_the_vae_and_decodes_with_the_small_one():
    vae = randomize_(AutoencoderKL(VAE_CONFIG), 2, 0.1).eval()
    small = randomize_(SmallDecoder(smaller_config(VAE_CONFIG)), 3, 0.1).eval()
    both = WithDecoder(vae, small)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(both.encode(x).mode(), vae.encode(x).mode())
        torch.testing.assert_close(both.decode(z), small(z))
        assert both.decode(z).shape == vae.decode(z).shape
    assert both.config is vae.config


def test_a_pipeline_draws_with_the_small_decoder():
    pipe = random_pipeline()
    pipe.vae = WithDecoder(pipe.vae, SmallDecoder(smaller_config(pipe.vae.config)))
    images = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_distilling_lowers_the_loss():
    vae = randomize_(AutoencoderKL(VAE_CONFIG), 2, 0.1)
    torch.manual_seed(0)
    small = SmallDecoder(smaller_config(VAE_CONFIG))
    log = distill_decoder(vae, small, steps=30, batch_size=4, pool=16, log_every=1)
    assert len(log) == 30 and not small.training
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]


def test_the_shipped_small_decoder_draws_what_the_full_one_draws():
    from sdlearn.pipeline_io import from_pretrained

    vae = from_pretrained().vae
    small = shipped_small_decoder()
    assert small.config.block_out_channels == (8, 16, 32, 32)
    held = ShapesDataset("all", 16, seed=123, shapes=ALL_SHAPES, styles=ALL_STYLES)
    x = torch.stack([held[i]["pixel_values"] for i in range(16)])
    with torch.no_grad():
        z = vae.encode(x).mode()
        scores = psnr(small(z), vae.decode(z))
    assert scores.mean() > PSNR_FLOOR


def test_bad_inputs_are_refused_naming_what_was_given():
    with pytest.raises(ValueError, match="0 < width <= 1, got 0"):
        smaller_config(VAE_CONFIG, 0)
    vae = AutoencoderKL(VAE_CONFIG)
    other = SmallDecoder(replace(VAE_CONFIG, latent_channels=8))
    with pytest.raises(ValueError, match="4 latent channels, got 8"):
        WithDecoder(vae, other)
    with pytest.raises(
        ValueError, match=r"latents of shape \(B, 4, h, w\), got \(1, 3"
    ):
        SmallDecoder(VAE_CONFIG)(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="got 0, 8, 16"):
        distill_decoder(vae, SmallDecoder(VAE_CONFIG), steps=0, batch_size=8, pool=16)
