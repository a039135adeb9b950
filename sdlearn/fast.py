"""Chapter 10: fast on a CPU. What a denoising step costs, what makes it shorter.

The chapter climbs a ladder of speed-ups, each measured on the same weights
against the rung below; this module holds what it measures with and what pays:

- `step_flops` counts a UNet step's arithmetic (`conv_flops` a convolution's)
  and `matmul_peak` measures what the machine can do, so that a time can be
  set against its roofline;
- `time_alternating` times several ways of doing the same work in turns, in one
  process, and keeps every run: medians and ratios of back-to-back pairs;
- `bf16_pays` asks this CPU whether bfloat16 is faster than float32 (with AMX
  or AVX-512 BF16 it is, several times; on a laptop's AVX2 it is emulated and
  far slower);
- `FeatureCache` reuses the deep features of a full step for the next few, and
  runs only the UNet's outermost level in between (DeepCache's idea, Ma, Fang
  and Wang 2023): the deep features change slowly from step to step;
- `FusedSelfAttention` computes a self-attention's queries, keys and values
  in one product (`fuse_projections` swaps them into a UNet);
- `FastRecipe` holds the rungs that pay, and `FastRecipe.apply(pipe)` turns them
  on: `sdlearn generate --fast` and `sdlearn evaluate --fast` (bfloat16 where
  it pays, with channels_last memory; 20 DDIM steps; half the outermost tokens
  merged (`sdlearn.merging`); attention by sdlearn's own kernel on CPUs with
  AMX (`sdlearn.kernels`); the cache and `torch.compile` when asked for).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sdlearn import kernels
from sdlearn.attention import (
    Attention,
    merge_heads,
    set_attention_backend,
    split_heads,
)
from sdlearn.devices import pick_dtype
from sdlearn.merging import merge_tokens
from sdlearn.schedulers import with_sampler
from sdlearn.spatial_transformer import TransformerBlock
from sdlearn.unet import UNet, UNetConfig, timestep_embedding

# --- measuring ----------------------------------------------------------------


def step_flops(
    config: UNetConfig, latent_size: int, batch: int = 2, text_tokens: int = 77
) -> int:
    """Floating-point operations of one UNet step (a multiply-add counts 2).

    Counted by torch's FlopCounterMode on the meta device: shapes only, no
    memory and no arithmetic, so even Stable Diffusion 1.5 at 64x64 latents is
    counted in a second. Matrix products and convolutions are counted (as
    torch counts them, biases not); norms and activations are a few percent
    more work, not counted.

    Args:
        config: the UNet's config, e.g. `UNetConfig.sd15()`.
        latent_size: H = W of the latents (64 for a 512x512 image).
        batch: B; 2 with classifier-free guidance.
        text_tokens: S, the text tokens the cross-attention reads.
    """
    with torch.device("meta"):
        unet = UNet(config).eval()
        sample = torch.empty(batch, config.in_channels, latent_size, latent_size)
        text = torch.empty(batch, text_tokens, config.cross_attention_dim)
        timestep = torch.full((batch,), 500)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(sample, timestep, text)
    return counter.get_total_flops()


def conv_flops(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """FLOPs of `conv` on the input `x` (B, C_in, H, W), counted as torch's
    FlopCounterMode counts them: 2 per multiply-add, the bias not counted.

    Each output number (B x C_out x H_out x W_out of them) is a dot product of
    one patch, C_in / groups channels by the kernel's kh x kw.
    """
    if x.ndim != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(
            f"expected x of shape (B, {conv.in_channels}, H, W), got {tuple(x.shape)}"
        )
    B = x.shape[0]
    H_out, W_out = _conv_output_size(conv, x.shape[-2:])
    kh, kw = conv.kernel_size
    patch = conv.in_channels // conv.groups * kh * kw  # multiply-adds per output
    return 2 * B * conv.out_channels * H_out * W_out * patch


def _conv_output_size(conv: nn.Conv2d, size: torch.Size) -> tuple[int, int]:
    """(H_out, W_out): (H + 2 padding - dilation (k - 1) - 1) // stride + 1."""
    out = []
    for i, n in enumerate(size):
        kernel = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        out.append((n + 2 * conv.padding[i] - kernel) // conv.stride[i] + 1)
    return out[0], out[1]


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5):
    """This machine's matrix-multiply speed in FLOP/s: the median of `repeats`
    products of two n x n matrices, on all of torch's threads, after a warm-up.

    A UNet step is mostly such products (convolutions are matrix products of
    image patches), so this is the roof its speed can approach.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    seconds = time_alternating({"matmul": lambda: a @ b}, repeats)["matmul"]
    return 2 * n**3 / statistics.median(seconds)


def time_alternating(
    steps: dict[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each step, run in turns: {name: [seconds of each run]}.

    Taking turns in one process means that a change in the machine's load hits
    every step alike; the order flips each round, so that none always follows
    another. Each step runs `warmup` times first, untimed (the first run of a
    model allocates its memory and picks its kernels). Runs under
    `torch.inference_mode()`.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"expected repeats >= 1 and warmup >= 0, got repeats={repeats}, "
            f"warmup={warmup}"
        )
    names = list(steps)
    runs: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                steps[name]()
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                steps[name]()
                runs[name].append(time.perf_counter() - start)
    return runs


def ratio_of_pairs(runs: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of name's time / baseline's: below 1, name is faster."""
    pairs = zip(runs[name], runs[baseline], strict=True)
    return statistics.median(ours / theirs for ours, theirs in pairs)


