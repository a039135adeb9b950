"""Chapter 04: the SpatialTransformer, where the UNet reads the text.

The pixels of a feature map (B, C, H, W) become H * W tokens of width C, which
attend to each other (self-attention), then to the text encoder's tokens
(cross-attention), then pass a feed-forward layer; the result goes back to the
map's shape and is added to it. diffusers calls it Transformer2DModel, with
BasicTransformerBlock, FeedForward and GEGLU inside; the weights' names are its.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn.attention import Attention


class GEGLU(nn.Module):
    """A linear layer whose GELU-activated second half gates the first (Shazeer 2020).

    Args:
        dim_in: D.
        dim_out: width of the output.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        # both halves from one matmul: one large product is faster than two
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, dim_out)."""
        x, gate = self.proj(x).chunk(2, dim=-1)  # (B, T, dim_out) each
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's MLP: GEGLU to 4 x D, then back to D.

    Args:
        dim: D.
        mult: the hidden width is mult x D.
    """

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # a list for diffusers' weight names, net.0.proj and net.2 (net.1: dropout)
        self.net = nn.ModuleList(
            [GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward (diffusers'
    BasicTransformerBlock).

    Each of the three is pre-norm with a residual connection, as in GPT-2.

    Args:
        dim: D, the width of the pixel tokens.
        num_heads: nh; every head has width D / nh.
        context_dim: width of the text tokens.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=num_heads, dim_head=head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(
            dim, cross_attention_dim=context_dim, heads=num_heads, dim_head=head_dim
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: pixel tokens (B, T, D), T = H * W.
            context: text tokens (B, S, context_dim).

        Returns:
            (B, T, D)
        """
        x = x + self.attn1(self.norm1(x))  # every pixel looks at every pixel
        x = x + self.attn2(self.norm2(x), context)  # ... and at every word
        return x + self.ff(self.norm3(x))


def _per_pixel(projection: nn.Conv2d | nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
    """Applies proj_in or proj_out, a 1x1 convolution or a Linear, to tokens.

    A 1x1 convolution is one linear map applied to every pixel, so on tokens it
    is a plain matmul with its (C_out, C_in, 1, 1) weight seen as (C_out, C_in).
    Both kinds of projection then work on tokens, and the way back to a feature
    map needs no copy (diffusers copies the tokens into a map, then convolves).
    """
    if isinstance(projection, nn.Conv2d):
        return F.linear(tokens, projection.weight.flatten(1), projection.bias)
    return projection(tokens)


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map (diffusers'
    Transformer2DModel, latent diffusion's SpatialTransformer).

    Args:
        channels: C; the pixel tokens have width D = C.
        num_heads: nh.
        context_dim: width of the text tokens.
        depth: number of TransformerBlocks.
        groups: groups of the GroupNorm on the way in.
        use_linear_projection: proj_in and proj_out as nn.Linear (SD 2.x)
            instead of 1x1 convolutions (SD 1.x).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        context_dim: int,
        depth: int = 1,
        groups: int = 32,
        use_linear_projection: bool = False,
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, num_heads, context_dim) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: feature map (B, C, H, W).
            context: text tokens (B, S, context_dim).

        Returns:
            (B, C, H, W)
        """
        H, W = x.shape[-2:]
        tokens = rearrange(self.norm(x), "B C H W -> B (H W) C")  # (B, T, C)
        # the one copy into token order (none for channels_last maps); on the
        # strided view, F.linear would fall back to a slow batched matmul
        tokens = _per_pixel(self.proj_in, tokens.contiguous())
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = _per_pixel(self.proj_out, tokens)
        # x first: the sum takes x's memory layout, contiguous or channels_last
        return x + rearrange(tokens, "B (H W) C -> B C H W", H=H, W=W)  # (B, C, H, W)
