"""Tests for sdlearn/vae.py: the blocks, the posterior and the autoencoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdlearn.attention import Attention, set_attention_backend
from sdlearn.interop.vae import vae_from_diffusers, vae_to_diffusers
from sdlearn.vae import (
    AttentionBlock,
    AutoencoderKL,
    DiagonalGaussian,
    Downsample,
    ResnetBlock,
    Upsample,
    VAEConfig,
)
from sdlearn.weights import WeightsMismatchError, load_checked
from tests.helpers import load_reference, needs_diffusers

# the two autoencoders of tools/reference/vae.py
REFERENCE_CONFIGS = {
    "two_levels": VAEConfig(
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ),
    "three_levels": VAEConfig(
        block_out_channels=(6, 12, 12),
        layers_per_block=2,
        latent_channels=2,
        norm_num_groups=3,
        sample_size=32,
    ),
}

# two more for the live comparisons: SD's four levels (f = 8), and one-channel
# images with three ResnetBlocks per level
LIVE_CONFIGS = {
    "four_levels": {
        "block_out_channels": (8, 16, 16, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
    },
    "grey_two_levels": {
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (6, 12),
        "layers_per_block": 3,
        "latent_channels": 3,
        "norm_num_groups": 6,
    },
}


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded weights near unit scale, as tools/reference/vae.py makes them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=g)
            if parameter.ndim > 1:
                parameter.copy_(noise * parameter[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            else:
                parameter.copy_(0.2 * noise)
    return module.eval()


def diffusers_vae(seed: int, **config) -> nn.Module:
    """A diffusers AutoencoderKL of SD's layout with random weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    levels = len(config["block_out_channels"])
    vae = DiffusersAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        **config,
    )
    return randomize_(vae, seed)


