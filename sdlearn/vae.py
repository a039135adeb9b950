"""Chapter 02: the VAE, Stable Diffusion's AutoencoderKL.

An encoder squeezes a (B, 3, H, W) image into a distribution over latents
(B, 4, H/8, W/8), a decoder turns latents back into an image; Stable Diffusion
then runs its diffusion on the small latents instead of the pixels.

Its building blocks (ResnetBlock, Downsample, Upsample, in `sdlearn.blocks`) are
the same ones the UNet of chapter 04 stacks, with a time embedding added to the
ResnetBlock. Every module is named like its counterpart in diffusers (`norm1`, `conv1`,
`time_emb_proj`, `down_blocks.0.resnets.1`, `mid_block.attentions.0.to_q`, ...),
so diffusers' `AutoencoderKL` state dict loads one-to-one (`sdlearn.interop.vae`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn.attention import Attention
from sdlearn.blocks import Downsample, ResnetBlock, Upsample
from sdlearn.weights import SHIPPED_DIR, config_from_json, load_checked, read_shipped


class AttentionBlock(Attention):
    """One-head self-attention over the pixels of a feature map, with a residual.

    The VAE's mid-block attention: every pixel's C channels are a token, so a
    (B, C, H, W) map is H*W tokens of width C; GroupNorm first, then attention
    with a single head as wide as the map, and the input added back. The weights
    are diffusers' `Attention(C, heads=1, dim_head=C, norm_num_groups=groups,
    residual_connection=True, bias=True)`: `group_norm`, `to_q`, `to_k`, `to_v`,
    `to_out.0`.

    Args:
        channels: C.
        groups: GroupNorm groups.
        eps: GroupNorm epsilon.
    """

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Takes a feature map, unlike `Attention.forward`, which takes tokens.

        Args:
            x: (B, C, H, W).

        Returns:
            (B, C, H, W).
        """
        if x.ndim != 4 or x.shape[1] != self.query_dim:
            raise ValueError(
                f"expected x of shape (B, {self.query_dim}, H, W), got {tuple(x.shape)}"
            )
        H, W = x.shape[-2:]
        h = self.group_norm(x)
        h = rearrange(h, "B C H W -> B (H W) C")  # (B, T, C) with T = H*W
        h = super().forward(h)
        h = rearrange(h, "B (H W) C -> B C H W", H=H, W=W)  # (B, C, H, W)
        return x + h


@dataclass(frozen=True)
class VAEConfig:
    """The shape of an `AutoencoderKL`; the names are diffusers' config keys."""

    # channels of the images: 3 for RGB
    in_channels: int = 3
    # channels of the reconstructions: the same 3
    out_channels: int = 3
    # channels at each resolution level, from the image down; every level but
    # the last halves H and W, so the latents are 2**(levels - 1) times smaller
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    # ResnetBlocks per level in the encoder; the decoder has one more
    layers_per_block: int = 2
    # channels of the latents
    latent_channels: int = 4
    # GroupNorm groups in every norm; must divide every channel count
    norm_num_groups: int = 32
    # multiply latents by this before the diffusion model sees them, so that
    # they have about unit variance (1 / their std over the training images);
    # encode and decode never apply it, as in diffusers
    scaling_factor: float = 0.18215
    # side of the training images; diffusers only uses it to tile large images
    sample_size: int = 512

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one level")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                f"block_out_channels={self.block_out_channels}"
            )

    @property
    def downsampling_factor(self) -> int:
        """f: how many times smaller the latents are than the images, per side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls) -> VAEConfig:
        """Stable Diffusion 1.x's autoencoder: 512x512x3 images <-> 64x64x4."""
        return cls(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            # 1 / the std of SD's latents over a batch of its training images,
            # about 5.5 (Rombach et al. 2022, sec. 4.3.2 and appendix D.1)
            scaling_factor=0.18215,
            sample_size=512,
        )

    @classmethod
    def tiny(cls) -> VAEConfig:
        """The course's autoencoder: 64x64x3 shapes images <-> 8x8x4 latents.

        SD's layout (four levels, three downsamplings, 4 latent channels) at a
        fraction of the width, so that it trains on a CPU.
        """
        return cls(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32, 64, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            # a placeholder: set it to 1 / std of the trained model's latents
            scaling_factor=1.0,
            sample_size=64,
        )


def _check_images(x: torch.Tensor, config: VAEConfig) -> None:
    # the asymmetric padding of Downsample would round an odd side down, and the
    # decoder could not give back the input's size
    f = config.downsampling_factor
    fits = x.ndim == 4 and x.shape[1] == config.in_channels
    if not (fits and x.shape[2] % f == 0 and x.shape[3] % f == 0):
        raise ValueError(
            f"expected images of shape (B, {config.in_channels}, H, W) with H and W "
            f"divisible by {f}, got {tuple(x.shape)}"
        )


def _check_latents(z: torch.Tensor, config: VAEConfig) -> None:
    f = config.downsampling_factor
    if z.ndim != 4 or z.shape[1] != config.latent_channels:
        raise ValueError(
            f"expected latents of shape (B, {config.latent_channels}, H/{f}, W/{f}), "
            f"got {tuple(z.shape)}"
        )


class DownEncoderBlock(nn.Module):
    """One level of the encoder: ResnetBlocks, then halve H and W (diffusers'
    `DownEncoderBlock2D`).

    Args:
        in_channels: C_in.
        out_channels: C_out; the first ResnetBlock changes C_in to C_out.
        num_layers: number of ResnetBlocks.
        groups: GroupNorm groups.
        downsample: whether to halve H and W at the end (all levels but the last).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            block_in = in_channels if i == 0 else out_channels
            self.resnets.append(ResnetBlock(block_in, out_channels, groups=groups))
        # a list only so that the weights are named downsamplers.0.* as in diffusers
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)])
        else:
            self.downsamplers = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H/2, W/2), or (B, C_out, H, W) at the end."""
        for resnet in self.resnets:
            x = resnet(x)  # (B, C_out, H, W)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C_out, H/2, W/2)
        return x


class UpDecoderBlock(nn.Module):
    """One level of the decoder: ResnetBlocks, then double H and W (diffusers'
    `UpDecoderBlock2D`).

    Args:
        in_channels: C_in.
        out_channels: C_out; the first ResnetBlock changes C_in to C_out.
        num_layers: number of ResnetBlocks.
        groups: GroupNorm groups.
        upsample: whether to double H and W at the end (all levels but the last).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        upsample: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            block_in = in_channels if i == 0 else out_channels
            self.resnets.append(ResnetBlock(block_in, out_channels, groups=groups))
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(out_channels)])
        else:
            self.upsamplers = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, 2H, 2W), or (B, C_out, H, W) at the end."""
        for resnet in self.resnets:
            x = resnet(x)  # (B, C_out, H, W)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C_out, 2H, 2W)
        return x


class MidBlock(nn.Module):
    """The lowest resolution: ResnetBlock, attention over all pixels, ResnetBlock.

    Convolutions only see 3x3 neighbourhoods; the attention in between lets
    every pixel of the smallest map see every other one.

    Args:
        channels: C.
        groups: GroupNorm groups.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, groups=groups), ResnetBlock(channels, groups=groups)]
        )
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups=groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Images to the parameters of the latent distribution (diffusers' `Encoder`).

    Args:
        config: the autoencoder's shape.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        groups = config.norm_num_groups

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        in_channels = channels[0]
        for i, out_channels in enumerate(channels):
            is_last = i == len(channels) - 1
            block = DownEncoderBlock(
                in_channels,
                out_channels,
                config.layers_per_block,
                groups,
                downsample=not is_last,
            )
            self.down_blocks.append(block)
            in_channels = out_channels
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        # twice the latent channels: a mean and a log-variance for each, which
        # DiagonalGaussian splits in two
        moments = 2 * config.latent_channels
        self.conv_out = nn.Conv2d(channels[-1], moments, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: images (B, C_img, H, W).

        Returns:
            (B, 2 * C_latent, H/f, W/f): means, then log-variances, before
            `quant_conv`.
        """
        _check_images(x, self.config)
        # 1. to the first level's channels
        x = self.conv_in(x)  # (B, C_0, H, W)

        # 2. down: each level but the last halves H and W
        for block in self.down_blocks:
            x = block(x)  # (B, C_i, H_i, W_i), at the end (B, C_-1, H/f, W/f)

        # 3. middle: attention over all pixels of the smallest map
        x = self.mid_block(x)

        # 4. out: a mean and a log-variance per latent channel
        x = self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2 C_lat, H/f, W/f)
        return x


class Decoder(nn.Module):
    """Latents back to images (diffusers' `Decoder`): the encoder in reverse.

    Args:
        config: the autoencoder's shape.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        channels = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups

        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups)
        self.up_blocks = nn.ModuleList()
        in_channels = channels[0]
        for i, out_channels in enumerate(channels):
            is_last = i == len(channels) - 1
            # one more ResnetBlock per level than the encoder: decoding is the
            # harder direction
            block = UpDecoderBlock(
                in_channels,
                out_channels,
                config.layers_per_block + 1,
                groups,
                upsample=not is_last,
            )
            self.up_blocks.append(block)
            in_channels = out_channels
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """
        Args:
            z: latents (B, C_latent, h, w), after `post_quant_conv`.

        Returns:
            images (B, C_out, h*f, w*f).
        """
        _check_latents(z, self.config)
        # 1. to the last level's channels
        x = self.conv_in(z)  # (B, C_-1, h, w)

        # 2. middle
        x = self.mid_block(x)

        # 3. up: each level but the last doubles H and W
        for block in self.up_blocks:
            x = block(x)  # (B, C_i, h_i, w_i), at the end (B, C_0, h*f, w*f)

        # 4. out: to image channels
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, C_out, h*f, w*f)


class DiagonalGaussian:
    """A Gaussian with a diagonal covariance: the encoder's posterior q(z | x).

    One independent normal per latent value, N(mean, exp(logvar)), as diffusers'
    `DiagonalGaussianDistribution`.

    Args:
        parameters: (B, 2 * C, h, w), the means in the first C channels, the
            log-variances in the last C.

    Attributes:
        mean, logvar, std, var: (B, C, h, w) each.
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        if parameters.ndim != 4 or parameters.shape[1] % 2:
            raise ValueError(
                f"expected parameters of shape (B, 2 * C, h, w), means then "
                f"log-variances, got {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, C, h, w) each
        # clamped as diffusers does, so that exp() neither overflows nor gives a
        # zero variance whose log is -inf in the KL
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps with eps ~ N(0, I): the reparameterization trick
        (Kingma & Welling 2014, sec. 2.4), so gradients reach mean and std.

        Args:
            generator: draws eps; the same generator state gives the same sample
                as diffusers. A CPU generator draws on the CPU, then eps moves to
                the latents' device, as diffusers' `randn_tensor` does.

        Returns:
            z: (B, C, h, w).
        """
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(
            self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
        ).to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latents, the mean: (B, C, h, w)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z | x) || N(0, I)) per item, summed over C, h, w.

        Closed form for Gaussians, Kingma & Welling 2014, appendix B:
        KL = 1/2 * sum(mean^2 + var - 1 - logvar).

        Returns:
            (B,).
        """
        terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        return 0.5 * terms.sum(dim=[1, 2, 3])  # (B,)


class AutoencoderOutput(NamedTuple):
    """What `AutoencoderKL.forward` returns."""

    # (B, C_out, H, W), the decoded latents
    reconstruction: torch.Tensor
    # q(z | x), for the KL term of the training loss
    posterior: DiagonalGaussian


class AutoencoderKL(nn.Module):
    """Stable Diffusion's variational autoencoder (Kingma & Welling 2014;
    Rombach et al. 2022), with diffusers' `AutoencoderKL` weight names.

    Images in [-1, 1], (B, 3, H, W), to latent distributions (B, C_latent, H/f,
    W/f) and back, with f = 2**(levels - 1) (8 for SD). The latents are not
    scaled here: multiply by `config.scaling_factor` before diffusion and divide
    by it before `decode`.

    Args:
        config: the autoencoder's shape; `VAEConfig.sd15()` or `VAEConfig.tiny()`.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convolutions on either side of the latents, named after the
        # vector-quantized autoencoder of the latent-diffusion codebase (the
        # codebook's input and output); SD's weights have them, so we keep them
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """
        Args:
            x: images (B, C_img, H, W) in [-1, 1], H and W divisible by f.

        Returns:
            the posterior q(z | x) over latents (B, C_latent, H/f, W/f).
        """
        _check_images(x, self.config)
        moments = self.quant_conv(self.encoder(x))  # (B, 2 C_lat, H/f, W/f)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """
        Args:
            z: latents (B, C_latent, h, w), unscaled.

        Returns:
            images (B, C_out, h*f, w*f), about [-1, 1] (not clamped).
        """
        _check_latents(z, self.config)
        return self.decoder(self.post_quant_conv(z))  # (B, C_out, h*f, w*f)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> AutoencoderOutput:
        """Encode, take latents, decode.

        Args:
            x: images (B, C_img, H, W) in [-1, 1].
            sample_posterior: decode a sample of the posterior (training) rather
                than its mean.
            generator: for the sample.

        Returns:
            (reconstruction (B, C_out, H, W), posterior).
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return AutoencoderOutput(self.decode(z), posterior)

    @classmethod
    def pretrained_tiny(cls, folder: Path = SHIPPED_DIR) -> AutoencoderKL:
        """The course's tiny VAE, trained on the shapes dataset and shipped in
        the package (`sdlearn train vae --ship` made it; see its JSON record),
        or the one a `sdlearn train vae` run wrote to `folder`."""
        state_dict, record = read_shipped("vae", folder=folder)
        model = cls(VAEConfig(**config_from_json(record["model_config"])))
        source = str(folder / "vae.safetensors")
        return load_checked(model, state_dict, source).eval()


class VAELoss(nn.Module):
    """The training loss of the VAE: reconstruction + kl_weight * KL.

    The reconstruction term is the mean squared error in pixel space (what PSNR
    measures); the KL term keeps the latents close to N(0, I), so that they are
    smooth enough for diffusion to model. SD adds a perceptual and a GAN loss
    and weights the KL by only 1e-6; our flat-coloured shapes do not need them.

    Args:
        vae: the model to train.
        kl_weight: weight of the KL term, per latent value.
    """

    def __init__(self, vae: AutoencoderKL, kl_weight: float = 1e-6) -> None:
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def forward(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            batch: "pixel_values" (B, 3, H, W) in [-1, 1].
            generator: for the posterior sample.

        Returns:
            (loss, {"mse": ..., "kl": ...}).
        """
        x = batch["pixel_values"]
        reconstruction, posterior = self.vae(
            x, sample_posterior=True, generator=generator
        )
        mse = F.mse_loss(reconstruction.float(), x.float())
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent value
        loss = mse + self.kl_weight * kl
        return loss, {"mse": mse.detach(), "kl": kl.detach()}


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1], per image.

    PSNR = 10 log10(1 / MSE) on the [0, 1] scale; 30 dB is an RMS error of about
    8 of 255 grey levels.

    Args:
        images, references: (B, C, H, W) in [-1, 1].

    Returns:
        (B,).
    """
    if images.shape != references.shape:
        raise ValueError(
            f"expected images and references of the same shape, got "
            f"{tuple(images.shape)} and {tuple(references.shape)}"
        )
    a = (images.float().clamp(-1, 1) + 1) / 2
    b = (references.float() + 1) / 2
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))
