"""Chapter 07: how a diffusion model learns, the loss its UNet trains with.

Noise the latents of a captioned image to a random timestep, ask the UNet for
the noise, score it with the mean squared error (Ho et al. 2020, eq. 14;
Rombach et al. 2022, eq. 2). `sdlearn.training.train` runs it batch after
batch; `sdlearn.stages.train_unet` and the fine-tunes of chapter 09 build it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiffusionLoss(nn.Module):
    """The loss Stable Diffusion trains its UNet with (Rombach et al. 2022, eq. 2):
    noise the latents of a captioned image to a random timestep, ask the UNet
    for the noise, and score it with the mean squared error.

    The frozen VAE and text encoder ran once, before training (see
    `sdlearn.stages.encode_shapes`): each item carries its latent distribution
    and the index of its caption in a table of text tokens. The caption is
    replaced by the empty prompt with probability `caption_dropout`, so that
    one model learns both the conditional and the unconditional prediction
    classifier-free guidance needs (Ho & Salimans 2022).

    Args:
        unet: the model being trained.
        scheduler: the noise schedule (`add_noise`, `num_train_timesteps`).
        text_tokens: (N_captions, 77, D) the text encoder's output per caption;
            row 0 is the empty prompt.
        scaling_factor: the VAE's, so that latents have about unit variance.
        caption_dropout: how often the caption is dropped.
        timestep_bias: how many times more often a timestep of the noisier half
            is drawn than one of the other half (1: uniform, as SD trains; as
            diffusers' training scripts' "later" timestep bias). Where the noise
            hides most of the picture, only the caption can tell what to draw.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        text_tokens: torch.Tensor,
        scaling_factor: float,
        caption_dropout: float = 0.1,
        timestep_bias: float = 1.0,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        # a plain attribute, not a buffer: not trained, not in checkpoints
        self.text_tokens = text_tokens
        self.scaling_factor = scaling_factor
        self.caption_dropout = caption_dropout
        if timestep_bias <= 0:
            raise ValueError(f"expected a positive timestep_bias, got {timestep_bias}")
        self.timestep_bias = timestep_bias

    def timesteps(
        self, B: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """(B,) training timesteps: uniform, or the noisier half `timestep_bias`
        times as likely."""
        T = self.scheduler.config.num_train_timesteps
        if self.timestep_bias == 1:
            return torch.randint(0, T, (B,), generator=generator, device=device)
        weights = torch.ones(T, device=device)
        weights[T // 2 :] = self.timestep_bias
        return torch.multinomial(weights, B, replacement=True, generator=generator)

    def forward(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            batch: "mean" and "std" (B, C, h, w) of the VAE's posterior for each
                image, "caption" (B,) rows of `text_tokens`.
            generator: every random draw of the step.

        Returns:
            (loss, {}).
        """
        mean, std = batch["mean"], batch["std"]
        B, device = mean.shape[0], mean.device

        def randn(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=device)

        # 1. a sample of the posterior, scaled to about unit variance
        z0 = (mean + std * randn(mean.shape)) * self.scaling_factor  # (B, C, h, w)
        # 2. a timestep per image, and the noise to add (eq. 4, Ho et al. 2020)
        t = self.timesteps(B, generator, device)
        noise = randn(z0.shape)
        zt = self.scheduler.add_noise(z0, noise, t)
        # 3. the caption's tokens, or the empty prompt's
        rows = batch["caption"].clone()
        dropped = torch.rand(B, generator=generator, device=device)
        rows[dropped < self.caption_dropout] = 0
        context = self.context(rows)  # (B, 77, D)
        # 4. predict the noise (eq. 14, Ho et al. 2020)
        prediction = self.unet(zt, t, context)
        return F.mse_loss(prediction.float(), noise), {}

    def context(self, rows: torch.Tensor) -> torch.Tensor:
        """The text tokens (B, 77, D) of the captions in `rows` (B,), looked up
        in the table (chapter 09's textual inversion runs the text encoder)."""
        return self.text_tokens.to(rows.device)[rows]
