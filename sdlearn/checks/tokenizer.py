"""Checks for chapter 03's first exercise: the BPE merge loop (03.1).

The reference is sdlearn.tokenizer's own `bpe`, which tests/test_tokenizer.py
holds to transformers' CLIP tokenizer on the real merges. The cases use the
real merges on words whose merges repeat a pair, and small merge tables built so
that the usual slips (the highest rank first, the leftmost pair, one merge only,
only the first occurrence joined) give another word.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from sdlearn.checks import Case, Verdict, check
from sdlearn.tokenizer import DEFAULT_MERGES_PATH, END_OF_WORD, bpe, load_merges


class Ranks(dict):
    """A merge-rank table with a one-line repr, so a failure message stays short."""

    def __repr__(self) -> str:
        return f"with {len(self)} merges"


class Word:
    """A word's symbols, compared as a whole and by type, so that a list is not
    taken for a tuple and a failure message shows the expected word."""

    def __init__(self, symbols: object) -> None:
        self.symbols = symbols

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Word) and (
            type(self.symbols) is type(other.symbols) and self.symbols == other.symbols
        )

    def __repr__(self) -> str:
        return repr(self.symbols)


# --- Exercise 03.1: the BPE merge loop ---------------------------------------------

# (word, merges in rank order): each case catches a usual mistake
BPE_CASES = [
    # the lowest-ranked pair first, then a pair made of a merged symbol
    ("lower", [("l", "o"), ("e", "r</w>"), ("lo", "w")]),
    # lowest, leftmost and highest rank all lead to different words
    ("abcd", [("b", "c"), ("a", "b"), ("c", "d</w>"), ("ab", "c")]),
    # the lowest-ranked pair is not the leftmost one
    ("newer", [("e", "r</w>"), ("e", "w"), ("n", "e")]),
    # the pair occurs twice: one step joins both, before ("ab", "a") can form
    ("ababc", [("ab", "a"), ("a", "b")]),
    # a run of "a": left to right, pairs never overlap: h aa a a</w>
    ("haaaa", [("a", "a"), ("aa", "a"), ("h", "aa")]),
    # ("e", "r") is not ("e", "r</w>"): the end-of-word marker makes them differ
    ("ewrer", [("e", "r"), ("w", "r"), ("e", "w")]),
    # no adjacent pair is a learned merge: the characters come back
    ("xq", [("q", "x"), ("x", "y")]),
    # one character: nothing to merge, but the marker is there
    ("a", [("a", "b")]),
]
# real words with CLIP's own 48,894 merges
BPE_WORDS = ["photograph", "astronaut", "supercalifragilistic", "encircle"]


def _bpe_cases() -> list[Case]:
    cases = []
    for word, merges in BPE_CASES:
        ranks = Ranks({pair: rank for rank, pair in enumerate(merges)})
        cases.append(Case((word, ranks), Word(bpe(word, ranks))))
    merges = load_merges(DEFAULT_MERGES_PATH)
    ranks = Ranks({pair: rank for rank, pair in enumerate(merges)})
    for word in BPE_WORDS:
        cases.append(Case((word, ranks), Word(bpe(word, ranks))))
    return cases


def _join(symbols: tuple[str, ...], pair: tuple[str, str], every: bool = True):
    """`symbols` with `pair` joined left to right (or its first occurrence only)."""
    merged, i, joined = [], 0, False
    while i < len(symbols):
        if (
            i + 1 < len(symbols)
            and (symbols[i], symbols[i + 1]) == pair
            and (every or not joined)
        ):
            merged.append(pair[0] + pair[1])
            i, joined = i + 2, True
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _join_from_the_right(symbols: tuple[str, ...], pair: tuple[str, str]):
    merged, i = [], len(symbols) - 1
    while i >= 0:
        if i > 0 and (symbols[i - 1], symbols[i]) == pair:
            merged.insert(0, pair[0] + pair[1])
            i -= 2
        else:
            merged.insert(0, symbols[i])
            i -= 1
    return tuple(merged)


def _bpe_variant(
    word: str,
    ranks: dict,
    marker: bool = True,
    choose: str = "lowest",
    join: Callable = _join,
    steps: int | None = None,
    as_list: bool = False,
) -> Word:
    """What a BPE loop with one mistake returns."""
    symbols = (*word[:-1], word[-1] + END_OF_WORD) if marker else tuple(word)
    done = 0
    while steps is None or done < steps:
        pairs = [p for p in zip(symbols[:-1], symbols[1:], strict=True) if p in ranks]
        if not pairs:
            break
        if choose == "lowest":
            pair = min(pairs, key=ranks.get)
        elif choose == "highest":
            pair = max(pairs, key=ranks.get)
        else:  # the leftmost learned pair
            pair = pairs[0]
        symbols = join(symbols, pair)
        done += 1
    return Word(list(symbols) if as_list else symbols)


BPE_MISTAKES = {
    "the last character has no end-of-word marker: the word starts as "
    "(*word[:-1], word[-1] + '</w>'), so that a word's last piece is a token of "
    "its own": functools.partial(_bpe_variant, marker=False),
    "you merged the pair with the highest rank first; the lowest rank is the "
    "merge training learned first, and it goes first": functools.partial(
        _bpe_variant, choose="highest"
    ),
    "you merged the leftmost learned pair; take the pair with the lowest rank, "
    "wherever it is in the word": functools.partial(_bpe_variant, choose="leftmost"),
    "only one merge was made: repeat the merge step until no adjacent pair is a "
    "learned merge": functools.partial(_bpe_variant, steps=1),
    "each step joined only the first occurrence of the pair; join it everywhere "
    "it occurs, left to right": functools.partial(
        _bpe_variant, join=functools.partial(_join, every=False)
    ),
    "you joined the pairs from the right; scan left to right, so that 'a a a' "
    "becomes 'aa a'": functools.partial(_bpe_variant, join=_join_from_the_right),
    "you returned a list; return a tuple of symbols (the tokenizer caches the "
    "words, and a list never equals a tuple)": functools.partial(
        _bpe_variant, as_list=True
    ),
}

BPE_HINTS = (
    "Start from the word's characters, with '</w>' on the last one. Then repeat "
    "one merge step until none applies: a step finds the adjacent pairs that are "
    "learned merges, takes the one training learned first (the lowest rank), and "
    "joins it wherever it occurs.",
    "The adjacent pairs are zip(symbols[:-1], symbols[1:]); keep those in ranks. "
    "When none is left, return the symbols as a tuple. Else min(pairs, "
    "key=ranks.get) is the pair to join; walk the symbols left to right with an "
    "index, jumping over both symbols of a pair you join.",
    "symbols = (*word[:-1], word[-1] + '</w>'); while True: pairs = [...]; if not "
    "pairs: return symbols; first, second = min(pairs, key=ranks.get); merged, i "
    "= [], 0; while i < len(symbols): if i + 1 < len(symbols) and (symbols[i], "
    "symbols[i + 1]) == (first, second): merged.append(first + second); i += 2; "
    "else: merged.append(symbols[i]); i += 1; then symbols = tuple(merged).",
)


def check_bpe(fn: Callable) -> Verdict:
    """Exercise 03.1: bpe(word, ranks) splits one word into BPE symbols, as the
    package's `bpe` (kept as "tokenizer:bpe")."""

    @functools.wraps(fn)
    def as_word(word: str, ranks: Ranks) -> Word:
        return Word(fn(word, ranks))

    return check(
        "Exercise 03.1",
        as_word,
        _bpe_cases(),
        hints=BPE_HINTS,
        mistakes=BPE_MISTAKES,
        keep="tokenizer:bpe",
    )
