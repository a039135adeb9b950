"""Tests for sdlearn/fast.py: the FLOP counts, the timer, the deep-feature
cache (the shallow step is the full step when the kept features are this
step's own), and the recipe on a pipeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sdlearn import fast
from sdlearn.attention import Attention
from sdlearn.spatial_transformer import TransformerBlock
from sdlearn.unet import UNet, UNetConfig
from tests.helpers import UNET_CONFIG, random_pipeline, randomize_

THREE_LEVELS = UNetConfig(
    sample_size=8,
    block_out_channels=(16, 24, 32),
    layers_per_block=2,
    cross_attention_levels=(False, True, True),
    num_heads=(2, 2, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
)


def unet_and_inputs(config: UNetConfig, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    unet = randomize_(UNet(config), 1, 0.1)
    size = config.sample_size
    sample = torch.randn(batch, 4, size, size, generator=g)
    context = torch.randn(batch, 7, config.cross_attention_dim, generator=g)
    return unet, sample, context


@pytest.mark.parametrize("config", [UNET_CONFIG, THREE_LEVELS])
def test_shallow_step_on_its_own_deep_features_is_the_full_step(config):
    unet, sample, context = unet_and_inputs(config)
    t = torch.tensor([700, 300])
    with torch.no_grad():
        full = unet(sample, t, context)
        noise, deep = fast.deep_forward(unet, sample, t, context)
        shallow = fast.shallow_forward(unet, sample, t, context, deep)
    torch.testing.assert_close(noise, full, rtol=0, atol=0)
    assert deep.shape == (2, config.block_out_channels[1], 8, 8)
    torch.testing.assert_close(shallow, full)


def test_feature_cache_runs_in_full_every_few_steps_and_per_image():
    unet, sample, context = unet_and_inputs(THREE_LEVELS)
    cache = fast.FeatureCache(unet, every=3)
    full_steps = []
    calls = []

    def count(module, args):
        calls.append(1)

    unet.mid_block.register_forward_pre_hook(count)  # only a full step runs it
    with torch.no_grad():
        for _image in range(2):
            for t in (900, 700, 500, 300, 100):
                before = len(calls)
                out = cache(sample, t, context)
                assert out.shape == sample.shape
                full_steps.append(len(calls) > before)
            assert cache.full_calls == 2  # calls 0 and 3 of each image
    assert full_steps == [True, False, False, True, False] * 2
    with torch.no_grad():  # another batch size starts over
        cache(sample[:1], 50, context[:1])
    assert cache.full_calls == 1 and cache.calls == 1


def test_feature_cache_every_1_is_the_unet():
    unet, sample, context = unet_and_inputs(UNET_CONFIG)
    cache = fast.FeatureCache(unet, every=1)
    with torch.no_grad():
        for t in (800, 400):
            torch.testing.assert_close(
                cache(sample, t, context), unet(sample, t, context)
            )
    assert cache.config is unet.config
    with pytest.raises(ValueError, match="expected every >= 1, got 0"):
        fast.FeatureCache(unet, every=0)


def test_conv_flops_is_torchs_count():
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, groups=2)
    x = torch.randn(3, 6, 11, 9)
    with FlopCounterMode(display=False) as counter:
        conv(x)
    assert fast.conv_flops(conv, x) == counter.get_total_flops()


def test_step_flops_counts_the_sd15_step_without_memory():
    state = torch.get_rng_state()
    flops = fast.step_flops(UNetConfig.sd15(), 64)
    assert torch.equal(torch.get_rng_state(), state)
    # about 1.6 TFLOP at 64x64 latents, batch 2: quadratic attention makes it
    # more than 4x the 32x32 step
    assert 1.5e12 < flops < 1.7e12
    assert flops > 4 * fast.step_flops(UNetConfig.sd15(), 32)


def test_time_alternating_takes_turns_after_a_warm_up():
    order = []
    steps = {name: (lambda name=name: order.append(name)) for name in "ab"}
    runs = fast.time_alternating(steps, repeats=3, warmup=2)
    assert order == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]
    assert {name: len(seconds) for name, seconds in runs.items()} == {"a": 3, "b": 3}
    assert fast.ratio_of_pairs({"a": [1, 2, 9], "b": [2, 2, 3]}, "a", "b") == 1


def test_recipe_turns_on_its_rungs_once():
    pipe = random_pipeline()
    recipe = fast.FastRecipe(dtype="bfloat16", cache_every=2)
    done = recipe.apply(pipe)
    assert done[0] == "weights in bfloat16" and pipe.dtype == torch.bfloat16
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert isinstance(pipe.unet, fast.FeatureCache) and pipe.unet.every == 2
    images = pipe("a red circle", num_inference_steps=4, output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="fast already"):
        recipe.apply(pipe)
    both = fast.FastRecipe(compile=True, cache_every=3)
    with pytest.raises(ValueError, match="cache_every=3 do not go together"):
        both.apply(random_pipeline())


@pytest.mark.parametrize("bias", [False, True])
def test_fused_self_attention_is_the_three_projections(bias):
    torch.manual_seed(0)
    attention = Attention(16, heads=2, dim_head=8, bias=bias)
    randomize_(attention, 1, 0.1)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    fused = fast.FusedSelfAttention(attention)
    assert fused.to_qkv.weight.shape == (48, 16)
    torch.testing.assert_close(fused(x), attention(x))


def test_fuse_projections_swaps_only_the_self_attention():
    unet, sample, context = unet_and_inputs(UNET_CONFIG)
    t = torch.tensor([700, 300])
    with torch.no_grad():
        reference = unet(sample, t, context)
        fast.fuse_projections(unet)
        torch.testing.assert_close(unet(sample, t, context), reference)
    blocks = [m for m in unet.modules() if isinstance(m, TransformerBlock)]
    assert all(isinstance(b.attn1, fast.FusedSelfAttention) for b in blocks)
    assert all(isinstance(b.attn2, Attention) for b in blocks)
    with pytest.raises(ValueError, match="expected a self-attention layer"):
        fast.FusedSelfAttention(blocks[0].attn2)
    with pytest.raises(ValueError, match=r"hidden_states of shape \(B, T, 16\)"):
        blocks[0].attn1(torch.zeros(2, 5, 8))


def test_recipe_merges_half_the_outermost_tokens_by_default():
    pipe = random_pipeline()
    done = fast.FastRecipe(dtype="float32").apply(pipe)
    assert "50% of the outermost tokens merged" in done
    assert pipe.unet._token_merging.ratio == 0.5
    with pytest.raises(ValueError, match="fast already"):
        fast.FastRecipe(dtype="float32").apply(pipe)
    none = fast.FastRecipe(dtype="float32", merge_ratio=0)
    assert not any("merged" in line for line in none.apply(random_pipeline()))


def test_recipe_picks_bfloat16_only_where_it_pays():
    recipe = fast.FastRecipe()
    expected = torch.bfloat16 if fast.bf16_pays() else torch.float32
    assert recipe.resolve_dtype(torch.device("cpu")) == expected
    assert isinstance(fast.bf16_pays(), bool)


def test_compiled_freezes_the_weights():
    import torch._inductor.config as inductor_config

    unet = UNet(UNET_CONFIG).eval()
    model = fast.compiled(unet)
    assert inductor_config.freezing  # options={"freezing": True} would not
    assert model._orig_mod is unet


def test_bad_inputs_are_refused_naming_what_was_given():
    unet, sample, context = unet_and_inputs(UNET_CONFIG)
    t = torch.tensor([700, 300])
    with pytest.raises(ValueError, match=r"expected deep features of shape \(2, 32"):
        fast.shallow_forward(unet, sample, t, context, torch.zeros(2, 16, 8, 8))
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 6, H, W\)"):
        fast.conv_flops(nn.Conv2d(6, 4, 3), torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match="got repeats=0"):
        fast.time_alternating({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="got steps=0"):
        fast.FastRecipe(steps=0)
    with pytest.raises(ValueError, match="cache_every=0"):
        fast.FastRecipe(cache_every=0)
    with pytest.raises(ValueError, match="merge_ratio between 0 and 0.75, got 1"):
        fast.FastRecipe(merge_ratio=1)
