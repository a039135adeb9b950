"""Tests for sdlearn/merging.py: which tokens merge and into which, that
unmerging puts every token back, and the hooks on a UNet's self-attention."""

from __future__ import annotations

import pytest
import torch

from sdlearn.merging import bipartite_merge, merge_tokens
from sdlearn.unet import UNet
from tests.helpers import UNET_CONFIG, randomize_


def tokens(B: int = 2, H: int = 4, W: int = 6, C: int = 8, seed: int = 0):
    return torch.randn(B, H * W, C, generator=torch.Generator().manual_seed(seed))


def test_destinations_are_each_cells_top_left_token():
    merge = bipartite_merge(tokens(H=3, W=5), 3, 5, r=2)
    assert merge.dst.tolist() == [0, 2, 4, 10, 12, 14]  # odd sizes: partial cells
    assert sorted(merge.dst.tolist() + merge.src.tolist()) == list(range(15))


def test_merging_nothing_changes_nothing():
    x = tokens()
    merge = bipartite_merge(x, 4, 6, r=0)
    assert merge.merge(x).shape == x.shape
    torch.testing.assert_close(merge.unmerge(merge.merge(x)), x)


def test_cells_of_equal_tokens_merge_into_their_own_cell_and_come_back():
    cells = tokens(H=2, W=3)  # one token per 2x2 cell
    x = cells.view(2, 2, 1, 3, 1, 8).expand(2, 2, 2, 3, 2, 8).reshape(2, 24, 8)
    merge = bipartite_merge(x, 4, 6, r=18)  # every source
    merged = merge.merge(x)
    assert merged.shape == (2, 6, 8)
    torch.testing.assert_close(merged, cells)
    torch.testing.assert_close(merge.unmerge(merged), x)


def test_a_merged_token_is_the_mean_and_both_get_its_output():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 0.1], [0.0, -1.0]]])  # 2x2
    merge = bipartite_merge(x, 2, 2, r=1)  # token 2 is the most like token 0
    assert merge.src[merge.merged].tolist() == [[2]]
    merged = merge.merge(x)
    torch.testing.assert_close(merged[0, -1], torch.tensor([2.0, 0.05]))
    out = merge.unmerge(merged)
    torch.testing.assert_close(out[0, 2], out[0, 0])
    torch.testing.assert_close(out[0, [1, 3]], x[0, [1, 3]])


def unet_and_inputs():
    g = torch.Generator().manual_seed(0)
    unet = randomize_(UNet(UNET_CONFIG), 1, 0.1).eval()
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, UNET_CONFIG.cross_attention_dim, generator=g)
    return unet, (sample, torch.tensor([700, 300]), context)


def test_merge_tokens_shortens_only_the_outermost_self_attention():
    unet, inputs = unet_and_inputs()
    with torch.no_grad():
        reference = unet(*inputs)
    merging = merge_tokens(unet, ratio=0.5)
    seen = {}  # tokens each attention layer is called with, after the merge
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            module.register_forward_pre_hook(
                lambda m, args, name=name: seen.update({name: args[0].shape[1]})
            )
    with torch.no_grad():
        out = unet(*inputs)
    outermost = {"down_blocks.0", "up_blocks.1"}  # 8x8 = 64 tokens
    for name, count in seen.items():
        level0 = name.startswith(tuple(outermost))
        expected = (32 if name.endswith("attn1") else 64) if level0 else 16
        assert count == expected, name
    assert out.shape == reference.shape and not torch.equal(out, reference)
    merging.remove()
    with torch.no_grad():
        torch.testing.assert_close(unet(*inputs), reference)


def test_bad_inputs_are_refused_naming_what_was_given():
    with pytest.raises(ValueError, match=r"expected tokens of shape \(B, 24, C\)"):
        bipartite_merge(tokens(H=5, W=5), 4, 6, r=1)
    with pytest.raises(ValueError, match=r"0 <= r <= 18 sources, got r=19"):
        bipartite_merge(tokens(), 4, 6, r=19)
    unet, _ = unet_and_inputs()
    with pytest.raises(ValueError, match="ratio between 0 and 0.75, got 0.9"):
        merge_tokens(unet, ratio=0.9)
    merge_tokens(unet, ratio=0.5)
    with pytest.raises(ValueError, match="merges tokens already"):
        merge_tokens(unet, ratio=0.5)


def test_deeper_levels_merge_on_their_own_grid():
    unet, inputs = unet_and_inputs()
    merge_tokens(unet, ratio=0.5, levels=2)
    seen = []
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[1])
    )
    with torch.no_grad():
        unet(*inputs)
    assert seen == [8]  # level 1's 4x4 grid, half merged
