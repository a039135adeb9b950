"""Scaled dot-product attention and the attention layer every later model uses.

Chapter 01. The same `Attention` class serves three models:

- CLIP's text encoder: causal self-attention with biases on all projections,
  `Attention(D, heads=nh, dim_head=D // nh, bias=True)` called with `causal=True`.
- the VAE's mid-block: one head over the H*W pixels of a feature map; the VAE
  wraps this class with its group norm and residual connection.
- the UNet's transformer blocks: self-attention, and cross-attention whose keys
  and values come from the text encoder's tokens (`cross_attention_dim`).

Sub-module names follow diffusers' `Attention` (`to_q`, `to_k`, `to_v`,
`to_out.0`), so its state dicts load one-to-one.

Two backends compute the attention itself: "readable", our own
`scaled_dot_product_attention` in plain tensor operations, and "fused", torch's
`F.scaled_dot_product_attention` kernel (the default: faster, less memory).
Later chapters may add backends to `EXTRA_BACKENDS`: chapter 10's "amx" is
sdlearn's own kernel for bfloat16 on CPUs with AMX (`sdlearn.kernels`).
`set_attention_backend(model, ...)` switches every attention layer in a model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

BACKENDS: tuple[str, ...] = ("fused", "readable")
# backends later chapters add, by name: attend(q, k, v, mask, causal) returns
# the output, or None where it does not take these inputs (torch's kernel then)
EXTRA_BACKENDS: dict[str, Callable] = {}


def causal_mask(
    q_len: int, k_len: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The boolean causal mask: query i may attend to keys 0..i.

    Aligned to the top-left corner like `F.scaled_dot_product_attention`'s
    `is_causal`, so when `q_len != k_len`, query i still sees keys 0..i.

    Args:
        q_len: number of queries Tq.
        k_len: number of keys Tk.
        device: where to build the mask.

    Returns:
        mask: (Tq, Tk) bool, True where a query may attend.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()


def _check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> None:
    """Raise a ValueError naming the shapes if q, k, v and mask do not fit."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "expected q (B, nh, Tq, hd), k (B, nh, Tk, hd) and v (B, nh, Tk, hd), "
            f"all of rank 4; got {shapes}"
        )
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"q, k and v must have the same batch size B; got {shapes}")
    if not q.shape[1] == k.shape[1] == v.shape[1]:
        raise ValueError(
            f"q, k and v must have the same number of heads nh; got {shapes}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dim hd to be multiplied; got {shapes}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k and v must have the same number of tokens Tk (one value per key); "
            f"got {shapes}"
        )
    if mask is None:
        return
    _check_mask_dtype(mask)
    B, nh, Tq, _ = q.shape
    expected = (B, nh, Tq, k.shape[2])
    if not _broadcasts_to(mask, expected):
        raise ValueError(
            f"mask must broadcast to (B, nh, Tq, Tk) = {expected}, "
            f"got {tuple(mask.shape)}"
        )


