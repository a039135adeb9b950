"""Tests for sdlearn/pipeline.py: parity with diffusers' pipelines, img2img,
inpainting, attention maps, loading and saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.images import to_mask, to_pixels
from sdlearn.interop.clip import text_encoder_to_transformers
from sdlearn.interop.unet import unet_config_to_diffusers
from sdlearn.interop.vae import vae_config_to_diffusers
from sdlearn.pipeline import (
    StableDiffusionPipeline,
    blend_latents,
    classifier_free_guidance,
    img2img_start,
)
from sdlearn.pipeline_io import from_pretrained, save_pretrained, save_single_file
from tests.helpers import (
    PROMPTS,
    SIZE,
    UNET_CONFIG,
    VAE_CONFIG,
    needs_diffusers,
    random_pipeline,
)

NEGATIVE = "a green triangle"


@pytest.fixture(scope="module")
def ours() -> StableDiffusionPipeline:
    return random_pipeline()


@pytest.fixture(scope="module")
def theirs(ours, tmp_path_factory):
    """diffusers' StableDiffusionPipeline with the same weights, built from
    diffusers' and transformers' own classes (not from sdlearn's files)."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import StableDiffusionPipeline as DiffusersPipeline
    from diffusers import UNet2DConditionModel

    from tools.reference.tokenizer import build_transformers_tokenizer

    unet = UNet2DConditionModel(**unet_config_to_diffusers(UNET_CONFIG))
    unet.load_state_dict(ours.unet.state_dict())
    vae = DiffusersVAE(**vae_config_to_diffusers(VAE_CONFIG))
    vae.load_state_dict(ours.vae.state_dict())
    pipe = DiffusersPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder_to_transformers(ours.text_encoder),
        tokenizer=build_transformers_tokenizer(tmp_path_factory.mktemp("tokenizer")),
        unet=unet.eval(),
        scheduler=ours.scheduler.to_diffusers(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def start_image() -> np.ndarray:
    """A 16x16 RGB picture to start img2img from."""
    g = np.random.default_rng(0)
    return g.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def assert_same_pixels(actual: np.ndarray, expected: np.ndarray) -> None:
    # the bound on [0, 1] pixels; the clamp to [0, 1] can only shrink a
    # difference, and the latents are compared too
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4


# 1. the formulas of the chapter's exercises


def test_classifier_free_guidance():
    uncond, text = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(classifier_free_guidance(uncond, text, 1.0), text)
    torch.testing.assert_close(classifier_free_guidance(uncond, text, 0.0), uncond)
    torch.testing.assert_close(
        classifier_free_guidance(uncond, text, 7.5), torch.tensor([16.0, -5.5])
    )


@pytest.mark.parametrize(
    ("steps", "strength", "start"),
    [(50, 1.0, 0), (50, 0.8, 10), (50, 0.25, 38), (10, 0.55, 5), (10, 0.05, 10)],
)
def test_img2img_start(steps, strength, start):
    assert img2img_start(steps, strength) == start


def test_blend_latents_keeps_the_unmasked_part():
    latents, known = torch.full((1, 4, 2, 2), 5.0), torch.zeros(1, 4, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    blended = blend_latents(latents, known, mask)
    torch.testing.assert_close(blended, 5.0 * mask.expand(1, 4, 2, 2))


def test_to_pixels_and_to_mask():
    image = start_image()
    pixels = to_pixels(image)
    assert pixels.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(
        pixels[0, :, 0, 0], torch.tensor(image[0, 0]) / 127.5 - 1
    )
    mask = to_mask(np.array([[0, 127], [128, 255]], dtype=np.uint8))
    torch.testing.assert_close(mask, torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]]))
    with pytest.raises(
        ValueError, match=r"expected a uint8 array of shape \(H, W, 3\)"
    ):
        to_pixels(image[..., :2])


# 2. parity with diffusers


@needs_diffusers
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_text_to_image_matches_diffusers(ours, theirs, guidance):
    latents = torch.randn(2, 4, 8, 8, generator=seeded(1))
    kwargs = dict(
        negative_prompt=[NEGATIVE, ""],
        num_inference_steps=8,
        guidance_scale=guidance,
        latents=latents,
    )
    for output_type in ("latent", "np"):
        mine = ours(PROMPTS, output_type=output_type, generator=seeded(), **kwargs)
        ref = theirs(
            PROMPTS,
            height=SIZE,
            width=SIZE,
            output_type=output_type,
            generator=seeded(),
            **kwargs,
        ).images
        if output_type == "latent":
            torch.testing.assert_close(mine.images, ref, rtol=1e-4, atol=1e-5)
        else:
            assert_same_pixels(mine.images, ref)


