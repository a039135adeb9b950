"""Tests for sdlearn/unet.py: the timestep embedding, the config and the UNet."""

from __future__ import annotations

import pytest
import torch

from sdlearn import attention
from sdlearn.attention import set_attention_backend
from sdlearn.interop.unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from sdlearn.unet import UNet, UNetConfig, timestep_embedding
from sdlearn.weights import load_checked
from tests.helpers import (
    UNET_REFERENCE_CONFIGS,
    load_reference,
    needs_diffusers,
    randomize_,
)

CONFIGS = UNET_REFERENCE_CONFIGS
NAMES = list(CONFIGS)


def state_dict(reference: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under `prefix.`, with the prefix taken off."""
    start = f"{prefix}."
    return {k[len(start) :]: v for k, v in reference.items() if k.startswith(start)}


def public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def inputs(config: UNetConfig, seed: int, batch: int = 2, size: int = 8):
    """Random (sample, timesteps, encoder_hidden_states) for a config."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, size, size, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 6, config.cross_attention_dim, generator=g)
    return sample, timesteps, context


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the config ---------------------------------------------------------------


def test_sd15_has_859_520_964_parameters():
    with torch.device("meta"):
        model = UNet(UNetConfig.sd15())
    assert sum(p.numel() for p in model.parameters()) == 859_520_964


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match=r"num_heads with one entry per level \(2"):
        UNetConfig(
            block_out_channels=(32, 64),
            cross_attention_levels=(True, True),
            num_heads=(8, 8, 8),
        )
    with pytest.raises(ValueError, match=r"split evenly into its heads.*\(3, 8\)"):
        UNetConfig(
            block_out_channels=(32, 64),
            cross_attention_levels=(True, True),
            num_heads=(3, 8),
        )
    with pytest.raises(ValueError, match=r"norm_num_groups=32; got .*\(16, 64\)"):
        UNetConfig(
            block_out_channels=(16, 64),
            cross_attention_levels=(True, True),
            num_heads=(2, 2),
        )


# --- the timestep embedding ---------------------------------------------------


def test_timestep_embedding_matches_reference():
    reference = load_reference("unet")
    t = reference["embedding.timesteps"]
    torch.testing.assert_close(timestep_embedding(t, 32), reference["embedding.dim32"])
    torch.testing.assert_close(timestep_embedding(t, 9), reference["embedding.dim9"])


@needs_diffusers
@pytest.mark.parametrize("flip_sin_to_cos", [True, False])
@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_embedding_matches_live_diffusers(flip_sin_to_cos, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 0.5, 17.25, 999.0])
    for dim in (8, 320, 33):
        torch.testing.assert_close(
            timestep_embedding(t, dim, flip_sin_to_cos, shift),
            get_timestep_embedding(t, dim, flip_sin_to_cos, shift),
        )


def test_timestep_embedding_rejects_2d_timesteps():
    with pytest.raises(ValueError, match=r"timesteps of shape \(B,\), got \(2, 1\)"):
        timestep_embedding(torch.zeros(2, 1), 8)


# --- the UNet against diffusers ------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_unet_matches_reference(name):
    reference = load_reference("unet")
    model = load_checked(
        UNet(CONFIGS[name]), state_dict(reference, f"{name}.weights"), "reference"
    ).eval()
    sample = reference[f"{name}.sample"]
    context = reference[f"{name}.encoder_hidden_states"]
    with torch.no_grad():
        out = model(sample, reference[f"{name}.timesteps"], context)
        out_scalar = model(sample, reference[f"{name}.timestep_scalar"], context)
    assert out.shape == sample.shape
    torch.testing.assert_close(out, reference[f"{name}.output"])
    torch.testing.assert_close(out_scalar, reference[f"{name}.output_scalar"])


@needs_diffusers
@pytest.mark.parametrize("name", NAMES)
def test_unet_matches_live_diffusers(name):
    from tools.reference.unet import make_unet

    theirs = make_unet(name)
    ours = unet_from_diffusers(theirs)
    assert ours.config == CONFIGS[name]
    assert not ours.training
    sample, timesteps, context = inputs(ours.config, seed=3)
    with torch.no_grad():
        for t in (timesteps, timesteps.float() + 0.5, 250):
            expected = theirs(sample, t, context).sample
            torch.testing.assert_close(ours(sample, t, context), expected)


@needs_diffusers
def test_sd15_names_and_shapes_match_diffusers():
    from diffusers import UNet2DConditionModel

    config = UNetConfig.sd15()
    with torch.device("meta"):
        ours = UNet(config)
        theirs = UNet2DConditionModel(**unet_config_to_diffusers(config))
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert unet_config_from_diffusers(theirs.config) == config


@needs_diffusers
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_through_diffusers_is_exact(name):
    from tools.reference.unet import make_unet

    theirs = make_unet(name)
    back = unet_to_diffusers(unet_from_diffusers(theirs))
    # keys with an underscore are diffusers' bookkeeping, such as which
    # settings were left at their defaults
    assert public(back.config) == public(theirs.config)
    expected = theirs.state_dict()
    actual = back.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@needs_diffusers
def test_from_diffusers_refuses_unsupported_settings():
    from diffusers import UNet2DConditionModel

    from tools.reference.unet import CONFIGS as DIFFUSERS_CONFIGS

    base = DIFFUSERS_CONFIGS["a"]
    with torch.device("meta"):
        attn_blocks = UNet2DConditionModel(
            **base | {"down_block_types": ("AttnDownBlock2D", "DownBlock2D")}
        )
        sdxl_like = UNet2DConditionModel(
            **base | {"addition_embed_type": "text", "time_cond_proj_dim": 4}
        )
        nested = UNet2DConditionModel(**base | {"cross_attention_dim": (12, 12)})
    with pytest.raises(ValueError, match=r"down_block_types=\('AttnDownBlock2D'"):
        unet_from_diffusers(attn_blocks)
    with pytest.raises(
        ValueError, match=r"addition_embed_type='text'[\s\S]*time_cond_proj_dim=4"
    ):
        unet_from_diffusers(sdxl_like)
    with pytest.raises(ValueError, match=r"cross_attention_dim=\(12, 12\)"):
        unet_from_diffusers(nested)


