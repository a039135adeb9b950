"""Chapter 03's exercise checks: right answers pass, usual mistakes fail, none raise."""

import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import Verdict
from sdlearn.checks import clip as checks
from sdlearn.clip import clip_loss
from sdlearn.tokenizer import bpe_merge_step


def unsolved(*args):
    raise NotImplementedError


# --- right answers, written the way a learner would ---------------------------


def known_pairs(word, ranks):
    """The adjacent pairs of a word that are learned merges."""
    return [pair for pair in zip(word[:-1], word[1:], strict=True) if pair in ranks]


def merge_step(word, ranks):
    pairs = known_pairs(word, ranks)
    if not pairs:
        return word
    first, second = min(pairs, key=ranks.get)
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == (first, second):
            merged.append(first + second)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def encoder_mask(attention_mask):
    B, T = attention_mask.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = allowed & attention_mask.bool()[:, None, None, :]
    return torch.zeros(B, 1, T, T).masked_fill(~allowed, float("-inf"))


def encoder_mask_additive(attention_mask):
    # the way transformers builds it: a causal part plus a padding part
    T = attention_mask.shape[1]
    causal = torch.full((T, T), float("-inf")).triu(diagonal=1)  # (T, T)
    padding = torch.zeros(attention_mask.shape).masked_fill(
        attention_mask == 0, float("-inf")
    )  # (B, T)
    return causal + padding[:, None, None, :]


def info_nce(logits_per_image):
    targets = torch.arange(logits_per_image.shape[0])
    image_loss = F.cross_entropy(logits_per_image, targets)
    text_loss = F.cross_entropy(logits_per_image.T, targets)
    return (image_loss + text_loss) / 2


def info_nce_by_hand(logits):
    # the diagonal's log-probabilities along the rows and along the columns
    rows = logits.log_softmax(dim=1).diagonal()
    columns = logits.log_softmax(dim=0).diagonal()
    return -(rows.mean() + columns.mean()) / 2


def test_right_answers_pass(capsys):
    assert checks.check_merge_step(merge_step)
    assert checks.check_merge_step(bpe_merge_step)
    assert checks.check_encoder_mask(encoder_mask)
    assert checks.check_encoder_mask(encoder_mask_additive)
    assert checks.check_info_nce(info_nce)
    assert checks.check_info_nce(info_nce_by_hand)
    assert checks.check_info_nce(clip_loss)
    assert capsys.readouterr().out.count("✅") == 7


# --- typical mistakes ------------------------------------------------------------


def merge_first_occurrence_only(word, ranks):
    pairs = known_pairs(word, ranks)
    if not pairs:
        return word
    best = min(pairs, key=ranks.get)
    for i in range(len(word) - 1):
        if (word[i], word[i + 1]) == best:
            return (*word[:i], word[i] + word[i + 1], *word[i + 2 :])
    return word


def merge_highest_rank(word, ranks):
    pairs = known_pairs(word, ranks)
    if not pairs:
        return word
    return _join(word, max(pairs, key=ranks.get))


def merge_leftmost_known_pair(word, ranks):
    pairs = known_pairs(word, ranks)
    return _join(word, pairs[0]) if pairs else word


def merge_by_string_replace(word, ranks):
    # symbol boundaries are lost: "ab c" contains "b c"
    pairs = known_pairs(word, ranks)
    if not pairs:
        return word
    first, second = min(pairs, key=ranks.get)
    text = " ".join(word).replace(f"{first} {second}", first + second)
    return tuple(text.split(" "))


def merge_from_the_right(word, ranks):
    # five "a": ("a", "aa", "aa") instead of ("aa", "aa", "a")
    pairs = known_pairs(word, ranks)
    if not pairs:
        return word
    first, second = min(pairs, key=ranks.get)
    merged, i = [], len(word) - 1
    while i >= 0:
        if i > 0 and (word[i - 1], word[i]) == (first, second):
            merged.insert(0, first + second)
            i -= 2
        else:
            merged.insert(0, word[i])
            i -= 1
    return tuple(merged)


def merge_without_a_no_merge_case(word, ranks):
    pairs = known_pairs(word, ranks)
    return _join(word, min(pairs, key=ranks.get))  # min() of nothing raises


def _join(word, pair):
    # joins a pair wherever it occurs, left to right
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