@cache
def bf16_pays(n: int = 512) -> bool:
    """Whether this CPU multiplies bfloat16 matrices at least 1.5 times as fast
    as float32 ones (measured once per process, in a few milliseconds).

    With AMX or AVX-512 BF16 units bfloat16 is several times faster; without
    them (most laptops: AVX2) torch emulates it and it is many times slower.
    Asking the CPU for its features would miss a library told not to use them
    (ONEDNN_MAX_CPU_ISA), so this measures instead.
    """
    speed = {}
    for dtype in (torch.float32, torch.bfloat16):
        speed[dtype] = matmul_peak(dtype, n=n, repeats=5)
    return speed[torch.bfloat16] >= 1.5 * speed[torch.float32]


# --- reusing the deep features: DeepCache's idea --------------------------------


def deep_forward(
    unet: UNet, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A full UNet step that also returns its deep features: the input of the
    last (outermost) up block, everything the deeper levels contributed.

    Returns:
        the predicted noise (B, C_out, H, W) and the deep features
        (B, C_1, H, W): level 1's output, upsampled to level 0's size.
    """
    kept = {}

    def keep(module: nn.Module, args: tuple) -> None:
        kept["deep"] = args[0]

    handle = unet.up_blocks[-1].register_forward_pre_hook(keep)
    try:
        noise = unet(sample, timestep, context)
    finally:
        handle.remove()
    return noise, kept["deep"]


def shallow_forward(
    unet: UNet,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    deep: torch.Tensor,
) -> torch.Tensor:
    """A UNet step that runs only the outermost level, on deep features kept
    from an earlier step (`deep_forward`'s).

    The way down stops after level 0's layers: their outputs, and conv_in's,
    are the skips the last up block pops. Level 0's downsampler feeds only the
    deeper levels, so it does not run either.

    Args:
        unet: the UNet.
        sample: noisy latents (B, in_channels, H, W).
        timestep: as `UNet.forward` takes it.
        context: text tokens (B, S, cross_attention_dim).
        deep: kept deep features (B, C_1, H, W), from `deep_forward`.

    Returns:
        the predicted noise (B, out_channels, H, W).
    """
    timesteps = unet._check_inputs(sample, timestep, context)
    B, _, H, W = sample.shape
    wanted = (B, unet.config.block_out_channels[1], H, W)
    if tuple(deep.shape) != wanted:
        raise ValueError(
            f"expected deep features of shape {wanted} for sample of shape "
            f"{tuple(sample.shape)}, got {tuple(deep.shape)}"
        )
    t_emb = timestep_embedding(timesteps, unet.config.block_out_channels[0])
    temb = unet.time_embedding(t_emb.to(sample.dtype))  # (B, time_embed_dim)

    h = unet.conv_in(sample)  # (B, C0, H, W)
    skips = [h]
    first = unet.down_blocks[0]
    for i, resnet in enumerate(first.resnets):
        h = resnet(h, temb)
        if first.attentions is not None:
            h = first.attentions[i](h, context)
        skips.append(h)

    h = unet.up_blocks[-1](deep, temb, context, skips)  # (B, C0, H, W)
    h = F.silu(unet.conv_norm_out(h))
    return unet.conv_out(h)  # (B, out_channels, H, W)


class FeatureCache(nn.Module):
    """A UNet that runs in full only every `every` steps, and in between only
    its outermost level, on the deep features of the last full step.

    Called like the UNet it wraps, one call per denoising step. A call starts
    a new image, and forgets the kept features, when none are kept, when its
    timestep is no smaller than the last call's (a sampler's timesteps only go
    down), or when its batch is another size; then calls 0, every, 2 every...
    of the image run in full.

    Example:
        >>> pipe.unet = FeatureCache(pipe.unet, every=3)  # steps 0, 3, 6... in full

    Args:
        unet: the UNet.
        every: run in full every `every` steps (1: always, no cache).
    """

    def __init__(self, unet: UNet, every: int = 3) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"expected every >= 1, got {every}")
        self.unet = unet
        self.every = every
        self.reset()

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    def reset(self) -> None:
        """Forget the kept features: the next call runs in full."""
        self.deep: torch.Tensor | None = None
        self.calls = 0  # calls since the last reset
        self.last_timestep: float | None = None
        self.full_calls = 0  # of them, how many ran in full

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        """One denoising step, as `UNet.forward` (same arguments and shapes):
        in full, keeping the deep features, or shallow, on the kept ones."""
        t = float(torch.as_tensor(timestep).flatten()[0])
        new_image = (
            self.deep is None
            or t >= self.last_timestep  # a sampler's timesteps only go down
            or self.deep.shape[0] != sample.shape[0]  # another batch
        )
        if new_image:
            self.reset()
        full = self.calls % self.every == 0
        self.calls += 1
        self.last_timestep = t
        if full:
            self.full_calls += 1
            noise, self.deep = deep_forward(
                self.unet, sample, timestep, encoder_hidden_states
            )
            return noise
        return shallow_forward(
            self.unet, sample, timestep, encoder_hidden_states, self.deep
        )


# --- one product instead of three: fused projections ---------------------------


class FusedSelfAttention(nn.Module):
    """A self-attention layer whose query, key and value projections are one
    product (diffusers' `fuse_qkv_projections`).

    The three projections read the same tokens, so their weights, stacked one
    above the other, make one Linear three times as wide: one pass over the
    tokens instead of three, and one call instead of three. The outputs are
    the same, up to the order of float additions.

    Args:
        attention: a self-attention `Attention`; its weights are copied, its
            output projection shared.
    """

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        if attention.cross_attention_dim != attention.query_dim:
            raise ValueError(
                f"expected a self-attention layer; this one reads context tokens "
                f"of width {attention.cross_attention_dim}, not {attention.query_dim}"
            )
        self.heads = attention.heads
        projections = (attention.to_q, attention.to_k, attention.to_v)
        weight = torch.cat([p.weight for p in projections])  # (3 nh*hd, D)
        bias = attention.to_q.bias is not None
        # made on the meta device and filled: no random initialisation to waste
        shape = dict(in_features=weight.shape[1], out_features=weight.shape[0])
        to_qkv = nn.Linear(**shape, bias=bias, device="meta", dtype=weight.dtype)
        self.to_qkv = to_qkv.to_empty(device=weight.device)
        with torch.no_grad():
            self.to_qkv.weight.copy_(weight)
            if bias:
                self.to_qkv.bias.copy_(torch.cat([p.bias for p in projections]))
        self.to_out = attention.to_out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), as `Attention` without context or mask."""
        D = self.to_qkv.in_features
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != D:
            raise ValueError(
                f"expected hidden_states of shape (B, T, {D}), "
                f"got {tuple(hidden_states.shape)}"
            )
        # 1. one product, cut into the three: queries, keys, values
        qkv = self.to_qkv(hidden_states)  # (B, T, 3 nh*hd)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, T, nh*hd) each
        q, k, v = (split_heads(x, self.heads) for x in (q, k, v))  # (B, nh, T, hd)
        # 2. attend, each head on its own; 3. heads side by side, then mix them
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
        return self.to_out[1](self.to_out[0](merge_heads(out)))  # (B, T, D)


def fuse_projections(unet: nn.Module) -> nn.Module:
    """Replace the self-attention of every transformer block in `unet` by a
    `FusedSelfAttention` on the same weights. For inference: the fused
    layers' weights are named `to_qkv`, not `to_q`, `to_k` and `to_v`.

    Returns:
        unet, changed in place.
    """
    for module in list(unet.modules()):
        if isinstance(module, TransformerBlock) and isinstance(module.attn1, Attention):
            module.attn1 = FusedSelfAttention(module.attn1)
    return unet


# --- the recipe ------------------------------------------------------------------


@dataclass(frozen=True)
class FastRecipe:
    """The rungs of chapter 10's ladder that pay, as one setting.

    Args:
        dtype: "auto" (bfloat16 where `bf16_pays`, else float32; float16 on a
            GPU), or a dtype's name.
        scheduler: the sampler, diffusers' class name: DDIM draws in 20 steps
            what DDPM draws in 50, and stays stable under strong guidance,
            where DPM-Solver++ (2M) overshoots (chapter 08).
        steps: denoising steps.
        channels_last: the UNet's and the VAE's weights in channels_last memory;
            None (the default): with bfloat16, whose CPU convolutions prefer it
            (in float32 the UNet is a little slower with it).
        merge_ratio: the share of tokens merged before each self-attention of
            the outermost level (`sdlearn.merging`, ToMe's idea); 0 merges
            none. Half, by default: on SD 1.5 at 512x512 it takes a sixth
            off a step, and it cost the tiny model's scores nothing.
        cache_every: `FeatureCache`'s period; 1, no cache, by default: on the
            course's two-level UNet the deep features are most of the model,
            and reusing them costs colours (chapter 10 measures it).
        compile: `torch.compile` the UNet (freezing its weights): pays when a
            process draws many images, since compiling takes a minute or more.
        amx_attention: the UNet's attention by sdlearn's own kernel
            (`sdlearn.kernels`) where it runs: bfloat16 on a CPU with AMX. It
            takes 0.70 of torch's kernel's time at SD 1.5's outermost level;
            elsewhere, and wherever it cannot be built, torch's kernel stays.
    """

    dtype: str = "auto"
    scheduler: str = "DDIMScheduler"
    steps: int = 20
    channels_last: bool | None = None
    merge_ratio: float = 0.5
    cache_every: int = 1
    compile: bool = False
    amx_attention: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.cache_every < 1:
            raise ValueError(
                f"expected steps >= 1 and cache_every >= 1, got steps={self.steps}, "
                f"cache_every={self.cache_every}"
            )
        if not 0 <= self.merge_ratio <= 0.75:
            raise ValueError(
                f"expected merge_ratio between 0 and 0.75, got {self.merge_ratio}"
            )

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype this recipe runs in on `device`."""
        if self.dtype != "auto":
            return pick_dtype(self.dtype, device)
        if device.type != "cpu":
            return torch.float16
        return torch.bfloat16 if bf16_pays() else torch.float32

    def resolve_channels_last(self, dtype: torch.dtype) -> bool:
        """Whether this recipe stores the UNet and the VAE in channels_last."""
        if self.channels_last is None:
            return dtype == torch.bfloat16
        return self.channels_last

    def _refuse(self, pipe) -> None:
        """A ValueError if `pipe` is fast already, or if this recipe's own
        settings clash."""
        if (
            isinstance(pipe.unet, FeatureCache)
            or hasattr(pipe.unet, "_orig_mod")
            or getattr(pipe.unet, "_token_merging", None) is not None
        ):
            raise ValueError("this pipeline is fast already: apply a recipe once")
        if self.compile and self.cache_every > 1:
            # the cache's full step keeps its features with a hook, which a
            # compiled graph would be traced again for at every call
            raise ValueError(
                f"compile=True and cache_every={self.cache_every} do not go together "
                "yet: compile, or cache"
            )

    def apply(self, pipe) -> list[str]:
        """Turn the recipe on for `pipe` (a `StableDiffusionPipeline`), in place:
        its precision and memory format, its sampler and its UNet. Load adapters
        and learned tokens first: the UNet is wrapped. Returns what was turned
        on, in words.
        The steps are the caller's: `pipe(prompt, num_inference_steps=recipe.steps)`.
        """
        self._refuse(pipe)
        dtype = self.resolve_dtype(pipe.device)
        pipe.to(dtype=dtype)
        done = [f"weights in {str(dtype).removeprefix('torch.')}"]
        if self.resolve_channels_last(dtype):
            for model in (pipe.unet, pipe.vae):
                model.to(memory_format=torch.channels_last)
            done.append("the UNet and the VAE in channels_last memory")
        pipe.scheduler = with_sampler(pipe.scheduler, self.scheduler)
        done.append(f"{self.scheduler}, {self.steps} steps")
        on_cpu_in_bf16 = pipe.device.type == "cpu" and dtype == torch.bfloat16
        if self.amx_attention and on_cpu_in_bf16 and kernels.amx_attention_available():
            set_attention_backend(pipe.unet, "amx")
            done.append("attention by sdlearn's AMX kernel")
        if self.merge_ratio > 0:
            merge_tokens(pipe.unet, self.merge_ratio)
            done.append(f"{self.merge_ratio:.0%} of the outermost tokens merged")
        if self.compile:
            pipe.unet = compiled(pipe.unet)
            done.append("the UNet compiled")
        if self.cache_every > 1:
            pipe.unet = FeatureCache(pipe.unet, self.cache_every)
            done.append(f"deep features reused, a full step every {self.cache_every}")
        return done


def compiled(unet: nn.Module) -> nn.Module:
    """`torch.compile(unet)` with its weights frozen into the graph (inductor's
    `freezing`: constants folded, convolution weights packed once for the CPU's
    kernels). Compiles on the first call of each new shape; inference only.

    Freezing is inductor's process-wide setting, so it is turned on for every
    model compiled after this too. (`torch.compile(options={"freezing": True})`
    compiles without freezing: measured, no faster than eager.)
    """
    inductor_config.freezing = True
    return torch.compile(unet)