# --- the UNet's own behaviour ---------------------------------------------------


def test_tiny_unet_keeps_the_latents_shape():
    config = UNetConfig.tiny(cross_attention_dim=48)
    model = UNet(config).eval()
    sample, timesteps, context = inputs(config, seed=4)
    with torch.no_grad():
        out = model(sample, timesteps, context)
    assert out.shape == (2, 4, 8, 8)
    assert torch.isfinite(out).all()


def test_timestep_forms_agree():
    model = randomize_(UNet(CONFIGS["a"]), seed=5, scale=0.2)
    sample, _, context = inputs(model.config, seed=6)
    with torch.no_grad():
        expected = model(sample, torch.tensor([421, 421]), context)
        for t in (421, 421.0, torch.tensor(421), torch.tensor([421.0])):
            torch.testing.assert_close(model(sample, t, context), expected)
        # one timestep per sample: each row is the row of its own timestep
        mixed = model(sample, torch.tensor([421, 7]), context)
    torch.testing.assert_close(mixed[0], expected[0])
    assert not torch.allclose(mixed[1], expected[1])


def test_readable_and_fused_attention_agree(monkeypatch):
    model = randomize_(UNet(CONFIGS["b"]), seed=7, scale=0.2)
    sample, timesteps, context = inputs(model.config, seed=8)
    # count the calls, to be sure that every attention layer took the readable path
    calls = []
    readable_attention = attention.scaled_dot_product_attention
    monkeypatch.setattr(
        attention,
        "scaled_dot_product_attention",
        lambda *args, **kwargs: calls.append(1) or readable_attention(*args, **kwargs),
    )
    with torch.no_grad():
        fused = set_attention_backend(model, "fused")(sample, timesteps, context)
        assert not calls
        readable = set_attention_backend(model, "readable")(sample, timesteps, context)
    # b: 2 + 3 SpatialTransformers at level 0, 2 + 3 at level 1, 1 in the
    # middle; 2 TransformerBlocks each, with self- and cross-attention
    assert len(calls) == 11 * 2 * 2
    torch.testing.assert_close(readable, fused)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_gives_the_same_result(name):
    model = randomize_(UNet(CONFIGS[name]), seed=9, scale=0.2)
    sample, timesteps, context = inputs(model.config, seed=10)
    with torch.no_grad():
        expected = model(sample, timesteps, context)
        model = model.to(memory_format=torch.channels_last)
        out = model(sample.to(memory_format=torch.channels_last), timesteps, context)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected)


def test_bfloat16_autocast_stays_close_to_float32():
    model = randomize_(UNet(CONFIGS["b"]), seed=11, scale=0.2)
    sample, timesteps, context = inputs(model.config, seed=12)
    with torch.no_grad():
        expected = model(sample, timesteps, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(sample, timesteps, context)
    assert out.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits (relative error 2^-9 = 0.002 per
    # rounding); over the net's ~100 rounded operations the errors add up to a
    # few hundredths on outputs of order 1
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


def test_bad_inputs_raise():
    model = UNet(CONFIGS["b"])  # downsamples by 4, text tokens of width 20
    sample, timesteps, context = inputs(model.config, seed=13)
    with pytest.raises(
        ValueError, match=r"sample of shape \(B, 4, H, W\) .* by 4, got \(2, 4, 8, 6\)"
    ):
        model(sample[..., :6], timesteps, context)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\).*got \(2, 3, 8, 8\)"):
        model(sample[:, :3], timesteps, context)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\).*got \(4, 8, 8\)"):
        model(sample[0], timesteps, context)
    with pytest.raises(
        ValueError, match=r"\(B, S, D_text\) = \(2, S, 20\) .* got \(2, 6, 12\)"
    ):
        model(sample, timesteps, context[..., :12])
    with pytest.raises(ValueError, match=r"\(2, S, 20\) .* got \(1, 6, 20\)"):
        model(sample, timesteps, context[:1])
    with pytest.raises(ValueError, match=r"shape \(\) or \(2,\), got \(3,\)"):
        model(sample, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match=r"shape \(\) or \(2,\), got \(2, 1\)"):
        model(sample, timesteps[:, None], context)


# --- full size ------------------------------------------------------------------


@pytest.mark.slow
@needs_diffusers
def test_sd15_matches_live_diffusers():
    from diffusers import UNet2DConditionModel

    # diffusers' own initialisation, whose scale suits each layer; it draws from
    # the global generator, so seed it without leaking the seed to other tests
    with torch.random.fork_rng():
        torch.manual_seed(0)
        settings = unet_config_to_diffusers(UNetConfig.sd15())
        theirs = UNet2DConditionModel(**settings).eval()
    ours = unet_from_diffusers(theirs)
    g = torch.Generator().manual_seed(14)
    sample = torch.randn(2, 4, 32, 32, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    timesteps = torch.tensor([999, 20])
    with torch.inference_mode():
        expected = theirs(sample, timesteps, context).sample
        out = ours(sample, timesteps, context)
    # float32 tolerance even this deep: sdlearn's only differences in rounding
    # are the 1x1 convolutions it computes as matmuls (a few 1e-6 at the output)
    torch.testing.assert_close(out, expected)
