"""Chapter 01's exercise checks: right answers pass, usual mistakes fail, none raise."""

import pytest
import torch
from einops import rearrange

from sdlearn import attention as sd
from sdlearn.checks import Verdict
from sdlearn.checks import attention as checks


def unsolved(*args):
    raise NotImplementedError


# --- right answers, written the way a learner would ---------------------------


def attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return scores.softmax(dim=-1) @ v


def causal_attention(q, k, v):
    T = q.shape[-2]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def split_heads(x, num_heads):
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2)


def merge_heads(x):
    B, nh, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hd)


def test_right_answers_pass(capsys):
    assert checks.check_attention(attention)
    assert checks.check_attention(sd.scaled_dot_product_attention)
    assert checks.check_causal_attention(causal_attention)
    assert checks.check_causal_attention(
        lambda q, k, v: sd.scaled_dot_product_attention(q, k, v, causal=True)
    )
    assert checks.check_split_heads(split_heads)
    assert checks.check_split_heads(sd.split_heads)
    assert checks.check_split_heads(
        lambda x, nh: rearrange(x, "b t (nh hd) -> b nh t hd", nh=nh)
    )
    assert checks.check_merge_heads(merge_heads)
    assert checks.check_merge_heads(sd.merge_heads)
    assert capsys.readouterr().out.count("✅") == 9


# --- typical mistakes ------------------------------------------------------------


def no_scale(q, k, v):
    return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def scale_by_d(q, k, v):
    return (q @ k.transpose(-2, -1) / q.shape[-1]).softmax(dim=-1) @ v


def scale_by_value_width(q, k, v):
    return (q @ k.transpose(-2, -1) / v.shape[-1] ** 0.5).softmax(dim=-1) @ v


def softmax_over_queries(q, k, v):
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(dim=-2) @ v


def swapped_q_and_k(q, k, v):
    # (Tk, Tq) scores: the weights belong to the wrong axis
    return (k @ q.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(dim=-1) @ v


@pytest.mark.parametrize(
    "wrong", [no_scale, scale_by_d, scale_by_value_width, softmax_over_queries]
)
def test_wrong_attention_fails_with_the_reason(wrong, capsys):
    verdict = checks.check_attention(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "❌ Exercise 01.1" in out and "Hint:" in out
    assert "wrong values" in out or "expected shape" in out


def test_attention_with_swapped_q_and_k_names_the_shapes(capsys):
    assert not checks.check_attention(swapped_q_and_k)
    out = capsys.readouterr().out
    # (7, 5) @ (7, 16) cannot be multiplied: the error and its line are shown
    assert "raised RuntimeError" in out and "k @ q.transpose" in out


def masked_causal(mask_fn, when="before"):
    def fn(q, k, v):
        T = q.shape[-2]
        allowed = mask_fn(torch.ones(T, T, dtype=torch.bool))
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if when == "after":  # zeroing weights after the softmax: rows stop summing to 1
            return (scores.softmax(dim=-1) * allowed) @ v
        return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v

    return fn


@pytest.mark.parametrize(
    "wrong",
    [
        masked_causal(torch.triu),  # inverted: queries see the future
        masked_causal(lambda m: m.tril(diagonal=-1)),  # no token sees itself
        masked_causal(torch.tril, when="after"),
    ],
    ids=["triu", "strictly below the diagonal", "mask after softmax"],
)
def test_wrong_causal_attention_fails(wrong, capsys):
    assert not checks.check_causal_attention(wrong)
    out = capsys.readouterr().out
    assert "❌ Exercise 01.2" in out and "Hint:" in out


def test_causal_check_catches_a_missing_mask(capsys):
    assert not checks.check_causal_attention(attention)
    assert "wrong values" in capsys.readouterr().out


def test_wrong_heads_fail_with_the_reason(capsys):
    # viewing straight to (B, nh, T, hd): the right shape, tokens mixed up
    assert not checks.check_split_heads(
        lambda x, nh: x.view(x.shape[0], nh, x.shape[1], -1)
    )
    assert "wrong values" in capsys.readouterr().out

    # heads interleaved: head h takes features h, h+nh, h+2nh...
    assert not checks.check_split_heads(
        lambda x, nh: rearrange(x, "b t (hd nh) -> b nh t hd", nh=nh)
    )
    assert "wrong values" in capsys.readouterr().out

    # forgetting the transpose back
    assert not checks.check_merge_heads(lambda x: x.reshape(x.shape[0], x.shape[2], -1))
    assert "wrong values" in capsys.readouterr().out

    # .view after .transpose: not contiguous, so torch raises
    assert not checks.check_merge_heads(
        lambda x: x.transpose(1, 2).view(x.shape[0], x.shape[2], -1)
    )
    assert "raised RuntimeError" in capsys.readouterr().out


@pytest.mark.parametrize(
    "check",
    [
        checks.check_attention,
        checks.check_causal_attention,
        checks.check_split_heads,
        checks.check_merge_heads,
    ],
)
def test_unsolved_exercises_print_a_reminder(check, capsys):
    verdict = check(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "raise NotImplementedError" in out
    assert "Hint" not in out  # no hint before a first try
