"""Chapter 02: the convolutional blocks that the VAE and the UNet share.

ResnetBlock, Downsample and Upsample: the autoencoder of chapter 02 stacks them,
and the UNet of chapter 04 stacks them again, with a time embedding added to
the ResnetBlock. They are named like diffusers' (`norm1`, `conv1`,
`time_emb_proj`, `conv_shortcut`), so its weights load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016).

    GroupNorm -> SiLU -> conv, twice; the input is added back, through a 1x1
    convolution when the channel count changes. In the UNet a time embedding is
    projected to one value per channel and added between the two convolutions.

    Args:
        in_channels: C_in.
        out_channels: C_out; C_in when None.
        temb_channels: width of the time embedding; None for no time embedding
            (the VAE).
        groups: GroupNorm groups (32 in Stable Diffusion).
        eps: GroupNorm epsilon (1e-6 in the VAE, 1e-5 in the UNet).
        dropout: dropout before the second convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        else:
            self.time_emb_proj = None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.conv_shortcut = None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            x: (B, C_in, H, W).
            temb: (B, temb_channels), the time embedding, when the block has one.

        Returns:
            (B, C_out, H, W).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape (B, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this block adds a time embedding: pass temb")
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)  # (B, C_out, H, W)
        return x + h


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 convolution.

    Args:
        channels: C_in.
        out_channels: C_out; C_in when None.
        padding: 1 pads every side (the UNet). 0 pads only right and bottom
            before the convolution (the VAE): SD's autoencoder was trained in a
            framework whose "same" padding for stride 2 is asymmetric, and its
            weights only give the right numbers with that padding.
    """

    def __init__(
        self, channels: int, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"expected padding 0 or 1, got {padding}")
        self.padding = padding
        out_channels = channels if out_channels is None else out_channels
        self.conv = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H/2, W/2)."""
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C_in, H+1, W+1): right and bottom
        return self.conv(x)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour upsampling, then a 3x3 convolution.

    Args:
        channels: C_in.
        out_channels: C_out; C_in when None.
    """

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, 2H, 2W), or to `output_size` (H', W')."""
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")  # (B, C, H', W')
        return self.conv(x)