@needs_diffusers
def test_images_per_prompt_and_drawn_noise_match_diffusers(ours, theirs):
    mine = ours(
        PROMPTS[0],
        num_inference_steps=5,
        generator=seeded(3),
        num_images_per_prompt=2,
        output_type="np",
    ).images
    ref = theirs(
        PROMPTS[0],
        height=SIZE,
        width=SIZE,
        num_inference_steps=5,
        generator=seeded(3),
        num_images_per_prompt=2,
        output_type="np",
    ).images
    assert mine.shape == (2, SIZE, SIZE, 3)
    assert_same_pixels(mine, ref)
    assert np.abs(mine[0] - mine[1]).max() > 1e-3  # two different draws


@needs_diffusers
# diffusers warns that one image for two prompts is deprecated; sdlearn spreads it
@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts")
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_diffusers(ours, theirs, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**theirs.components)
    img2img.set_progress_bar_config(disable=True)
    image = start_image()
    kwargs = dict(num_inference_steps=10, guidance_scale=5.0, strength=strength)
    mine = ours(PROMPTS, image=image, generator=seeded(), output_type="np", **kwargs)
    from PIL import Image

    ref = img2img(
        PROMPTS,
        image=Image.fromarray(image),
        generator=seeded(),
        output_type="np",
        **kwargs,
    ).images
    assert_same_pixels(mine.images, ref)


# 3. img2img, inpainting and attention maps on their own


def test_inpainting_keeps_the_unmasked_image(ours):
    image = start_image()
    kwargs = dict(
        image=image, num_inference_steps=6, strength=0.7, output_type="latent"
    )
    keep_all = ours(
        "a red circle",
        mask_image=np.zeros((SIZE, SIZE), np.uint8),
        generator=seeded(),
        **kwargs,
    ).images
    known = ours.encode_image(to_pixels(image), seeded())
    # the last step blends in the image's latents without noise
    torch.testing.assert_close(keep_all, known)
    repaint_all = ours(
        "a red circle",
        mask_image=np.full((SIZE, SIZE), 255, np.uint8),
        generator=seeded(),
        **kwargs,
    ).images
    img2img = ours("a red circle", generator=seeded(), **kwargs).images
    torch.testing.assert_close(repaint_all, img2img)


def test_inpainting_repaints_only_inside_the_mask(ours):
    image = start_image()
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255  # repaint the left half
    out = ours(
        "a blue square",
        image=image,
        mask_image=mask,
        num_inference_steps=6,
        generator=seeded(),
        output_type="latent",
    ).images
    known = ours.encode_image(to_pixels(image), seeded())
    torch.testing.assert_close(out[..., 4:], known[..., 4:])
    assert (out[..., :4] - known[..., :4]).abs().max() > 0.1


def test_attention_maps(ours):
    out = ours(
        PROMPTS,
        num_inference_steps=3,
        generator=seeded(),
        output_type="latent",
        attention_maps=True,
    )
    maps = out.attention_maps
    assert maps.shape == (2, 77, 8, 8)
    assert (maps >= 0).all()
    # every pixel's attention over the 77 tokens sums to one
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 8, 8))
    assert out.tokens[0] == [
        "<|startoftext|>",
        "a</w>",
        "red</w>",
        "circle</w>",
        "on</w>",
        "the</w>",
        "left</w>",
        "<|endoftext|>",
    ]
    # the hooks are gone afterwards
    assert not any(m._forward_hooks for m in ours.unet.modules())


def test_attention_maps_are_the_conditional_softmax(ours):
    """One step, one layer: the recorded map equals softmax(QK^T/sqrt(hd)) of
    that layer's inputs for the prompt half, averaged over heads."""
    from sdlearn.attention_maps import CrossAttentionMaps

    layer = ours.unet.mid_block.attentions[0].transformer_blocks[0].attn2
    g = seeded(5)
    x = torch.randn(4, 16, 32, generator=g)  # 4x4 pixels of a 2-level UNet
    context = torch.randn(4, 77, 32, generator=g)
    capture = CrossAttentionMaps(ours.unet, (8, 8), keep_last=2)
    with capture, torch.no_grad():
        layer(x, context)
    q = layer.to_q(x[2:]).view(2, 16, 4, 8).transpose(1, 2)
    k = layer.to_k(context[2:]).view(2, 77, 4, 8).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1).mean(1)  # (2, 16, 77)
    expected = torch.nn.functional.interpolate(
        probs.transpose(1, 2).reshape(2, 77, 4, 4), size=(8, 8), mode="bilinear"
    )
    torch.testing.assert_close(capture.result(), expected)