def state_dict(reference: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under `prefix.`, with the prefix taken off."""
    start = f"{prefix}."
    return {k[len(start) :]: v for k, v in reference.items() if k.startswith(start)}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    for key in a_state:
        torch.testing.assert_close(a_state[key], b_state[key], rtol=0, atol=0)


# --- config -----------------------------------------------------------------


def test_sd15_has_the_parameters_of_stable_diffusion_1():
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig.sd15())
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert model.config.scaling_factor == 0.18215
    assert model.config.downsampling_factor == 8


def test_tiny_maps_64x64_images_to_8x8x4_latents_and_back():
    config = VAEConfig.tiny()
    model = AutoencoderKL(config).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        reconstruction, posterior = model(x, sample_posterior=True)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
    assert posterior.kl().shape == (2,)
    assert reconstruction.shape == (2, 3, 64, 64)
    assert all(c % config.norm_num_groups == 0 for c in config.block_out_channels)


def test_config_rejects_groups_that_do_not_divide_channels():
    with pytest.raises(ValueError, match=r"norm_num_groups=8 must divide .*\(8, 12\)"):
        VAEConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ValueError, match=r"at least one level"):
        VAEConfig(block_out_channels=())


# --- the posterior ----------------------------------------------------------


def test_posterior_clamps_logvar_and_standard_normal_has_zero_kl():
    mean = torch.tensor([0.5, -1.0, 0.0]).view(1, 3, 1, 1)
    logvar = torch.tensor([-100.0, 100.0, 1.0]).view(1, 3, 1, 1)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    torch.testing.assert_close(posterior.mean, mean)
    torch.testing.assert_close(posterior.mode(), mean)
    torch.testing.assert_close(
        posterior.logvar, torch.tensor([-30.0, 20.0, 1.0]).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(posterior.var, posterior.logvar.exp())
    torch.testing.assert_close(posterior.std, (0.5 * posterior.logvar).exp())

    standard = DiagonalGaussian(torch.zeros(2, 8, 3, 3))
    torch.testing.assert_close(standard.kl(), torch.zeros(2))
    # KL(N(m, 1) || N(0, 1)) = m^2 / 2 per value
    shifted = DiagonalGaussian(
        torch.cat([torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)], 1)
    )
    torch.testing.assert_close(shifted.kl(), torch.full((2,), 0.5 * 4 * 3 * 3))


def test_posterior_rejects_odd_channels():
    with pytest.raises(ValueError, match=r"\(B, 2 \* C, h, w\).*got \(1, 3, 2, 2\)"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


# --- against reference tensors ----------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return load_reference("vae")


@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
@pytest.mark.parametrize("backend", ["fused", "readable"])
def test_matches_diffusers_reference(reference, name, backend):
    model = AutoencoderKL(REFERENCE_CONFIGS[name])
    load_checked(model, state_dict(reference, f"{name}.weights"), "the reference")
    set_attention_backend(model.eval(), backend)
    ref = state_dict(reference, name)
    seed = int(ref["sample_seed"])

    with torch.no_grad():
        posterior = model.encode(ref["images"])
        sample = posterior.sample(torch.Generator().manual_seed(seed))
        decoded = model.decode(ref["latents"])
        reconstruction, _ = model(
            ref["images"],
            sample_posterior=True,
            generator=torch.Generator().manual_seed(seed),
        )

    torch.testing.assert_close(posterior.mean, ref["mean"])
    torch.testing.assert_close(posterior.logvar, ref["logvar"])
    torch.testing.assert_close(sample, ref["sample"])
    torch.testing.assert_close(posterior.kl(), ref["kl"])
    torch.testing.assert_close(decoded, ref["decoded"])
    torch.testing.assert_close(reconstruction, ref["reconstruction"])


# --- against live diffusers -------------------------------------------------


@needs_diffusers
@pytest.mark.parametrize("name", list(LIVE_CONFIGS))
def test_matches_live_diffusers(name):
    config = LIVE_CONFIGS[name]
    theirs = diffusers_vae(seed=7, **config)
    ours = vae_from_diffusers(theirs).eval()
    f = ours.config.downsampling_factor
    g = torch.Generator().manual_seed(8)
    images = torch.rand(2, config.get("in_channels", 3), 2 * f, 3 * f, generator=g)
    images = images * 2 - 1
    latents = torch.randn(2, config["latent_channels"], 2, 3, generator=g)

    with torch.no_grad():
        expected = theirs.encode(images).latent_dist
        posterior = ours.encode(images)
        torch.testing.assert_close(posterior.mean, expected.mean)
        torch.testing.assert_close(posterior.logvar, expected.logvar)
        torch.testing.assert_close(posterior.kl(), expected.kl())
        torch.testing.assert_close(
            posterior.sample(torch.Generator().manual_seed(9)),
            expected.sample(torch.Generator().manual_seed(9)),
        )
        torch.testing.assert_close(ours.decode(latents), theirs.decode(latents).sample)
        for sample_posterior in (False, True):
            torch.testing.assert_close(
                ours(images, sample_posterior, torch.Generator().manual_seed(10))[0],
                theirs(
                    images,
                    sample_posterior=sample_posterior,
                    generator=torch.Generator().manual_seed(10),
                ).sample,
            )


@needs_diffusers
def test_sd15_names_and_shapes_equal_diffusers():
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    levels = 4
    with torch.device("meta"):
        theirs = DiffusersAutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=512,
        )
        ours = AutoencoderKL(VAEConfig.sd15())
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected


@needs_diffusers
def test_weights_round_trip_exactly():
    theirs = diffusers_vae(seed=11, **LIVE_CONFIGS["four_levels"])
    ours = vae_from_diffusers(theirs)
    back = vae_to_diffusers(ours)
    assert_same_weights(back, theirs)
    assert vae_from_diffusers(back).config == ours.config
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        assert tuple(back.config[key]) == tuple(theirs.config[key])

    model = randomize_(AutoencoderKL(REFERENCE_CONFIGS["three_levels"]), seed=12)
    again = vae_from_diffusers(vae_to_diffusers(model))
    assert again.config == model.config
    assert_same_weights(again, model)


# --- errors -----------------------------------------------------------------


def test_mismatched_weights_name_every_key():
    model = AutoencoderKL(REFERENCE_CONFIGS["two_levels"])
    state = AutoencoderKL(REFERENCE_CONFIGS["two_levels"]).state_dict()
    state.pop("decoder.conv_out.bias")
    state["encoder.mid_block.attentions.0.query.weight"] = torch.zeros(16, 16)
    state["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(WeightsMismatchError) as error:
        load_checked(model, state, "a checkpoint")
    message = str(error.value)
    assert "missing keys (1):\n    decoder.conv_out.bias" in message
    assert "unexpected keys (1):\n    encoder.mid_block.attentions.0.query" in message
    assert "quant_conv.weight: got (8, 8, 3, 3), expected (8, 8, 1, 1)" in message


@needs_diffusers
def test_from_diffusers_names_mismatched_keys_and_unsupported_options():
    theirs = diffusers_vae(seed=13, **LIVE_CONFIGS["four_levels"])
    theirs.quant_conv = nn.Conv2d(8, 8, 3)
    theirs.decoder.conv_out = nn.Identity()
    theirs.extra = nn.Linear(2, 2, bias=False)
    with pytest.raises(WeightsMismatchError) as error:
        vae_from_diffusers(theirs)
    message = str(error.value)
    assert "weights from diffusers AutoencoderKL do not fit" in message
    assert "missing keys (2):\n    decoder.conv_out.bias\n" in message
    assert "unexpected keys (1):\n    extra.weight" in message
    assert "quant_conv.weight: got (8, 8, 3, 3), expected (8, 8, 1, 1)" in message

    gelu = diffusers_vae(seed=14, act_fn="gelu", **LIVE_CONFIGS["four_levels"])
    with pytest.raises(ValueError, match=r"needs act_fn='silu', got 'gelu'"):
        vae_from_diffusers(gelu)


def test_bad_shapes_raise_value_errors_naming_them():
    model = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(
        ValueError,
        match=r"images of shape \(B, 3, H, W\) with H and W divisible by 8, "
        r"got \(1, 3, 60, 64\)",
    ):
        model.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"divisible by 8, got \(1, 3, 64, 36\)"):
        model(torch.zeros(1, 3, 64, 36))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*got \(1, 1, 64, 64\)"):
        model.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*got \(3, 64, 64\)"):
        model.encoder(torch.zeros(3, 64, 64))
    with pytest.raises(
        ValueError, match=r"latents of shape \(B, 4, H/8, W/8\), got \(1, 3, 8, 8\)"
    ):
        model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"latents .*got \(4, 8, 8\)"):
        model.decoder(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"x of shape \(B, 64, H, W\), got"):
        model.decoder.mid_block.attentions[0](torch.zeros(1, 32, 8, 8))


# --- attention backends -----------------------------------------------------


def test_readable_and_fused_attention_agree():
    model = randomize_(AutoencoderKL(VAEConfig.tiny()), seed=15)
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(blocks) == 2 and all(isinstance(b, Attention) for b in blocks)
    assert [b.backend for b in blocks] == ["fused", "fused"]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(16)) * 2 - 1
    with torch.no_grad():
        fused = model(x, sample_posterior=True, generator=torch.Generator())[0]
        set_attention_backend(model, "readable")
        assert [b.backend for b in blocks] == ["readable", "readable"]
        readable = model(x, sample_posterior=True, generator=torch.Generator())[0]
    torch.testing.assert_close(readable, fused)


# --- the blocks the UNet shares, against live diffusers -------------------------


@needs_diffusers
def test_shared_blocks_match_live_diffusers():
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, 8, 6, 6, generator=g)
    temb = torch.randn(2, 12, generator=g)
    cases = [
        (
            ResnetBlock(8, 16, temb_channels=12, groups=4, eps=1e-5),
            ResnetBlock2D(
                in_channels=8, out_channels=16, temb_channels=12, groups=4, eps=1e-5
            ),
            (x, temb),
        ),
        (Downsample(8, 16, padding=1), Downsample2D(8, True, 16, padding=1), (x,)),
        (Downsample(8, padding=0), Downsample2D(8, True, padding=0, name="op"), (x,)),
        (Upsample(8, 16), Upsample2D(8, use_conv=True, out_channels=16), (x,)),
    ]
    for ours, theirs, inputs in cases:
        randomize_(theirs, seed=18)
        # Downsample2D registers its conv twice, as conv and Conv2d_0
        weights = {k: v for k, v in theirs.state_dict().items() if "Conv2d_0" not in k}
        load_checked(ours, weights, type(theirs).__name__)
        with torch.no_grad():
            torch.testing.assert_close(ours(*inputs), theirs(*inputs))


def test_shipped_tiny_vae_reconstructs_held_out_images():
    from sdlearn.shapes import ShapesDataset
    from sdlearn.vae import psnr
    from sdlearn.weights import read_shipped

    vae = AutoencoderKL.pretrained_tiny()
    _, record = read_shipped("vae")
    assert record["command"].startswith("sdlearn train vae")
    assert record["train_config"]["seed"] == 0 and record["seconds"] > 0
    held_out = ShapesDataset("held_out", length=64, image_size=64, seed=2)
    images = torch.stack([held_out[i]["pixel_values"] for i in range(64)])
    with torch.no_grad():
        scores = psnr(vae.decode(vae.encode(images).mode()), images)
    print(
        f"shipped tiny VAE: held-out PSNR {scores.mean():.2f} dB "
        f"(min {scores.min():.2f})"
    )
    assert scores.mean() >= 30.0
    # the latents come out near unit variance once scaled, as diffusion expects
    with torch.no_grad():
        latents = vae.encode(images).mode() * vae.config.scaling_factor
    assert 0.7 < latents.std().item() < 1.4
