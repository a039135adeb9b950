"""Checks for chapter 03's exercises: one BPE merge step, the text encoder's
attention mask, CLIP's contrastive loss.

The references are sdlearn's `bpe_merge_step` and `clip_loss`, which the test
suite holds to transformers' tokenizer and to the InfoNCE formula, and, for the
mask, torch's boolean `tril` combined with the padding by hand.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from sdlearn.checks import Case, Verdict, check, randn, tensor_form_problem
from sdlearn.clip import clip_loss
from sdlearn.tokenizer import DEFAULT_MERGES_PATH, bpe_merge_step, load_merges


class Ranks(dict):
    """A merge-rank table with a one-line repr, so a failure message stays short."""

    def __repr__(self) -> str:
        return f"with {len(self)} merges"


class Word:
    """A word's symbols, compared as a whole, so that a failure message shows the
    expected word rather than "expected 4 values"."""

    def __init__(self, symbols: object) -> None:
        self.symbols = symbols

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Word) and (
            type(self.symbols) is type(other.symbols) and self.symbols == other.symbols
        )

    def __repr__(self) -> str:
        return repr(self.symbols)


def _word(text: str) -> tuple[str, ...]:
    """'lower' -> ('l', 'o', 'w', 'e', 'r</w>'), as `bpe` starts a word."""
    return (*text[:-1], text[-1] + "</w>")


# (word, merges in rank order): each case catches a usual mistake
MERGE_CASES = [
    # the lowest-ranked pair is the leftmost one
    (_word("lower"), [("l", "o"), ("e", "r</w>"), ("lo", "w")]),
    # the lowest-ranked pair is not the leftmost, and a higher-ranked one is there
    (_word("newer"), [("e", "r</w>"), ("e", "w"), ("n", "e")]),
    # the pair occurs twice: both are merged in one step
    (("b", "a", "n", "a", "n", "a</w>"), [("a", "n"), ("b", "a"), ("n", "a</w>")]),
    # a run of five "a": left to right, pairs do not overlap and the last is alone
    (_word("haaaaah"), [("a", "a"), ("h", "a")]),
    # ("e", "r") is not ("e", "r</w>"): the end-of-word marker makes them differ
    (("e", "w", "r", "e", "r</w>"), [("e", "r"), ("w", "r")]),
    # only whole symbols pair up: "ab" "c" holds the letters b c, not the pair
    (("x", "ab", "c", "b", "c"), [("b", "c"), ("x", "ab")]),
    # no adjacent pair is a learned merge: the word comes back unchanged
    (("x", "q</w>"), [("q", "x"), ("x", "y")]),
    # a single symbol has no pairs at all
    (("cat</w>",), [("c", "a")]),
]


def _merge_cases() -> list[Case]:
    cases = []
    for word, merges in MERGE_CASES:
        ranks = Ranks({pair: rank for rank, pair in enumerate(merges)})
        cases.append(Case((word, ranks), Word(bpe_merge_step(word, ranks))))
    # CLIP's own merges on a real word, a few steps into its BPE
    merges = load_merges(DEFAULT_MERGES_PATH)
    ranks = Ranks({pair: rank for rank, pair in enumerate(merges)})
    word = _word("photograph")
    for _ in range(3):
        cases.append(Case((word, ranks), Word(bpe_merge_step(word, ranks))))
        word = bpe_merge_step(word, ranks)
    return cases


def check_merge_step(fn: Callable) -> Verdict:
    """Exercise 03.1: merge_step(word, ranks) joins the lowest-ranked adjacent pair."""
    hint = (
        "among the adjacent pairs zip(word[:-1], word[1:]) that are keys of ranks, "
        "take the one with the lowest rank (min with key=ranks.get); then walk "
        "the word left to right with an index i, appending word[i] + word[i + 1] "
        "and jumping by 2 where that pair starts, else word[i] and moving by 1. "
        "Return a tuple, and the word itself when no pair is in ranks."
    )
    cases = _merge_cases()
    name = f"Exercise 03.1 ({getattr(fn, '__name__', 'your function')})"
    try:
        first = fn(*cases[0].args)
    except Exception:  # check() below reports it, with the line
        first = None
    if isinstance(first, list):
        print(
            f"❌ {name} returned a list; return a tuple of symbols. `bpe` stops "
            "when a step gives back the word it was given, and a list never "
            "equals a tuple."
        )
        print(f"   Hint: {hint}")
        return Verdict(False)

    @functools.wraps(fn)
    def as_word(word: tuple[str, ...], ranks: Ranks) -> Word:
        return Word(fn(word, ranks))

    return check("Exercise 03.1", as_word, cases, hint=hint)


# (lengths of the prompts, T): right padding as the tokenizer makes it; a row
# without padding; T = 1
MASK_CASES = [([3, 5], 6), ([4, 2, 7], 7), ([1], 4), ([1, 1], 1)]

MASK_HINT = (
    "allowed = torch.ones(T, T, dtype=torch.bool).tril() lets query i (a row) see "
    "keys j <= i, the diagonal included; combine it with the padding, which hides "
    "keys (the last axis): attention_mask.bool()[:, None, None, :]. Then "
    "torch.zeros(B, 1, T, T).masked_fill(~allowed, float('-inf')): exactly -inf, "
    "not a large negative number."
)


def _expected_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    T = attention_mask.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): key j <= query i
    allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    mask = torch.zeros(allowed.shape)
    return mask.masked_fill(~allowed, float("-inf"))


def _mask_value(value: float) -> str:
    if value == 0:
        return "0 (attend)"
    if value == float("-inf"):
        return "-inf (blocked)"
    return f"{value:g}"


def _mask_problem(
    actual: object, expected: torch.Tensor, attention_mask: torch.Tensor
) -> str | None:
    """What is wrong with a returned mask, naming the first wrong (query, key)
    rather than an inf - inf error."""
    problem = tensor_form_problem(
        actual, expected, ", (B, 1, T, T) with an axis for the heads"
    )
    if problem:
        return problem
    if torch.equal(actual, expected):
        return None
    wrong = (actual != expected) | actual.isnan()
    b, _, i, j = wrong.nonzero()[0].tolist()
    return (
        f"entry [{b}, 0, {i}, {j}] (prompt {b}, query {i}, key {j}) is "
        f"{_mask_value(actual[b, 0, i, j].item())}, expected "
        f"{_mask_value(expected[b, 0, i, j].item())}; that prompt's "
        f"attention_mask is {attention_mask[b].tolist()}"
    )


def check_encoder_mask(fn: Callable) -> Verdict:
    """Exercise 03.2: (B, T) padding mask -> (B, 1, T, T) additive causal mask.

    A wrong mask is described by its first wrong entry rather than a max error.
    """
    cases = []
    for lengths, T in MASK_CASES:
        attention_mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
        # the expected mask, and the untouched input for the message
        expected = (_expected_mask(attention_mask), attention_mask)
        cases.append(Case((attention_mask.clone(),), expected))

    def compare(actual: object, case: Case) -> str | None:
        expected, attention_mask = case.expected
        return _mask_problem(actual, expected, attention_mask)

    return check("Exercise 03.2", fn, cases, hint=MASK_HINT, compare=compare)


# (B, seed): B = 1 has loss 0; the zero logits give log(B) from both sides
INFO_NCE_SIZES = [(4, 0), (8, 1), (5, 2), (1, 3)]


def check_info_nce(fn: Callable) -> Verdict:
    """Exercise 03.3: the symmetric InfoNCE loss of a (B, B) logits matrix."""
    cases = [Case((torch.zeros(3, 3),), clip_loss(torch.zeros(3, 3)))]
    for B, seed in INFO_NCE_SIZES:
        # not symmetric, and a diagonal that stands out, as after some training
        logits = 5 * randn(B, B, seed=seed) + 4 * torch.eye(B)
        cases.append(Case((logits,), clip_loss(logits)))
    return check(
        "Exercise 03.3",
        fn,
        cases,
        hint="the right caption of image i is caption i, so the targets are "
        "torch.arange(B). Take F.cross_entropy(logits_per_image, targets) for the "
        "images picking captions (rows), the same on logits_per_image.T for the "
        "captions picking images (columns), and return the mean of the two.",
    )
