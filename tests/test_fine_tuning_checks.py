"""Chapter 09's exercise checks: right answers pass, typical slips fail, none raise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import fine_tuning as checks
from tests.helpers import assert_refused, assert_unsolved_never_raise

# --- right answers, written as a learner would ---


def lora_linear(x, weight, bias, lora_A, lora_B, scale):
    return F.linear(x, weight, bias) + scale * (x @ lora_A.T) @ lora_B.T


def lora_linear_by_hand(x, weight, bias, lora_A, lora_B, scale):
    # the merged weight, applied once: the same numbers to float rounding
    out = x @ (weight + scale * lora_B @ lora_A).T
    return out if bias is None else out + bias


def merge(weight, lora_A, lora_B, scale):
    return weight + scale * lora_B @ lora_A


def merge_einsum(weight, lora_A, lora_B, scale):
    return weight + scale * torch.einsum("or,ri->oi", lora_B, lora_A)


def new_token_embedding(input_ids, frozen, new):
    return F.embedding(input_ids, torch.cat([frozen, new]))


def new_token_embedding_where(input_ids, frozen, new):
    # old ids from the frozen table, new ones from `new`, chosen per position
    V = frozen.shape[0]
    old = frozen[input_ids.clamp(max=V - 1)]
    fresh = new[(input_ids - V).clamp(min=0)]
    return torch.where((input_ids >= V)[..., None], fresh, old)


def test_right_answers_pass(capsys):
    for fn in (lora_linear, lora_linear_by_hand):
        assert checks.check_lora_linear(fn)
    for fn in (merge, merge_einsum):
        assert checks.check_merge(fn)
    for fn in (new_token_embedding, new_token_embedding_where):
        assert checks.check_new_token_embedding(fn)
    assert capsys.readouterr().out.count("✅") == 6


# --- typical slips ---


def lora_without_scale(x, weight, bias, lora_A, lora_B, scale):
    return F.linear(x, weight, bias) + (x @ lora_A.T) @ lora_B.T


def lora_without_base(x, weight, bias, lora_A, lora_B, scale):
    return scale * (x @ lora_A.T) @ lora_B.T


def lora_ignores_bias(x, weight, bias, lora_A, lora_B, scale):
    return x @ weight.T + scale * (x @ lora_A.T) @ lora_B.T


def merge_without_scale(weight, lora_A, lora_B, scale):
    return weight + lora_B @ lora_A


def merge_the_wrong_way(weight, lora_A, lora_B, scale):
    return weight + scale * (lora_A.T @ lora_B.T).T.T


def merge_subtracts(weight, lora_A, lora_B, scale):
    return weight - scale * lora_B @ lora_A


def embedding_detached(input_ids, frozen, new):
    return F.embedding(input_ids, torch.cat([frozen, new.detach()]))


def embedding_new_first(input_ids, frozen, new):
    return F.embedding(input_ids, torch.cat([new, frozen]))


def embedding_data(input_ids, frozen, new):
    return F.embedding(input_ids, torch.cat([frozen, new.data]))


@pytest.mark.parametrize(
    ("check", "wrong"),
    [
        ("check_lora_linear", lora_without_scale),
        ("check_lora_linear", lora_without_base),
        ("check_lora_linear", lora_ignores_bias),
        ("check_merge", merge_without_scale),
        ("check_merge", merge_the_wrong_way),
        ("check_merge", merge_subtracts),
        ("check_new_token_embedding", embedding_detached),
        ("check_new_token_embedding", embedding_new_first),
        ("check_new_token_embedding", embedding_data),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_typical_slips_fail_with_a_hint(capsys, check, wrong):
    assert_refused(getattr(checks, check), wrong, capsys)


def test_unsolved_exercises_never_raise(capsys):
    assert_unsolved_never_raise(
        [
            checks.check_lora_linear,
            checks.check_merge,
            checks.check_new_token_embedding,
        ],
        capsys,
    )
