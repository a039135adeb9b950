"""Chapter 06: looking inside, the cross-attention maps of each prompt token.

Every SpatialTransformer of the UNet has a cross-attention layer whose queries
are the pixels and whose keys are the text tokens; `CrossAttentionMaps`
records where each token's attention falls while the pipeline samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.unet import UNet


class CrossAttentionMaps:
    """Records how much each pixel of the latents attends to each prompt token.

    While active (a context manager), every cross-attention layer of the UNet
    reports softmax(QK^T / sqrt(hd)) for its pixels and the text tokens; the
    maps are averaged over heads, resized to the latents' h x w, and summed
    over layers and denoising steps. Only the conditional half of a guided batch
    is kept: the unconditional half attends to the empty prompt.

    The probabilities are computed again from the layer's own inputs (one more
    matmul per layer), so the fused attention kernel keeps running as usual.

    Args:
        unet: the UNet to watch.
        latent_size: (h, w) of the latents, to place each layer's pixels.
        keep_last: of each batch the UNet sees, keep only the last `keep_last`
            items (the conditional half under guidance); None keeps all.
    """

    def __init__(
        self, unet: UNet, latent_size: tuple[int, int], keep_last: int | None = None
    ) -> None:
        self.unet = unet
        self.latent_size = latent_size
        self.keep_last = keep_last
        self.total: torch.Tensor | None = None  # (B, S, h, w)
        self.count = 0
        self.handles: list = []

    def __enter__(self) -> CrossAttentionMaps:
        for name, module in self.unet.named_modules():
            if name.endswith("attn2"):
                self.handles.append(module.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        hidden_states, context = args[0], args[1]
        if self.keep_last is not None:
            hidden_states = hidden_states[-self.keep_last :]
            context = context[-self.keep_last :]
        B, T, _ = hidden_states.shape
        q = module.to_q(hidden_states).view(B, T, module.heads, -1)  # (B, T, nh, hd)
        k = module.to_k(context).view(B, context.shape[1], module.heads, -1)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
        probs = scores.float().softmax(dim=-1).mean(dim=1)  # (B, T, S)
        # this layer's pixels: T = (h / f) * (w / f) for its downsampling f
        h, w = self.latent_size
        f = round((h * w / T) ** 0.5)
        maps = probs.transpose(1, 2).reshape(B, -1, h // f, w // f)  # (B, S, h/f, w/f)
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def result(self) -> torch.Tensor:
        """The average map of every token: (B, S, h, w), each pixel's attention
        over the S tokens summing to 1."""
        if self.total is None:
            raise ValueError("no cross-attention was recorded; run the UNet first")
        return self.total / self.count