@pytest.mark.parametrize(
    "wrong",
    [
        merge_first_occurrence_only,
        merge_highest_rank,
        merge_leftmost_known_pair,
        merge_by_string_replace,
        merge_from_the_right,
    ],
)
def test_wrong_merge_steps_fail(wrong, capsys):
    verdict = checks.check_merge_step(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "❌ Exercise 03.1" in out and "Hint:" in out
    assert "expected" in out


def test_merge_step_without_a_no_merge_case_shows_the_error(capsys):
    assert not checks.check_merge_step(merge_without_a_no_merge_case)
    out = capsys.readouterr().out
    assert "raised ValueError" in out and "min(pairs" in out


def test_merge_step_returning_a_list_fails_with_the_reason(capsys):
    assert not checks.check_merge_step(lambda w, r: list(bpe_merge_step(w, r)))
    out = capsys.readouterr().out
    assert "returned a list" in out and "tuple" in out and "Hint:" in out


def test_merge_step_failure_message_stays_short(capsys):
    # the 48894 real merges are described by their count, not printed
    assert not checks.check_merge_step(lambda w, r: w)
    out = capsys.readouterr().out
    assert "Ranks with" in out and len(out) < 2000


def mask_from(allowed_fn, padding_axis="keys", value=float("-inf"), as_bool=False):
    def fn(attention_mask):
        B, T = attention_mask.shape
        allowed = allowed_fn(torch.ones(T, T, dtype=torch.bool))
        keep = attention_mask.bool()
        if padding_axis == "keys":
            allowed = allowed & keep[:, None, None, :]
        elif padding_axis == "queries":
            allowed = allowed & keep[:, None, :, None]
        else:
            allowed = allowed.expand(B, 1, T, T)
        if as_bool:
            return allowed
        return torch.zeros(B, 1, T, T).masked_fill(~allowed, value)

    return fn


@pytest.mark.parametrize(
    "wrong",
    [
        mask_from(lambda m: m.tril(diagonal=-1)),  # a token cannot see itself
        mask_from(lambda m: m.tril(diagonal=1)),  # sees one token ahead
        mask_from(torch.triu),  # inverted: sees the future
        mask_from(torch.tril, padding_axis="queries"),
        mask_from(torch.tril, padding_axis=None),  # padding ignored
        mask_from(torch.tril, value=torch.finfo(torch.float32).min),
        mask_from(torch.tril, as_bool=True),
        lambda m: mask_from(torch.tril)(m)[:, 0],  # (B, T, T)
    ],
    ids=[
        "diagonal blocked",
        "off by one",
        "triu",
        "padding on queries",
        "no padding",
        "finite minimum",
        "bool",
        "no head axis",
    ],
)
def test_wrong_encoder_masks_fail(wrong, capsys):
    verdict = checks.check_encoder_mask(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "❌ Exercise 03.2" in out and "Hint:" in out


def test_wrong_encoder_mask_names_the_first_wrong_entry(capsys):
    assert not checks.check_encoder_mask(mask_from(lambda m: m.tril(diagonal=-1)))
    out = capsys.readouterr().out
    assert "(prompt 0, query 0, key 0) is -inf (blocked), expected 0 (attend)" in out
    assert "attention_mask is [1, 1, 1, 0, 0, 0]" in out

    assert not checks.check_encoder_mask(lambda m: mask_from(torch.tril)(m)[:, 0])
    assert "returned shape (2, 6, 6), expected shape (2, 1, 6, 6)" in (
        capsys.readouterr().out
    )


def test_wrong_merge_step_shows_both_words(capsys):
    assert not checks.check_merge_step(merge_first_occurrence_only)
    out = capsys.readouterr().out
    assert "returned Word ('b', 'an', 'a', 'n', 'a</w>')" in out
    assert "expected Word ('b', 'an', 'an', 'a</w>')" in out


@pytest.mark.parametrize(
    "wrong",
    [
        lambda logits: F.cross_entropy(logits, torch.arange(len(logits))),
        lambda logits: F.cross_entropy(logits.T, torch.arange(len(logits))),
        lambda logits: 2 * info_nce(logits),  # the sum of the two sides
        lambda logits: info_nce(logits) * len(logits),  # reduction="sum"
        lambda logits: info_nce(logits / 2),  # divided by a temperature again
        lambda logits: F.cross_entropy(logits, torch.zeros(len(logits)).long()),
    ],
    ids=["image side", "text side", "sum", "summed rows", "rescaled", "zeros"],
)
def test_wrong_info_nce_fails(wrong, capsys):
    verdict = checks.check_info_nce(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "❌ Exercise 03.3" in out and "wrong values" in out and "Hint:" in out


def test_info_nce_as_a_float_fails_with_the_reason(capsys):
    # a Python number cannot be backpropagated: the loss must stay a tensor
    assert not checks.check_info_nce(lambda logits: info_nce(logits).item())
    assert "expected a tensor of shape ()" in capsys.readouterr().out


@pytest.mark.parametrize(
    "check",
    [checks.check_merge_step, checks.check_encoder_mask, checks.check_info_nce],
)
def test_unsolved_exercises_print_a_reminder(check, capsys):
    verdict = check(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "raise NotImplementedError" in out
    assert "Hint" not in out  # no hint before a first try
