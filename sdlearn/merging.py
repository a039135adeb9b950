"""Chapter 10: merging tokens (ToMe for Stable Diffusion, Bolya and Hoffman 2023).

At the UNet's outermost level every pixel of the latent is a token, and the
self-attention compares every token with every other: 4,096 tokens at 64x64
make 16 million pairs per head. Neighbouring pixels are often alike. Merge the
most alike into one token, attend over fewer tokens, and copy each merged
token's output back to every token it stood for.

The merge is a bipartite matching: the grid is cut into 2x2 cells, one token
of each cell is a destination, the other three are sources. Each source
picks its most alike destination (cosine similarity), and the `r` sources with
the best matches are averaged into their destinations. The attention then sees
N - r tokens, so its pairs shrink by about (1 - r/N)^2.

`merge_tokens(unet, ratio)` does this before the self-attention of the
outermost level, and only there (ToMe for SD's default): cross-attention and
the feed-forward keep every token. `TokenMerging.remove()` undoes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sdlearn.attention import Attention


@dataclass(frozen=True)
class Merge:
    """Which tokens one merge kept, and where the others went.

    Built by `bipartite_merge`; `merge` shortens a (B, N, C) tensor to
    (B, N - r, C), `unmerge` lengthens (B, N - r, C) back to (B, N, C).
    Merged tokens come out as copies of the token they were merged into.

    Fields (B batch, N tokens, M destinations, r merged sources):
        dst: (M,) the destination tokens, one per 2x2 cell.
        src: (N - M,) the source tokens, the rest.
        kept: (B, N - M - r) which sources stay tokens of their own, as
            positions in `src`.
        merged: (B, r) which sources are merged, as positions in `src`.
        into: (B, r) the destination each merged source goes into, as a
            position in `dst`.
    """

    dst: torch.Tensor
    src: torch.Tensor
    kept: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): kept sources, then the destinations,
        each the mean of itself and the sources merged into it."""
        C = x.shape[-1]
        src, dst = x[:, self.src], x[:, self.dst]  # (B, N - M, C), (B, M, C)
        kept = src.gather(1, _expand(self.kept, C))  # (B, N - M - r, C)
        merged = src.gather(1, _expand(self.merged, C))  # (B, r, C)
        # a mean that counts the destination itself once
        dst = dst.scatter_reduce(1, _expand(self.into, C), merged, reduce="mean")
        return torch.cat([kept, dst], dim=1)  # (B, N - r, C)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): every token back in its place, merged
        sources with their destination's output."""
        B, _, C = y.shape
        n_kept = self.kept.shape[1]
        kept, dst = y[:, :n_kept], y[:, n_kept:]  # (B, N - M - r, C), (B, M, C)
        out = y.new_empty(B, len(self.src) + len(self.dst), C)  # (B, N, C)
        out[:, self.dst] = dst
        src_positions = self.src.expand(B, -1)  # (B, N - M)
        kept_at = src_positions.gather(1, self.kept)  # (B, N - M - r)
        merged_at = src_positions.gather(1, self.merged)  # (B, r)
        out.scatter_(1, _expand(kept_at, C), kept)
        out.scatter_(1, _expand(merged_at, C), dst.gather(1, _expand(self.into, C)))
        return out


def _expand(index: torch.Tensor, C: int) -> torch.Tensor:
    """(B, n) token indices -> (B, n, C), for gather and scatter over tokens."""
    return index.unsqueeze(-1).expand(-1, -1, C)