# 4. bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_inference_steps=0), "num_inference_steps >= 1"),
        (dict(height=18, width=16), "multiples of 4"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(image=start_image(), strength=1.5), r"strength in \(0, 1\]"),
        (dict(image=start_image(), strength=0.01), "runs no step"),
        (dict(mask_image=np.zeros((16, 16), np.uint8)), "mask_image needs image"),
        (
            dict(latents=torch.zeros(1, 4, 4, 4)),
            r"expected latents of shape \(1, 4, 8, 8\)",
        ),
        (dict(negative_prompt=["a", "b"]), "one negative prompt or 1"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt >= 1"),
    ],
)
def test_bad_arguments_raise_value_error(ours, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ours("a red circle", **kwargs)


def test_parts_that_do_not_fit_are_refused(ours):
    other = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(ValueError, match="text tokens of width 32.* makes 16"):
        StableDiffusionPipeline(
            ours.tokenizer, other, ours.vae, ours.unet, ours.scheduler
        )


# 5. loading and saving


@needs_diffusers
def test_save_pretrained_loads_in_diffusers_and_sdlearn(ours, tmp_path):
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    save_pretrained(ours, tmp_path / "pipe")
    theirs = DiffusersPipeline.from_pretrained(tmp_path / "pipe")
    theirs.set_progress_bar_config(disable=True)
    again = from_pretrained(tmp_path / "pipe")
    again.progress = False
    kwargs = dict(num_inference_steps=6, guidance_scale=7.5, output_type="np")
    mine = ours(PROMPTS, generator=seeded(), **kwargs).images
    ref = theirs(PROMPTS, height=SIZE, width=SIZE, generator=seeded(), **kwargs).images
    assert_same_pixels(mine, ref)
    np.testing.assert_array_equal(
        again(PROMPTS, generator=seeded(), **kwargs).images, mine
    )


def test_from_pretrained_names_missing_and_corrupt_files(ours, tmp_path):
    folder = save_pretrained(ours, tmp_path / "pipe")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nothing")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        from_pretrained(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights for unet"):
        from_pretrained(folder)


def test_single_file_checkpoint_loads_into_the_same_numbers(ours, tmp_path):
    path = save_single_file(ours, tmp_path / "model.safetensors")
    again = from_pretrained(path)
    again.progress = False
    kwargs = dict(num_inference_steps=4, output_type="np")
    np.testing.assert_array_equal(
        again(PROMPTS, generator=seeded(), **kwargs).images,
        ours(PROMPTS, generator=seeded(), **kwargs).images,
    )
    from safetensors.torch import load_file

    keys = load_file(path)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
    assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in keys
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)


class _RunsCode:
    """Unpickling this calls pathlib.Path.touch(marker): code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_malicious_ckpt_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": _RunsCode(str(marker))}}, path)
    with pytest.raises(ValueError, match="model.ckpt"):
        from_pretrained(path)
    assert not marker.exists()


# 6. the course's tiny model, shipped in the package


def test_shipped_files_fit_in_30_megabytes():
    from sdlearn.weights import SHIPPED_DIR

    sizes = {p.name: p.stat().st_size for p in SHIPPED_DIR.glob("*.safetensors")}
    # the tiny model's three parts, and chapter 10's smaller decoder for its VAE
    parts = {"vae", "clip", "unet", "small_decoder"}
    assert set(sizes) == {f"{part}.safetensors" for part in parts}
    assert sum(sizes.values()) <= 30e6


def test_shipped_model_draws_what_the_prompt_says():
    from sdlearn.evaluate import score

    pipe = from_pretrained()
    pipe.progress = False
    prompts = [
        "a large red circle on the left",
        "a small blue square at the top",
        "a large yellow triangle in the center",
        "a small purple square at the bottom",
        "a large green circle on the right",
        # colour-shape pairs the UNet never saw together
        "a large green triangle on the left",
        "a large purple circle at the top",
        "a large orange square on the right",
    ]
    images = pipe(prompts, num_inference_steps=50, generator=seeded(), output_type="np")
    pixels = (images.images * 255).round().astype(np.uint8)
    scores = [score(image, p) for image, p in zip(pixels, prompts, strict=True)]
    assert all(s["all"] for s in scores), scores
