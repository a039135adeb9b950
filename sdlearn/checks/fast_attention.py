"""Checks for chapter 10's attention exercises: a fused layer and merged tokens.

- 10.5 `FusedSelfAttention.forward(self, hidden_states)`, a self-attention
  layer whose three projections are one product, runs on layers built from
  seeded `Attention` layers (with and without biases, with a head width that
  does not divide the tokens' width) and must give the package's output,
  which is the unfused layer's. Kept as "fast:FusedSelfAttention.forward".
- 10.6 `bipartite_merge(x, height, width, r)`, ToMe's choice of which tokens
  merge and into which, returns a `Merge`; the check applies it, merging and
  unmerging the tokens, and compares the result with the package's choice on
  grids of even and odd sizes. Kept as "merging:bipartite_merge".
- 10.7 `exp_by_powers_of_two(x)`, e^x as sdlearn's attention kernel computes
  it (a power of 2: the whole part exact, a cubic for the fraction), must give
  the package's numbers on inputs from -100 to 20. Kept as
  "kernels:exp_by_powers_of_two".

The chapter runs the answers: the UNet fused with the first, merging its
tokens with the second, and a softmax with the third.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sdlearn.attention import Attention, merge_heads, split_heads
from sdlearn.checks import (
    Case,
    Verdict,
    check,
    compare_values,
    harnessed,
    named_slips,
    randn,
    seeded,
)
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.fast import FusedSelfAttention
from sdlearn.kernels import EXP2_CUBIC, LOG2_E, exp_by_powers_of_two
from sdlearn.merging import Merge, bipartite_merge, grid_cells

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
        if slip == "order q k":
            q, k = k, q
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
    "q and k are swapped: to_qkv's weight is to_q's, to_k's and to_v's stacked "
    "in that order, so its output is q, k, v in that order": "order q k",
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
    mistakes = named_slips(_slipped_forward, FUSED_SLIPS)
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


# --- 10.6: which tokens merge --------------------------------------------------


def _merged_and_back(fn: Callable, x, height, width, r) -> torch.Tensor:
    """The tokens merged and unmerged by `fn`'s choice: each token replaced by
    the mean of the tokens it was merged with. Which tokens went together is
    all that shows, not the order the choice lists them in."""
    merge = fn(x, height, width, r)
    if not isinstance(merge, Merge):
        kind = type(merge).__name__
        raise TypeError(f"expected a Merge(dst, src, kept, merged, into), got {kind}")
    M, sources = len(merge.dst), len(merge.src)
    for name, bound, what in (
        ("into", M, "a position in dst, 0 to M - 1"),
        ("merged", sources, "a position in src, 0 to N - M - 1"),
        ("kept", sources, "a position in src, 0 to N - M - 1"),
    ):
        index = getattr(merge, name)
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < bound:
            raise ValueError(
                f"{name} holds {int(index.max())}, but each of its numbers is {what} "
                f"(here M = {M} destinations, N - M = {sources} sources), not a "
                "token's index in the grid"
            )
    merged = merge.merge(x)
    if merged.shape[1] != x.shape[1] - r:
        raise ValueError(
            f"the merge left {merged.shape[1]} of {x.shape[1]} tokens; merging r={r} "
            f"should leave {x.shape[1] - r}"
        )
    return merge.unmerge(merged)


def _slipped_merge(x, height, width, r, *, slip: str) -> Merge:
    """bipartite_merge with one known slip."""
    dst, src = grid_cells(height, width)
    if slip == "every other":
        order = (torch.arange(x.shape[1]) % 2).argsort(stable=True)
        dst, src = order[: len(dst)], order[len(dst) :]
    metric = x if slip == "dot" else x / x.norm(dim=-1, keepdim=True)
    similarity = metric[:, src] @ metric[:, dst].transpose(1, 2)  # (B, N - M, M)
    best, into = similarity.max(dim=-1)  # (B, N - M)
    order = best.argsort(dim=-1, descending=slip != "ascending")
    merged, kept = order[:, :r], order[:, r:]
    return Merge(dst, src, kept, merged, into.gather(1, merged))


MERGE_SLIPS = {
    "the similarity is a plain dot product: long tokens win whatever their "
    "direction; divide each token by its norm first (cosine similarity)": "dot",
    "the sources with the worst matches were merged: sort the best similarities "
    "in descending order, so that the first r are the most alike": "ascending",
    "the destinations are every other token of the flattened grid: take one per "
    "2x2 cell, as grid_cells(height, width) gives them": "every other",
}
MERGE_HINTS = [
    "each source looks for the destination most like it, by the angle between "
    "them; of all the sources, those with the best matches are the ones merged.",
    "normalize the tokens, take every source's similarity to every destination "
    "(one batched product, (B, N - M, M)); its max over the destinations gives "
    "each source's best score and which destination; sort the scores, best "
    "first, and merge the first r.",
    "dst, src = grid_cells(height, width); metric = x / x.norm(dim=-1, "
    "keepdim=True); best, into = (metric[:, src] @ metric[:, dst].transpose(1, "
    "2)).max(dim=-1); order = best.argsort(dim=-1, descending=True); merged, "
    "kept = order[:, :r], order[:, r:]; return Merge(dst, src, kept, merged, "
    "into.gather(1, merged))",
]
# (batch, height, width, channels, r): even and odd grids, few and all sources
GRIDS = [(2, 4, 6, 8, 6), (1, 3, 5, 4, 4), (3, 8, 8, 16, 32), (2, 6, 4, 8, 18)]


def _merge_cases() -> list[Case]:
    cases = []
    for i, (B, height, width, C, r) in enumerate(GRIDS):
        x = randn(B, height * width, C, seed=700 + i)
        x[:, ::3] *= 4  # some long tokens, which a plain dot product favours
        with torch.no_grad():
            expected = _merged_and_back(bipartite_merge, x, height, width, r)
        cases.append(Case((x, height, width, r), expected))
    return cases


def check_bipartite_merge(fn: Callable) -> Verdict:
    """Exercise 10.6: `bipartite_merge(x, height, width, r) -> Merge`."""
    mistakes = named_slips(_slipped_merge, MERGE_SLIPS, _merged_and_back)
    with torch.no_grad():
        return check(
            "Exercise 10.6",
            harnessed(_merged_and_back, fn),
            _merge_cases(),
            hints=MERGE_HINTS,
            mistakes=mistakes,
            keep="merging:bipartite_merge",
        )


# --- 10.7: the exponential as a power of 2 -------------------------------------


def _slipped_exp(x: torch.Tensor, *, slip: str) -> torch.Tensor:
    """exp_by_powers_of_two with one known slip."""
    if slip == "torch.exp":
        return x.exp()
    t = x if slip == "no log2e" else x / LOG2_E if slip == "ln 2" else x * LOG2_E
    whole = {"round": torch.round, "trunc": torch.trunc}.get(slip, torch.floor)
    n = whole(t)
    f = t - n
    c0, c1, c2, c3 = EXP2_CUBIC[::-1] if slip == "reversed" else EXP2_CUBIC
    poly = c0 + f * (c1 + f * (c2 + f * c3))
    return poly * n.exp() if slip == "e to the n" else torch.ldexp(poly, n)


EXP_SLIPS = {
    "this is 2^x, not e^x: multiply x by log2(e) = LOG2_E first, since e^x = "
    "2^(x log2 e)": "no log2e",
    "x was divided by log2(e), as if multiplied by ln 2 = 0.693: e^x = "
    "2^(x log2 e), so multiply x by LOG2_E = 1.4427": "ln 2",
    "the whole part was rounded to the nearest: the cubic fits 2^f for f in [0, "
    "1), so take n = floor(t), and f = t - n is never negative": "round",
    "the whole part was cut toward zero: for a negative t, trunc leaves f in "
    "(-1, 0], where the cubic does not fit; take n = floor(t), rounded down": "trunc",
    "this is torch.exp itself, closer to e^x than the cubic: the exercise builds "
    "e^x from powers of 2, and the check wants the cubic's numbers": "torch.exp",
    "the cubic's numbers are in reverse order: EXP2_CUBIC is (c0, c1, c2, c3), "
    "c0 + c1 f + c2 f^2 + c3 f^3": "reversed",
    "the whole part went into e^n: the power is of 2, so scale by 2^n, "
    "torch.ldexp(poly, n)": "e to the n",
}
EXP_HINTS = [
    "write e^x as a power of 2; split that power into its whole part and its "
    "fraction; a power of 2 with a whole exponent is exact in a float, and only "
    "the fraction's power needs the cubic.",
    "t = x * LOG2_E; n = torch.floor(t); f = t - n, in [0, 1); the cubic "
    "c0 + f (c1 + f (c2 + f c3)) with EXP2_CUBIC's numbers gives 2^f; "
    "torch.ldexp(value, n) multiplies it by 2^n.",
    "t = x * LOG2_E; n = torch.floor(t); f = t - n; c0, c1, c2, c3 = EXP2_CUBIC; "
    "return torch.ldexp(c0 + f * (c1 + f * (c2 + f * c3)), n)",
]


def _exp_cases() -> list[Case]:
    inputs = [
        torch.linspace(-100, 20, 241),  # whole and half numbers: n's edges
        randn(3, 64, seed=800) * 10,
        -randn(2, 5, 16, seed=801).abs() * 30,  # a softmax's x - max, never positive
    ]
    return [Case((x,), exp_by_powers_of_two(x)) for x in inputs]


# another order of the same multiplications rounds differently, and e^-100 is
# below float32's normal numbers
EXP_ATOL, EXP_RTOL = 1e-30, 1e-6


def _worst_relative(actual, case: Case) -> str | None:
    """Where the values differ, the worst relative error and its x: e^x spans
    80 orders of magnitude here, so the largest absolute error would point at
    large x whatever the mistake."""
    expected = case.expected
    problem = compare_values(actual, expected, EXP_ATOL, EXP_RTOL)
    if problem is None or not isinstance(actual, torch.Tensor):
        return problem
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return problem
    normal = expected.abs() > EXP_ATOL
    relative = ((actual - expected) / expected.where(normal, 1)).abs()
    relative = relative.nan_to_num(nan=1e30, posinf=1e30).where(normal, 0)
    worst = int(relative.flatten().argmax())
    x = case.args[0].flatten()[worst]
    return (
        f"wrong values: the largest relative error is {relative.flatten()[worst]:.3g}"
        f", at x = {x:.4g} (yours {actual.flatten()[worst]:.6g}, expected "
        f"{expected.flatten()[worst]:.6g})"
    )


def check_exp_by_powers_of_two(fn: Callable) -> Verdict:
    """Exercise 10.7: `exp_by_powers_of_two(x)`, e^x the kernel's way."""
    mistakes = named_slips(_slipped_exp, EXP_SLIPS)
    return check(
        "Exercise 10.7",
        fn,
        _exp_cases(),
        atol=EXP_ATOL,
        rtol=EXP_RTOL,
        compare=_worst_relative,
        hints=EXP_HINTS,
        mistakes=mistakes,
        keep="kernels:exp_by_powers_of_two",
    )
