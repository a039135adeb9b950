"""Chapter 04: the UNet that predicts the noise, Stable Diffusion's denoiser.

Given noisy latents x_t, the timestep t and the text encoder's token vectors, the
UNet predicts the noise that was added (eps in Ho et al. 2020). It works at a few
resolution levels: on the way down every level runs ResnetBlocks and halves H and
W; the middle runs at the coarsest level; on the way up every level doubles H and
W again and reads, through a skip connection, each feature map the way down kept
at that resolution (Ronneberger et al. 2015).

Two signals enter every level:

- the timestep, as a sinusoidal embedding (`timestep_embedding`) turned by a small
  MLP into one vector per sample, which every ResnetBlock adds to its features;
- the text, through `SpatialTransformer`s: the pixels of a feature map become
  tokens that attend to each other and then, by cross-attention, to the words.

Module names follow diffusers' `UNet2DConditionModel` (`conv_in`,
`time_embedding.linear_1`, `down_blocks.0.attentions.1.transformer_blocks.0.attn2
.to_k`, ...), so its state dicts load as they are: see `sdlearn.interop.unet`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.blocks import Downsample, ResnetBlock, Upsample
from sdlearn.spatial_transformer import SpatialTransformer


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """The sinusoidal embedding of the timesteps: cosines and sines of t at dim/2
    frequencies.

    The Transformer's position encoding (Vaswani et al. 2017, section 3.5) with
    the diffusion step t as the position, as DDPM does (Ho et al. 2020, appendix
    B). The frequencies fall geometrically from 1 to about 1/max_period, so the
    fast ones tell neighbouring timesteps apart and the slow ones say roughly
    where in the 0..1000 range t is. The defaults are Stable Diffusion's and
    give the numbers of diffusers' `get_timestep_embedding`.

    Args:
        timesteps: (B,) integer or floating timesteps; fractions are fine.
        dim: width of the embedding.
        flip_sin_to_cos: cosines first, then sines (Stable Diffusion); False
            puts the sines first.
        downscale_freq_shift: frequency i is max_period^(-i / (dim/2 - shift));
            0 in Stable Diffusion, 1 in the DDPM code.
        max_period: sets the slowest frequency, about 1/max_period.

    Returns:
        (B, dim) float32; an odd dim gets a zero in the last column.
    """
    if timesteps.ndim != 1:
        raise ValueError(
            f"expected timesteps of shape (B,), got {tuple(timesteps.shape)}"
        )
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(
        half, dtype=torch.float32, device=timesteps.device
    )
    frequencies = torch.exp(exponent / (half - downscale_freq_shift))  # (dim/2,)
    angles = timesteps.float()[:, None] * frequencies[None, :]  # (B, dim/2)
    if flip_sin_to_cos:
        emb = torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, 2 * (dim/2))
    else:
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, 2 * (dim/2))
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


@dataclass(frozen=True)
class UNetConfig:
    """The shape of a UNet. `sd15()` is Stable Diffusion 1.x's, `tiny()` the course's.

    Levels count from the finest resolution (level 0, the latents' H x W) to the
    coarsest; every level but the last halves H and W on the way down.
    """

    # H and W of the latents the model is made for (64 for 512x512 images); any
    # size divisible by 2^(levels - 1) works
    sample_size: int = 64
    # channels of the latents that come in and of the predicted noise
    in_channels: int = 4
    out_channels: int = 4
    # channels at each level, finest first
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # ResnetBlocks per level on the way down; the way up has one more per level,
    # for the skip that the downsampler (or conv_in) left
    layers_per_block: int = 2
    # per level: whether a SpatialTransformer (self-attention, cross-attention to
    # the text, feed-forward) follows each ResnetBlock; the middle always has one
    cross_attention_levels: tuple[bool, ...] = (True, True, True, False)
    # attention heads per level. diffusers' config calls this `attention_head_dim`
    # (a naming mistake it keeps for old configs, see diffusers issue 2011):
    # SD 1.x's `attention_head_dim=8` means 8 heads, of width 320/8 = 40 at
    # level 0 and 1280/8 = 160 at the coarsest
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    # width of the text encoder's token vectors (768 for SD 1.x's CLIP ViT-L/14)
    cross_attention_dim: int = 768
    # TransformerBlocks in each SpatialTransformer
    transformer_layers_per_block: int = 1
    # groups of every GroupNorm
    norm_num_groups: int = 32
    # epsilon of the ResnetBlocks' and the output's GroupNorm; the
    # SpatialTransformers' GroupNorm always uses 1e-6, as in SD's code
    norm_eps: float = 1e-5
    # SpatialTransformer's proj_in and proj_out: nn.Linear (SD 2.x) or 1x1
    # convolutions (SD 1.x); the same maps, with weights stored in other shapes
    use_linear_projection: bool = False
    # dropout inside the ResnetBlocks, between their two convolutions
    dropout: float = 0.0

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        for name in ("cross_attention_levels", "num_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(
                    f"expected {name} with one entry per level ({levels}, like "
                    f"block_out_channels={self.block_out_channels}), "
                    f"got {getattr(self, name)}"
                )
        for channels, heads in zip(
            self.block_out_channels, self.num_heads, strict=True
        ):
            if heads < 1 or channels % heads != 0:
                raise ValueError(
                    f"every level's channels must split evenly into its heads; got "
                    f"block_out_channels={self.block_out_channels}, "
                    f"num_heads={self.num_heads}"
                )
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups != 0:
                raise ValueError(
                    f"GroupNorm needs channels divisible by norm_num_groups="
                    f"{self.norm_num_groups}; got block_out_channels="
                    f"{self.block_out_channels}"
                )

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.x's UNet (859,520,964 parameters)."""
        return cls(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_levels=(True, True, True, False),
            num_heads=(8, 8, 8, 8),
            cross_attention_dim=768,
        )

    @classmethod
    def tiny(cls, cross_attention_dim: int = 64) -> UNetConfig:
        """A small UNet for the course's 8x8x4 latents, trainable on a CPU.

        Two levels (8x8 and 4x4), both with cross-attention, heads of width 16;
        about a million parameters. `cross_attention_dim` is the width of the
        text encoder's tokens it reads.
        """
        return cls(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_levels=(True, True),
            num_heads=(2, 4),
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=8,
        )

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding every ResnetBlock reads: 4 x level 0's."""
        return 4 * self.block_out_channels[0]

    @property
    def downsampling_factor(self) -> int:
        """How many times smaller the coarsest level is than the input."""
        return 2 ** (len(self.block_out_channels) - 1)


class TimestepEmbedding(nn.Module):
    """The time MLP: from the sinusoidal embedding to the vector the blocks read.

    Args:
        in_dim: width of the sinusoidal embedding (level 0's channels).
        time_embed_dim: width of the output (4 x in_dim in Stable Diffusion).
    """

    def __init__(self, in_dim: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, time_embed_dim)."""
        return self.linear_2(F.silu(self.linear_1(x)))


def _resnet(config: UNetConfig, in_channels: int, out_channels: int) -> ResnetBlock:
    """A ResnetBlock with the time embedding, norms and dropout of `config`."""
    return ResnetBlock(
        in_channels,
        out_channels,
        temb_channels=config.time_embed_dim,
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        dropout=config.dropout,
    )


def _transformer(
    config: UNetConfig, channels: int, num_heads: int
) -> SpatialTransformer:
    """A SpatialTransformer with the text width, depth and norms of `config`."""
    return SpatialTransformer(
        channels,
        num_heads,
        config.cross_attention_dim,
        depth=config.transformer_layers_per_block,
        groups=config.norm_num_groups,
        use_linear_projection=config.use_linear_projection,
    )


class DownBlock(nn.Module):
    """One level on the way down: ResnetBlocks (each followed by a
    SpatialTransformer at cross-attention levels), then a stride-2 convolution.

    diffusers' CrossAttnDownBlock2D and, without cross-attention, DownBlock2D.

    Args:
        config: the UNet's config (time embedding width, norms, text width).
        in_channels: C_in.
        out_channels: C_out.
        num_heads: heads of the SpatialTransformers.
        cross_attention: whether the level has SpatialTransformers.
        add_downsample: whether to halve H and W at the end (all levels but the
            coarsest).
    """

    def __init__(
        self,
        config: UNetConfig,
        in_channels: int,
        out_channels: int,
        num_heads: int,
        cross_attention: bool,
        add_downsample: bool,
    ) -> None:
        super().__init__()
        layers = config.layers_per_block
        inputs = [in_channels] + [out_channels] * (layers - 1)
        self.resnets = nn.ModuleList([_resnet(config, c, out_channels) for c in inputs])
        self.attentions = None
        if cross_attention:
            self.attentions = nn.ModuleList(
                [_transformer(config, out_channels, num_heads) for _ in range(layers)]
            )
        self.downsamplers = None
        if add_downsample:  # a list of one, for the weight name downsamplers.0.conv
            self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=1)])

    def skip_channels(self) -> list[int]:
        """The channels of the feature maps `forward` pushes, in order."""
        out_channels = self.resnets[-1].out_channels
        return [out_channels] * (len(self.resnets) + (self.downsamplers is not None))

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        skips: list[torch.Tensor],
    ) -> torch.Tensor:
        """
        Args:
            x: (B, C_in, H, W).
            temb: time embedding (B, time_embed_dim).
            context: text tokens (B, S, cross_attention_dim).
            skips: the skip stack; every layer's output is pushed onto it.

        Returns:
            (B, C_out, H/2, W/2), or (B, C_out, H, W) without a downsampler.
        """
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)  # (B, C_out, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C_out, H/2, W/2)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """The middle, at the coarsest level: ResnetBlock, SpatialTransformer,
    ResnetBlock (diffusers' UNetMidBlock2DCrossAttn).

    Args:
        config: the UNet's config.
        channels: C.
        num_heads: heads of the SpatialTransformer.
    """

    def __init__(self, config: UNetConfig, channels: int, num_heads: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [_resnet(config, channels, channels) for _ in range(2)]
        )
        self.attentions = nn.ModuleList([_transformer(config, channels, num_heads)])

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W); temb and context as in `DownBlock`."""
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One level on the way up: ResnetBlocks that each first concatenate a skip
    (each followed by a SpatialTransformer at cross-attention levels), then
    nearest-neighbour upsampling and a convolution.

    diffusers' CrossAttnUpBlock2D and, without cross-attention, UpBlock2D.

    Args:
        config: the UNet's config.
        in_channels: C_in, the channels coming from below.
        skip_channels: the channels of the skips it pops, in the order popped;
            one ResnetBlock per skip.
        out_channels: C_out.
        num_heads: heads of the SpatialTransformers.
        cross_attention: whether the level has SpatialTransformers.
        add_upsample: whether to double H and W at the end (all levels but the
            finest).
    """

    def __init__(
        self,
        config: UNetConfig,
        in_channels: int,
        skip_channels: list[int],
        out_channels: int,
        num_heads: int,
        cross_attention: bool,
        add_upsample: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList()
        for i, skip in enumerate(skip_channels):
            channels = in_channels if i == 0 else out_channels
            self.resnets.append(_resnet(config, channels + skip, out_channels))
        self.attentions = None
        if cross_attention:
            self.attentions = nn.ModuleList(
                [_transformer(config, out_channels, num_heads) for _ in skip_channels]
            )
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample(out_channels)])

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        skips: list[torch.Tensor],
    ) -> torch.Tensor:
        """
        Args:
            x: (B, C_in, H, W).
            temb: time embedding (B, time_embed_dim).
            context: text tokens (B, S, cross_attention_dim).
            skips: the skip stack; pops one feature map per ResnetBlock.

        Returns:
            (B, C_out, 2H, 2W), or (B, C_out, H, W) without an upsampler.
        """
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb)  # (B, C_out, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C_out, 2H, 2W)
        return x


class UNet(nn.Module):
    """The text-conditioned noise predictor (diffusers' UNet2DConditionModel).

    Example:
        >>> unet = UNet(UNetConfig.tiny())
        >>> latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 64)
        >>> unet(latents, torch.tensor([10, 500]), text).shape
        torch.Size([2, 4, 8, 8])

    Args:
        config: its shape; `UNetConfig.sd15()` for Stable Diffusion 1.x.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        levels = len(channels)

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim)

        # the way down, noting the channels of every skip it pushes, conv_in's first
        skip_channels = [channels[0]]
        self.down_blocks = nn.ModuleList()
        for level in range(levels):
            block = DownBlock(
                config,
                in_channels=channels[max(level - 1, 0)],
                out_channels=channels[level],
                num_heads=config.num_heads[level],
                cross_attention=config.cross_attention_levels[level],
                add_downsample=level < levels - 1,
            )
            skip_channels += block.skip_channels()
            self.down_blocks.append(block)

        self.mid_block = MidBlock(config, channels[-1], config.num_heads[-1])

        # the way up, coarsest level first, popping the skips in reverse
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            pops = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            block = UpBlock(
                config,
                # from below: the level below's output, or the middle's
                in_channels=channels[min(level + 1, levels - 1)],
                skip_channels=pops,
                out_channels=channels[level],
                num_heads=config.num_heads[level],
                cross_attention=config.cross_attention_levels[level],
                add_upsample=level > 0,
            )
            self.up_blocks.append(block)

        self.conv_norm_out = nn.GroupNorm(
            config.norm_num_groups, channels[0], eps=config.norm_eps
        )
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        """Predicts the noise in `sample`.

        Args:
            sample: noisy latents (B, in_channels, H, W), with H and W divisible
                by `config.downsampling_factor`.
            timestep: a number, a 0-d tensor, or a (B,) tensor (or (1,), shared
                by the batch); integer or floating.
            encoder_hidden_states: text tokens (B, S, cross_attention_dim).

        Returns:
            the predicted noise (B, out_channels, H, W).
        """
        timesteps = self._check_inputs(sample, timestep, encoder_hidden_states)
        context = encoder_hidden_states

        # 1. time embedding: one vector per sample, which every ResnetBlock adds
        t_emb = timestep_embedding(timesteps, self.config.block_out_channels[0])
        temb = self.time_embedding(t_emb.to(sample.dtype))  # (B, time_embed_dim)

        # 2. down: every layer's output is pushed for the way up
        h = self.conv_in(sample)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, context, skips)

        # 3. middle, at the coarsest resolution
        h = self.mid_block(h, temb, context)

        # 4. up: each level pops the skips its twin on the way down pushed
        for block in self.up_blocks:
            h = block(h, temb, context, skips)

        # 5. out: back to the latents' channels
        h = F.silu(self.conv_norm_out(h))
        return self.conv_out(h)  # (B, out_channels, H, W)

    def _check_inputs(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        """Raise a ValueError naming the shapes if the inputs do not fit;
        returns the timesteps as a (B,) tensor on sample's device."""
        config = self.config
        factor = config.downsampling_factor
        if (
            sample.ndim != 4
            or sample.shape[1] != config.in_channels
            or sample.shape[2] % factor
            or sample.shape[3] % factor
        ):
            raise ValueError(
                f"expected sample of shape (B, {config.in_channels}, H, W) with H "
                f"and W divisible by {factor}, got {tuple(sample.shape)}"
            )
        B = sample.shape[0]
        context = encoder_hidden_states
        if (
            context.ndim != 3
            or context.shape[0] != B
            or context.shape[2] != config.cross_attention_dim
        ):
            raise ValueError(
                f"expected encoder_hidden_states of shape (B, S, D_text) = "
                f"({B}, S, {config.cross_attention_dim}) for sample of batch size "
                f"{B}, got {tuple(context.shape)}"
            )
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]  # (1,)
        if timesteps.ndim != 1 or timesteps.shape[0] not in (1, B):
            raise ValueError(
                f"expected a timestep that is a number or of shape () or ({B},), "
                f"got {tuple(timesteps.shape)}"
            )
        return timesteps.expand(B)  # (B,)
