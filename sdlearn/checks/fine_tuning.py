"""Checks for chapter 09's exercises: the LoRA linear layer, merging an adapter
into its base weight, and textual inversion's embedding with a trainable new row.

The references are sdlearn's `LoRALinear` (which the test suite holds to
diffusers' LoRA through peft) and `NewTokenEmbedding`. The cases are chosen so
that the usual slips show: a scale other than 1 (a forgotten alpha / rank), a
rank below the widths and inputs with extra leading dimensions (B A the wrong
way round, a transposed weight), layers with and without a bias, and for the
embedding, ids of new and old tokens in one batch and a check that the gradient
reaches the new rows (a detached copy draws the right vectors but learns
nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sdlearn.checks import Case, Verdict, check, compare_values, randn
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.lora import LoRALinear
from sdlearn.textual_inversion import NewTokenEmbedding

# (in, out, rank, alpha, bias, input shape): scales 1, 2 and 0.25
_LAYERS = [
    (16, 24, 4, 4, True, (3, 16)),
    (32, 8, 2, 4, False, (2, 5, 32)),
    (20, 20, 8, 2, True, (2, 3, 7, 20)),
]


def _adapter(n_in: int, n_out: int, rank: int, alpha: float, bias: bool, seed: int):
    torch.manual_seed(seed)
    adapter = LoRALinear(nn.Linear(n_in, n_out, bias=bias), rank, alpha)
    # a trained adapter: B is zero only at the start
    nn.init.normal_(adapter.lora_B.weight, std=0.5)
    return adapter


def check_lora_linear(fn: Callable) -> Verdict:
    """Exercise 09.1: x W^T + b + scale * (x A^T) B^T."""
    cases = []
    for seed, (n_in, n_out, rank, alpha, bias, shape) in enumerate(_LAYERS):
        adapter = _adapter(n_in, n_out, rank, alpha, bias, seed)
        x = randn(*shape, seed=seed + 10)
        with torch.no_grad():
            expected = adapter(x)
        args = (
            x,
            adapter.base.weight.detach(),
            None if adapter.base.bias is None else adapter.base.bias.detach(),
            adapter.lora_A.weight.detach(),
            adapter.lora_B.weight.detach(),
            adapter.scale,
        )
        cases.append(Case(args, expected))
    return check(
        "Exercise 09.1",
        fn,
        cases,
        hint="the frozen layer's output, F.linear(x, weight, bias), plus the "
        "update through the thin matrices: x @ lora_A.T is (..., r), then "
        "@ lora_B.T is (..., out), times scale (alpha / rank). Mind the layers "
        "without a bias (bias is None).",
    )


def check_merge(fn: Callable) -> Verdict:
    """Exercise 09.2: W + scale * B A."""
    cases = []
    for seed, (n_in, n_out, rank, alpha, bias, _) in enumerate(_LAYERS):
        adapter = _adapter(n_in, n_out, rank, alpha, bias, seed)
        args = (
            adapter.base.weight.detach().clone(),
            adapter.lora_A.weight.detach(),
            adapter.lora_B.weight.detach(),
            adapter.scale,
        )
        adapter.merge()
        cases.append(Case(args, adapter.base.weight.detach().clone()))
    return check(
        "Exercise 09.2",
        fn,
        cases,
        hint="the update the adapter adds is scale * lora_B @ lora_A, an "
        "(out, r) @ (r, in) = (out, in) matrix, the weight's shape; return "
        "weight + that (a new tensor: the unmerged weight is kept to undo it).",
    )


def check_new_token_embedding(fn: Callable) -> Verdict:
    """Exercise 09.3: look ids up in frozen + new rows, the gradient to `new`."""
    cases = []
    for seed, (V, n_new, D, ids) in enumerate(
        [
            (10, 1, 4, [[1, 10, 3, 10]]),
            (30, 2, 8, [[0, 30, 31, 29], [31, 5, 5, 0]]),
            (6, 3, 5, [[8, 7, 6, 2, 8]]),
        ]
    ):
        table = nn.Embedding(V + n_new, D)
        nn.init.normal_(table.weight, generator=torch.Generator().manual_seed(seed))
        reference = NewTokenEmbedding(table, n_new)
        input_ids = torch.tensor(ids)
        output = reference(input_ids)
        (grad,) = torch.autograd.grad(output.sum(), reference.new)
        # the vectors, and the gradient the new rows should get from their sum
        args = (input_ids, reference.frozen, reference.new)
        cases.append(Case(args, (output.detach(), grad)))

    def compare(actual, case: Case) -> str | None:
        if isinstance(actual, torch.Tensor) and actual.requires_grad:
            values = actual.detach()
        else:
            values = actual
        expected, expected_grad = case.expected
        problem = compare_values(values, expected, 1e-6, 1e-6)
        if problem:
            return problem
        if not actual.requires_grad:
            return (
                "the right vectors, but no gradient reaches `new`: build the "
                "table from `new` itself, not a detached copy or `.data`"
            )
        new = case.args[2]
        (grad,) = torch.autograd.grad(actual.sum(), new, allow_unused=True)
        if grad is None or not torch.allclose(grad, expected_grad):
            return "the right vectors, but the gradient of `new` is not the reference's"
        return None

    return check(
        "Exercise 09.3",
        fn,
        cases,
        hint="one table of V + n rows, torch.cat([frozen, new]) (frozen first: "
        "new token ids start at V), then F.embedding(input_ids, table); "
        "only `new` requires a gradient, so only it learns.",
        compare=compare,
    )
