"""Original single-file SD 1.x checkpoints: the key tables, checked against
diffusers' own converter (sdlearn.original_checkpoint), and single files saved
and loaded (sdlearn.single_file)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.interop.clip import text_encoder_from_transformers
from sdlearn.interop.unet import unet_config_to_diffusers, unet_from_diffusers
from sdlearn.interop.vae import vae_from_diffusers
from sdlearn.original_checkpoint import (
    clip_text_from_original,
    clip_text_to_original,
    combine_original,
    split_original_checkpoint,
    unet_from_original,
    unet_original_table,
    unet_to_original,
    vae_from_original,
    vae_to_original,
)
from sdlearn.single_file import load_original_into, save_original
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig
from sdlearn.weights import WeightsMismatchError
from tests.helpers import (
    UNET_REFERENCE_CONFIGS,
    needs_diffusers,
    needs_transformers,
    randomize_,
)

UNET_CONFIGS = {
    "tiny": UNetConfig.tiny(),
    # three levels, attention only in the middle one, three layers per level:
    # the upsampler sits at output_blocks.N.1.conv at one level, .2.conv at another
    "three_levels": UNetConfig(
        sample_size=8,
        block_out_channels=(8, 16, 16),
        layers_per_block=3,
        cross_attention_levels=(False, True, False),
        num_heads=(2, 2, 4),
        cross_attention_dim=12,
        norm_num_groups=4,
    ),
    # two transformer layers per block and linear projections, as in SD 2.x
    "deep": UNET_REFERENCE_CONFIGS["b"],
}
VAE_CONFIGS = {
    "tiny": VAEConfig.tiny(),
    "two_levels": VAEConfig(
        block_out_channels=(8, 12),
        layers_per_block=2,
        latent_channels=3,
        norm_num_groups=4,
        sample_size=16,
    ),
}
# a small vocabulary keeps the token embedding, and so the test, small
TEXT_CONFIG = CLIPTextConfig(
    vocab_size=1000,
    max_position_embeddings=77,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    eos_token_id=999,
)

# SD 1.5's single file has this many keys per component. Where the numbers come
# from: diffusers' converter maps the original keys one to one onto diffusers'
# UNet2DConditionModel (686 keys) and AutoencoderKL (248) state dicts, which
# test_sd15_layout_is_what_diffusers_converter_reads checks on our output; the
# text encoder is transformers' 196 weights plus the position_ids buffer, which
# transformers 4 saved with them.
SD15_KEY_COUNTS = {"unet": 686, "vae": 248, "text": 197}

# A few keys of SD 1.5's file with their shapes, written out independently of the
# tables: latent-diffusion's module names, which diffusers' converter reads.
SD15_KNOWN_KEYS = {
    "model.diffusion_model.": {
        "time_embed.0.weight": (1280, 320),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "out.2.weight": (4, 320, 3, 3),
    },
    "first_stage_model.": {
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.norm_out.weight": (512,),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
    },
    "cond_stage_model.transformer.text_model.": {
        "embeddings.position_ids": (1, 77),
        "embeddings.token_embedding.weight": (49408, 768),
        "encoder.layers.11.self_attn.q_proj.weight": (768, 768),
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=key)


def assert_numbered_like_sequentials(original: dict) -> None:
    """latent-diffusion's input, middle and output blocks are nn.Sequentials
    (TimestepEmbedSequential) in nn.ModuleLists: their numbers run 0, 1, 2...
    without gaps. diffusers' converter accepts an upsampler at `.1.conv` or
    `.2.conv` alike, so this is what pins its place: right after the layers."""
    children: dict[str, set[int]] = {}
    for key in original:
        parts = key.removeprefix("model.diffusion_model.").split(".")
        if parts[0] in ("input_blocks", "output_blocks"):
            children.setdefault(parts[0], set()).add(int(parts[1]))
            children.setdefault(f"{parts[0]}.{parts[1]}", set()).add(int(parts[2]))
        elif parts[0] == "middle_block":
            children.setdefault(parts[0], set()).add(int(parts[1]))
    for name, numbers in children.items():
        assert numbers == set(range(len(numbers))), f"{name} has {sorted(numbers)}"


def diffusers_vae(config: VAEConfig) -> nn.Module:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    levels = len(config.block_out_channels)
    return DiffusersAutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.sample_size,
    )


def sdlearn_models(seed: int) -> tuple[UNet, AutoencoderKL, CLIPTextModel]:
    return (
        randomize_(UNet(UNET_CONFIGS["tiny"]), seed, 1.0),
        randomize_(AutoencoderKL(VAE_CONFIGS["tiny"]), seed + 1, 1.0),
        randomize_(CLIPTextModel(TEXT_CONFIG), seed + 2, 1.0),
    )


# --- the tables, against diffusers' converter --------------------------------


@needs_diffusers
@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_layout_is_what_diffusers_converter_reads(name):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = UNET_CONFIGS[name]
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(config))
    theirs = randomize_(theirs, seed=1, scale=1.0)
    ours = unet_from_diffusers(theirs)

    original = unet_to_original(ours.state_dict(), config)
    assert all(key.startswith("model.diffusion_model.") for key in original)
    assert_numbered_like_sequentials(original)
    converted = convert_ldm_unet_checkpoint(original, theirs.config)
    assert_same_tensors(converted, theirs.state_dict())


@needs_diffusers
@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_layout_is_what_diffusers_converter_reads(name):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = VAE_CONFIGS[name]
    theirs = randomize_(diffusers_vae(config), seed=2, scale=1.0)
    ours = vae_from_diffusers(theirs)

    original = vae_to_original(ours.state_dict(), config)
    assert all(key.startswith("first_stage_model.") for key in original)
    # the attention's projections are 1x1 convolutions there
    channels = config.block_out_channels[-1]
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            key = f"first_stage_model.{part}.mid.attn_1.{name}.weight"
            assert original[key].shape == (channels, channels, 1, 1)
    converted = convert_ldm_vae_checkpoint(original, theirs.config)
    assert_same_tensors(converted, theirs.state_dict())


@needs_diffusers
@needs_transformers
def test_text_layout_is_what_diffusers_loads(tmp_path):
    import transformers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        create_diffusers_clip_model_from_ldm,
    )

    config = transformers.CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        eos_token_id=999,
    )
    theirs = randomize_(transformers.CLIPTextModel(config), seed=3, scale=1.0)
    ours = text_encoder_from_transformers(theirs)
    original = clip_text_to_original(ours.state_dict())

    # diffusers' renaming: the prefix goes, transformers 4's names stay; the
    # position_ids it keeps are transformers' own buffer, bit for bit
    converted = convert_ldm_clip_checkpoint(original)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    position_ids = converted.pop("embeddings.position_ids")
    assert position_ids.dtype == theirs.embeddings.position_ids.dtype
    torch.testing.assert_close(
        position_ids, theirs.embeddings.position_ids, rtol=0, atol=0
    )
    assert_same_tensors(converted, theirs.state_dict())

    # and diffusers' loader of SD files builds the same model from it
    config.save_pretrained(tmp_path)
    loaded = create_diffusers_clip_model_from_ldm(
        transformers.CLIPTextModel,
        original,
        config=str(tmp_path),
        local_files_only=True,
    )
    assert_same_tensors(loaded.state_dict(), theirs.state_dict())


@needs_diffusers
def test_sd15_layout_is_what_diffusers_converter_reads():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    # the meta device: names and shapes of the full-size models, no memory
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
        their_unet = UNet2DConditionModel(**unet_config_to_diffusers(UNetConfig.sd15()))
        vae = AutoencoderKL(VAEConfig.sd15())
        their_vae = diffusers_vae(VAEConfig.sd15())
    pairs = [
        (
            convert_ldm_unet_checkpoint(
                unet_to_original(unet.state_dict(), unet.config), their_unet.config
            ),
            their_unet.state_dict(),
        ),
        (
            convert_ldm_vae_checkpoint(
                vae_to_original(vae.state_dict(), vae.config), their_vae.config
            ),
            their_vae.state_dict(),
        ),
    ]
    for converted, expected in pairs:
        assert sorted(converted) == sorted(expected)
        for key, value in expected.items():
            assert converted[key].shape == value.shape, key


def test_sd15_has_the_keys_of_sd15s_file():
    with torch.device("meta"):
        unet, vae, text = (
            UNet(UNetConfig.sd15()),
            AutoencoderKL(VAEConfig.sd15()),
            CLIPTextModel(CLIPTextConfig.sd15()),
        )
    original = combine_original(unet, vae, text)
    counts = {
        "unet": sum(k.startswith("model.diffusion_model.") for k in original),
        "vae": sum(k.startswith("first_stage_model.") for k in original),
        "text": sum(k.startswith("cond_stage_model.transformer.") for k in original),
    }
    assert counts == SD15_KEY_COUNTS
    assert len(original) == sum(SD15_KEY_COUNTS.values())
    for prefix, shapes in SD15_KNOWN_KEYS.items():
        for key, shape in shapes.items():
            assert tuple(original[prefix + key].shape) == shape, key
    # SD 1.5's UNet has 12 input and 12 output blocks
    names = set(unet_original_table(UNetConfig.sd15()).values())
    assert {n.split(".")[3] for n in names if ".input_blocks." in n} == {
        str(i) for i in range(12)
    }
    assert {n.split(".")[3] for n in names if ".output_blocks." in n} == {
        str(i) for i in range(12)
    }


# --- round trips -------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_round_trip_is_exact(name):
    config = UNET_CONFIGS[name]
    state = randomize_(UNet(config), seed=4, scale=1.0).state_dict()
    assert_same_tensors(
        unet_from_original(unet_to_original(state, config), config), state
    )


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_round_trip_is_exact(name):
    config = VAE_CONFIGS[name]
    state = randomize_(AutoencoderKL(config), seed=5, scale=1.0).state_dict()
    assert_same_tensors(
        vae_from_original(vae_to_original(state, config), config), state
    )


def test_text_round_trip_is_exact_and_drops_position_ids():
    state = randomize_(CLIPTextModel(TEXT_CONFIG), seed=6, scale=1.0).state_dict()
    original = clip_text_to_original(state)
    positions = original[
        "cond_stage_model.transformer.text_model.embeddings.position_ids"
    ]
    torch.testing.assert_close(positions, torch.arange(77)[None], rtol=0, atol=0)
    assert_same_tensors(clip_text_from_original(original), state)


def test_sd15_round_trips_keep_every_name_and_shape():
    with torch.device("meta"):
        models = [
            (UNet(UNetConfig.sd15()), unet_to_original, unet_from_original),
            (AutoencoderKL(VAEConfig.sd15()), vae_to_original, vae_from_original),
        ]
        text = CLIPTextModel(CLIPTextConfig.sd15())
    pairs = [
        (from_original(to_original(m.state_dict(), m.config), m.config), m.state_dict())
        for m, to_original, from_original in models
    ]
    pairs.append(
        (
            clip_text_from_original(clip_text_to_original(text.state_dict())),
            text.state_dict(),
        )
    )
    for back, state in pairs:
        assert sorted(back) == sorted(state)
        for key, value in state.items():
            assert back[key].shape == value.shape, key


def test_conversions_refuse_keys_that_have_no_place():
    config = UNET_CONFIGS["tiny"]
    state = UNet(config).state_dict()
    state["down_blocks.5.resnets.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError, match=r"down_blocks\.5\.resnets\.0"):
        unet_to_original(state, config)
    # tiny has input_blocks.0 to .3 only (two levels of one layer each)
    original = {
        "model.diffusion_model.input_blocks.5.0.in_layers.0.weight": torch.zeros(1)
    }
    with pytest.raises(WeightsMismatchError, match=r"input_blocks\.5\.0\.in_layers"):
        unet_from_original(original, config)
    with pytest.raises(WeightsMismatchError, match=r"first_stage_model\.encoder\.mid"):
        clip_text_from_original(
            {"first_stage_model.encoder.mid.weight": torch.zeros(1)}
        )


# --- whole files --------------------------------------------------------------


def test_split_skips_ema_and_schedule_and_fixes_old_text_layout():
    unet, vae, text = sdlearn_models(seed=7)
    original = combine_original(unet, vae, text)
    extra = {
        "betas": torch.zeros(1000),
        "alphas_cumprod": torch.zeros(1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.diffusion_modeltime_embed0weight": torch.zeros(128, 32),
    }
    # an early fine-tune's text encoder, saved without transformers' text_model.
    old = "cond_stage_model.transformer.final_layer_norm.weight"
    new = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    renamed = {old if k == new else k: v for k, v in original.items()}

    parts = split_original_checkpoint(renamed | extra)
    assert_same_tensors(
        {**parts[0], **parts[1], **parts[2]}, original
    )  # nothing extra, nothing lost
    assert all(k.startswith("model.diffusion_model.") for k in parts[0])
    assert all(k.startswith("first_stage_model.") for k in parts[1])
    assert new in parts[2]


# --- single files --------------------------------------------------------------


@pytest.mark.parametrize("wrap", [False, True])
def test_a_saved_file_loads_into_fresh_models(tmp_path, wrap):
    models = sdlearn_models(seed=8)
    if wrap:
        # a training checkpoint, as SD 1.x's .ckpt: the weights under
        # "state_dict", beside plain metadata
        path = tmp_path / "model.ckpt"
        state = {k: v.clone() for k, v in combine_original(*models).items()}
        torch.save({"state_dict": state, "global_step": 470000}, path)
    else:
        path = save_original(tmp_path / "model.safetensors", *models)

    fresh = sdlearn_models(seed=9)
    load_original_into(path, *fresh)
    for model, loaded in zip(models, fresh, strict=True):
        assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_text_encoder_loads_without_position_ids(tmp_path):
    text = randomize_(CLIPTextModel(TEXT_CONFIG), seed=10, scale=1.0)
    state = clip_text_to_original(text.state_dict())
    del state["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    save_file(state, tmp_path / "text.safetensors")
    fresh = CLIPTextModel(TEXT_CONFIG)
    load_original_into(tmp_path / "text.safetensors", text_encoder=fresh)
    assert_same_tensors(fresh.state_dict(), text.state_dict())


def test_mismatched_file_names_the_file_and_the_keys_and_loads_nothing(tmp_path):
    models = sdlearn_models(seed=11)
    state = {k: v.contiguous() for k, v in combine_original(*models).items()}
    missing = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    wrong = "first_stage_model.encoder.mid.attn_1.q.weight"
    del state[missing]
    state[wrong] = torch.zeros(64, 64)  # linear-shaped, not (64, 64, 1, 1)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)

    fresh = sdlearn_models(seed=12)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in fresh]
    with pytest.raises(WeightsMismatchError) as error:
        load_original_into(path, *fresh)
    message = str(error.value)
    assert f"weights from {path} do not fit" in message
    assert f"missing keys (1):\n    {missing}" in message
    assert f"{wrong}: got (64, 64), expected (64, 64, 1, 1)" in message
    # checked before copying: the models that did fit are untouched too
    for model, state in zip(fresh, before, strict=True):
        assert_same_tensors(model.state_dict(), state)