def _check_mask_dtype(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(
            f"mask must be bool (True = attend) or floating (added to the scores), "
            f"got {mask.dtype}; for a tokenizer's 0/1 attention mask pass mask.bool()"
        )


def _broadcasts_to(mask: torch.Tensor, shape: tuple[int, ...]) -> bool:
    try:
        return torch.broadcast_shapes(mask.shape, shape) == shape
    except RuntimeError:
        return False


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Attention written out: softmax(Q K^T / sqrt(hd)) V, Vaswani et al. 2017, eq. 1.

    Every query takes a weighted average of the values; its weights say how well
    the query matches each key.

    A query whose keys are all masked (every score -inf) has nothing to average:
    its output is zeros, and it never puts NaN into the output or the gradients
    of other rows. `F.scaled_dot_product_attention` does the same in torch 2.13
    (since torch 2.5, pytorch/pytorch#131060; older releases returned NaN).
    A large finite negative value such as -10000 or `torch.finfo(dtype).min` on
    every key of a row is not a fully masked row: a shift common to the whole
    row cancels in the softmax, so the row still attends to its keys, in both.

    Args:
        q: queries (B, nh, Tq, hd).
        k: keys (B, nh, Tk, hd).
        v: values (B, nh, Tk, hd_v); hd_v is usually hd.
        mask: broadcastable to (B, nh, Tq, Tk); bool with True where a query may
            attend, or floating and added to the scores (0 to attend, -inf to
            block).
        causal: if True, query i attends only to keys 0..i (see `causal_mask`),
            on top of `mask`.

    Returns:
        out: (B, nh, Tq, hd_v), in v's dtype.
    """
    _check_qkv(q, k, v, mask)
    Tq, Tk = q.shape[2], k.shape[2]

    # 1. how well each query matches each key, scaled so that the scores have
    # unit variance whatever hd is and the softmax does not saturate
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, nh, Tq, Tk)

    # 2. masks: a score of -inf becomes a weight of exactly 0
    if causal:
        scores = scores.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask

    # 3. softmax over the keys. In float32: exp of low-precision (bfloat16,
    # float16) scores loses most of the weights' digits. A fully masked row
    # would be 0 / 0 = NaN, so it gets finite scores here and zero weights after.
    fully_masked = scores.isneginf().all(dim=-1, keepdim=True)  # (B, nh, Tq, 1)
    scores = scores.masked_fill(fully_masked, 0.0)
    weights = scores.float().softmax(dim=-1).masked_fill(fully_masked, 0.0)

    # 4. the weighted average of the values
    return weights.to(v.dtype) @ v  # (B, nh, Tq, hd_v)


def _fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """`scaled_dot_product_attention` computed by torch's fused kernel."""
    if mask is not None and causal:
        # torch's math kernel refuses a mask together with is_causal, so the
        # causal mask goes into the given one
        allowed = causal_mask(q.shape[2], k.shape[2], q.device)
        if mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = mask.masked_fill(~allowed, float("-inf"))
        causal = False
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # the kernel wants an additive mask in q's dtype
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Cut every token's vector into `num_heads` slices, one per head.

    Args:
        x: (B, T, D) with D divisible by num_heads.
        num_heads: nh.

    Returns:
        (B, nh, T, hd) with hd = D / nh; head h holds features h*hd .. (h+1)*hd - 1.
    """
    if x.ndim != 3 or x.shape[-1] % num_heads != 0:
        raise ValueError(
            f"expected x of shape (B, T, D) with D divisible by num_heads="
            f"{num_heads}, got {tuple(x.shape)}"
        )
    return rearrange(x, "B T (nh hd) -> B nh T hd", nh=num_heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Undo `split_heads`: put the heads' slices of each token side by side.

    Args:
        x: (B, nh, T, hd).

    Returns:
        (B, T, nh*hd).
    """
    if x.ndim != 4:
        raise ValueError(f"expected x of shape (B, nh, T, hd), got {tuple(x.shape)}")
    return rearrange(x, "B nh T hd -> B T (nh hd)")


def _mask_as_4d(
    mask: torch.Tensor | None, B: int, nh: int, T: int, S: int
) -> torch.Tensor | None:
    """An `Attention.forward` mask, with axes added so it broadcasts over heads."""
    if mask is None:
        return None
    _check_mask_dtype(mask)
    if mask.ndim == 2:
        mask_4d = rearrange(mask, "B S -> B 1 1 S")
    elif mask.ndim == 3:
        mask_4d = rearrange(mask, "B T S -> B 1 T S")
    else:
        mask_4d = mask
    if mask.ndim not in (2, 3, 4) or not _broadcasts_to(mask_4d, (B, nh, T, S)):
        raise ValueError(
            f"expected attention_mask of shape (B, S) = {(B, S)}, (B, T, S) = "
            f"{(B, T, S)} or one that broadcasts to (B, nh, T, S) = {(B, nh, T, S)}, "
            f"got {tuple(mask.shape)}"
        )
    return mask_4d


class Attention(nn.Module):
    """Multi-head self- or cross-attention with diffusers' `Attention` weight names.

    Queries come from `hidden_states`; keys and values from `encoder_hidden_states`
    when given (cross-attention), else from `hidden_states` (self-attention).

    Args:
        query_dim: width D of the query tokens, and of the output.
        cross_attention_dim: width D_ctx of the context tokens for cross-attention;
            None means self-attention (D_ctx = D).
        heads: number of heads nh.
        dim_head: width hd of each head; nh*hd need not equal D.
        dropout: dropout after the output projection (to_out.1).
        bias: whether to_q, to_k, to_v have biases (CLIP: yes, the UNet: no).
        out_bias: whether to_out.0 has a bias.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        self.query_dim = query_dim
        self.cross_attention_dim = (
            query_dim if cross_attention_dim is None else cross_attention_dim
        )
        self.heads = heads
        self.dim_head = dim_head
        inner_dim = heads * dim_head
        # "fused" or "readable"; set it on a whole model with set_attention_backend
        self.backend = "fused"

        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(self.cross_attention_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(self.cross_attention_dim, inner_dim, bias=bias)
        # a list only so that the weights are named to_out.0.* as in diffusers
        self.to_out = nn.ModuleList(
            [nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)]
        )

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}, backend={self.backend!r}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attend from every query token to every context token.

        Args:
            hidden_states: query tokens (B, T, D).
            encoder_hidden_states: context tokens (B, S, D_ctx) for
                cross-attention; None for self-attention (S = T).
            attention_mask: bool (True = attend) or additive float, one of
                (B, S): which context tokens exist, e.g. a tokenizer's padding
                mask as bool; (B, T, S) or (B, 1, S), as diffusers takes it; or
                anything that broadcasts to (B, nh, T, S).
            causal: if True, token i attends only to tokens 0..i (CLIP's text
                encoder), on top of attention_mask.

        Returns:
            (B, T, D)
        """
        self._check_inputs(hidden_states, encoder_hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        else:
            context = encoder_hidden_states
        B, T, _ = hidden_states.shape
        mask = _mask_as_4d(attention_mask, B, self.heads, T, context.shape[1])

        # 1. project to queries, keys and values, and split them into heads
        q = split_heads(self.to_q(hidden_states), self.heads)  # (B, nh, T, hd)
        k = split_heads(self.to_k(context), self.heads)  # (B, nh, S, hd)
        v = split_heads(self.to_v(context), self.heads)  # (B, nh, S, hd)

        # 2. attend, each head on its own
        if self.backend == "fused":
            out = _fused_attention(q, k, v, mask, causal)
        elif self.backend in EXTRA_BACKENDS:
            out = EXTRA_BACKENDS[self.backend](q, k, v, mask, causal)
            if out is None:
                out = _fused_attention(q, k, v, mask, causal)
        elif self.backend == "readable":
            out = scaled_dot_product_attention(q, k, v, mask, causal)
        else:
            raise ValueError(
                f"unknown backend {self.backend!r}; expected one of "
                f"{(*BACKENDS, *EXTRA_BACKENDS)}"
            )

        # 3. heads side by side again, then mix them
        out = merge_heads(out)  # (B, T, nh*hd)
        out = self.to_out[0](out)  # (B, T, D)
        return self.to_out[1](out)

    def _check_inputs(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> None:
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.query_dim:
            raise ValueError(
                f"expected hidden_states of shape (B, T, {self.query_dim}), "
                f"got {tuple(hidden_states.shape)}"
            )
        if encoder_hidden_states is None:
            if self.cross_attention_dim != self.query_dim:
                raise ValueError(
                    f"this layer attends to context tokens of width "
                    f"{self.cross_attention_dim}; pass encoder_hidden_states of shape "
                    f"(B, S, {self.cross_attention_dim})"
                )
            return
        B = hidden_states.shape[0]
        context = encoder_hidden_states
        if (
            context.ndim != 3
            or context.shape[0] != B
            or context.shape[-1] != self.cross_attention_dim
        ):
            raise ValueError(
                f"expected encoder_hidden_states of shape "
                f"({B}, S, {self.cross_attention_dim}), got {tuple(context.shape)}"
            )


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Choose how every `Attention` inside `model` computes attention.

    Args:
        model: any module; `Attention` layers anywhere inside it are switched.
        backend: "fused" (torch's kernel, the default), "readable"
            (`scaled_dot_product_attention` above, to read or step through), or
            one of `EXTRA_BACKENDS`: "amx" once `sdlearn.kernels` is imported.

    Returns:
        model, so that calls can be chained.
    """
    if backend not in BACKENDS and backend not in EXTRA_BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r}; expected one of "
            f"{(*BACKENDS, *EXTRA_BACKENDS)} (import sdlearn.kernels for 'amx')"
        )
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
    return model