def grid_cells(
    height: int, width: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The destinations, one per 2x2 cell of a height x width grid (its
    top-left token), and the sources, every other token; both in grid order,
    as indices of the flattened grid.

    Returns:
        dst (M,) and src (N - M,), M = ceil(height / 2) * ceil(width / 2).
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    is_dst = (rows[:, None] % 2 == 0) & (cols[None, :] % 2 == 0)  # (H, W)
    M = math.ceil(height / 2) * math.ceil(width / 2)
    # destinations first, each part in grid order (sorting, not boolean
    # indexing, keeps the shapes known to torch.compile)
    order = is_dst.flatten().int().argsort(descending=True, stable=True)  # (N,)
    return order[:M], order[M:]


def bipartite_merge(x: torch.Tensor, height: int, width: int, r: int) -> Merge:
    """Choose which `r` tokens of `x` to merge, and into which.

    Args:
        x: tokens (B, N, C) of a height x width grid, row by row, N = height *
            width; their cosine similarity decides the matches.
        height, width: the grid's size.
        r: how many tokens to merge away, at most the number of sources
            (3/4 of the tokens on a grid of even size).

    Returns:
        the `Merge`, to apply to `x` and to anything of the same tokens.
    """
    B, N, _ = x.shape
    if height * width != N:
        raise ValueError(
            f"expected tokens of shape (B, {height * width}, C) for a "
            f"{height}x{width} grid, got {tuple(x.shape)}"
        )
    # 1. one destination per 2x2 cell, its top-left token; the rest are sources
    dst, src = grid_cells(height, width, x.device)  # (M,), (N - M,)
    if not 0 <= r <= len(src):
        raise ValueError(f"expected 0 <= r <= {len(src)} sources, got r={r}")

    # 2. each source's most alike destination, by cosine similarity
    metric = x / x.norm(dim=-1, keepdim=True)
    similarity = metric[:, src] @ metric[:, dst].transpose(1, 2)  # (B, N - M, M)
    best, into = similarity.max(dim=-1)  # (B, N - M) each

    # 3. the r sources with the best matches merge; the others stay
    order = best.argsort(dim=-1, descending=True)  # (B, N - M)
    merged, kept = order[:, :r], order[:, r:]
    return Merge(dst, src, kept, merged, into.gather(1, merged))


class TokenMerging:
    """Token merging on a UNet's self-attention layers, as hooks: the weights
    and their names are untouched. Made by `merge_tokens`; `remove()` undoes it.
    """

    def __init__(
        self,
        unet: nn.Module,
        ratio: float,
        levels: int = 1,
        choose: Callable[..., Merge] = bipartite_merge,
    ) -> None:
        if not 0 <= ratio <= 0.75:
            raise ValueError(f"expected a ratio between 0 and 0.75, got {ratio}")
        if levels < 1:
            raise ValueError(f"expected levels >= 1, got {levels}")
        if getattr(unet, "_token_merging", None) is not None:
            raise ValueError("this UNet merges tokens already: remove() that first")
        unet._token_merging = self
        self.unet = unet
        self.ratio = ratio
        self.choose = choose
        self.size: tuple[int, int] | None = None  # the latents' (H, W), this call
        self.handles = [unet.register_forward_pre_hook(self._keep_size)]
        for level, transformer in _spatial_transformers(unet):
            if level >= levels:
                continue
            for block in transformer.transformer_blocks:
                self._hook(block.attn1, level)

    def _keep_size(self, unet: nn.Module, args: tuple) -> None:
        self.size = tuple(args[0].shape[-2:])

    def _hook(self, attention: Attention, level: int) -> None:
        pending: list[Merge] = []  # this call's merge, from the input to the output

        def merge_input(module: nn.Module, args: tuple) -> tuple:
            if self.size is None:
                raise RuntimeError("token merging needs the UNet called first")
            height, width = (math.ceil(s / 2**level) for s in self.size)
            x = args[0]
            sources = x.shape[1] - math.ceil(height / 2) * math.ceil(width / 2)
            r = min(int(x.shape[1] * self.ratio), sources)
            pending.append(self.choose(x, height, width, r))
            return (pending[-1].merge(x), *args[1:])

        def unmerge_output(module: nn.Module, args: tuple, output: torch.Tensor):
            return pending.pop().unmerge(output)

        self.handles.append(attention.register_forward_pre_hook(merge_input))
        self.handles.append(attention.register_forward_hook(unmerge_output))

    def remove(self) -> None:
        """Every token attends again."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.unet._token_merging = None


def _spatial_transformers(unet: nn.Module):
    """(level, SpatialTransformer) for every one in the UNet, level 0 outermost."""
    deepest = len(unet.down_blocks) - 1
    for level, block in enumerate(unet.down_blocks):
        yield from ((level, t) for t in block.attentions or [])
    yield from ((deepest, t) for t in unet.mid_block.attentions)
    for i, block in enumerate(unet.up_blocks):
        yield from ((deepest - i, t) for t in block.attentions or [])


def merge_tokens(
    unet: nn.Module,
    ratio: float = 0.5,
    levels: int = 1,
    choose: Callable[..., Merge] = bipartite_merge,
) -> TokenMerging:
    """Merge `ratio` of the tokens before every self-attention of the UNet's
    outermost `levels` levels, and unmerge after.

    Example:
        >>> merging = merge_tokens(pipe.unet, ratio=0.5)  # half the tokens
        >>> image = pipe("a red circle").images[0]
        >>> merging.remove()

    Args:
        unet: the UNet; its SpatialTransformers are hooked, nothing is replaced.
        ratio: the share of each layer's tokens merged away, 0 to 0.75.
        levels: how many levels, from the outermost, merge.
        choose: `(tokens, height, width, r) -> Merge`, which tokens merge and
            into which; `bipartite_merge` by default.

    Returns:
        the `TokenMerging`; its `remove()` undoes it.
    """
    return TokenMerging(unet, ratio, levels, choose)
