"""Checks for chapter 10's exercise 10.5: a self-attention layer whose three
projections are one product (`sdlearn.fast.FusedSelfAttention.forward`).

The learner's `forward(self, hidden_states)` runs on `FusedSelfAttention`s
built from seeded `Attention` layers (with and without biases, with a head
width that does not divide the tokens' width) and must give the package's
output, which is the unfused layer's. A passing answer is kept as
"fast:FusedSelfAttention.forward"; the chapter times the UNet with it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sdlearn.attention import Attention, merge_heads, split_heads
from sdlearn.checks import Case, Verdict, check, randn, seeded
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.fast import FusedSelfAttention

# (query_dim, heads, dim_head, bias, batch, tokens)
LAYERS = [(16, 2, 8, False, 2, 6), (24, 3, 8, True, 1, 5), (32, 4, 4, False, 3, 7)]


def _cases() -> list[Case]:
    cases = []
    for i, (dim, heads, dim_head, bias, batch, tokens) in enumerate(LAYERS):
        with torch.device("meta"):
            attention = Attention(dim, heads=heads, dim_head=dim_head, bias=bias)
        layer = FusedSelfAttention(seeded(attention, seed=500 + i)).eval()
        x = randn(batch, tokens, dim, seed=600 + i)
        with torch.no_grad():
            cases.append(Case((layer, x), FusedSelfAttention.forward(layer, x)))
    return cases


def _slipped_forward(self, hidden_states, *, slip: str):
    """FusedSelfAttention.forward with one known slip."""
    qkv = self.to_qkv(hidden_states)  # (B, T, 3 nh*hd)
    if slip == "heads first":
        q, k, v = split_heads(qkv, self.heads).chunk(3, dim=-1)  # (B, nh, T, hd)
    else:
        q, k, v = qkv.chunk(3, dim=-1)
        if slip == "order":
            k, v = v, k
        q, k, v = (split_heads(x, self.heads) for x in (q, k, v))
    if slip == "no scale":
        out = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
    if slip == "reshape":
        out = out.reshape(out.shape[0], out.shape[2], -1)  # heads and tokens mixed
    else:
        out = merge_heads(out)  # (B, T, nh*hd)
    if slip == "no out":
        return out
    return self.to_out[1](self.to_out[0](out))


FUSED_SLIPS = {
    "the heads were split before the three were cut apart: to_qkv's output is "
    "q, k and v side by side, each nh*hd wide; cut it in three along the last "
    "dimension first, then split each into heads": "heads first",
    "k and v are swapped: to_qkv's weight is to_q's, to_k's and to_v's stacked "
    "in that order, so its output is q, k, v in that order": "order",
    "no 1/sqrt(hd) scale in the softmax: F.scaled_dot_product_attention "
    "scales for you": "no scale",
    "the heads were put side by side by a reshape alone: (B, nh, T, hd) must "
    "become (B, T, nh, hd) first (merge_heads does both)": "reshape",
    "the heads' outputs were not mixed: apply the output projection, "
    "self.to_out[0], then self.to_out[1] (dropout)": "no out",
}
FUSED_HINTS = [
    "the three projections are one product now: cut its output into queries, "
    "keys and values, and the rest is chapter 01's attention: heads, the fused "
    "kernel, heads side by side again, the output projection.",
    "self.to_qkv(hidden_states) is (B, T, 3 nh*hd): q, k, v side by side. Cut it "
    "along the last dimension, split each part into self.heads heads, attend, "
    "merge the heads, then self.to_out[0] and self.to_out[1].",
    "q, k, v = self.to_qkv(hidden_states).chunk(3, dim=-1); q, k, v = "
    "(split_heads(x, self.heads) for x in (q, k, v)); out = "
    "F.scaled_dot_product_attention(q, k, v); return "
    "self.to_out[1](self.to_out[0](merge_heads(out)))",
]


def check_fused_forward(fn: Callable) -> Verdict:
    """Exercise 10.5: `FusedSelfAttention.forward(self, hidden_states)`."""
    mistakes = {
        message: functools.partial(_slipped_forward, slip=slip)
        for message, slip in FUSED_SLIPS.items()
    }
    with torch.no_grad():
        return check(
            "Exercise 10.5",
            fn,
            _cases(),
            atol=1e-5,
            rtol=1e-5,
            hints=FUSED_HINTS,
            mistakes=mistakes,
            keep="fast:FusedSelfAttention.forward",
        )
