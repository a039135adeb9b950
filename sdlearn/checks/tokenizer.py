"""Checks for chapter 03's tokenizer exercises: the byte characters, cleaning,
the BPE merge loop, tokenizing a text and the (B, 77) layout.

The references are sdlearn.tokenizer's own functions, which tests/test_tokenizer.py
holds to transformers' CLIP tokenizer on the real merges. The BPE cases use the
real merges on words whose merges repeat a pair, and small merge tables built so
that the usual slips (the highest rank first, the leftmost pair, one merge only,
only the first occurrence joined) give another word.
"""

from __future__ import annotations

import functools
import re
import types
import unicodedata
from collections.abc import Callable
from typing import Any

import torch

from sdlearn.checks import Case, Verdict, check
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.tokenizer import (
    DEFAULT_MERGES_PATH,
    END_OF_WORD,
    WHITESPACE_RUN,
    CLIPTokenizer,
    bpe,
    bytes_to_unicode,
    clean_text,
    load_merges,
    pre_tokenize,
)


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


# --- Exercise 03.3: the BPE merge loop ---------------------------------------------

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
    """Exercise 03.3: bpe(word, ranks) splits one word into BPE symbols, as the
    package's `bpe` (kept as "tokenizer:bpe")."""

    @functools.wraps(fn)
    def as_word(word: str, ranks: Ranks) -> Word:
        return Word(fn(word, ranks))

    return check(
        "Exercise 03.3",
        as_word,
        _bpe_cases(),
        hints=BPE_HINTS,
        mistakes=BPE_MISTAKES,
        keep="tokenizer:bpe",
    )


# --- Exercise 03.1: bytes as printable characters ---------------------------------


class ByteTable:
    """A byte -> character table, compared with its order (the order gives the
    first 256 token ids), shown in a few words when a check fails."""

    def __init__(self, table: object) -> None:
        self.table = table

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ByteTable)
            and isinstance(self.table, dict)
            and isinstance(other.table, dict)
            and list(self.table.items()) == list(other.table.items())
        )

    def __repr__(self) -> str:
        if not isinstance(self.table, dict):
            return repr(self.table)[:100]
        return f"with {len(self.table)} bytes"


def _compare_tables(actual: Any, case: Case) -> str | None:
    """What is wrong with a learner's byte table, in words; None if nothing."""
    table, expected = actual.table, case.expected.table
    if not isinstance(table, dict):
        return f"returned a {type(table).__name__}, expected a dict of 256 entries"
    if len(table) != 256 or set(table) != set(range(256)):
        return f"has {len(table)} entries; expected one for each byte 0..255"
    for b in range(256):
        if table[b] != expected[b]:
            return f"byte {b} maps to {table[b]!r}, expected {expected[b]!r}"
    if list(table) != list(expected):
        return (
            "has the right characters in the wrong order: the printable bytes come "
            "first, in increasing order, then the others"
        )
    return None


def _byte_table(ranges: list[tuple[str, str]], offset: str = "n", order: str = "ids"):
    """What a bytes_to_unicode with one mistake returns."""
    printable = [b for a, z in ranges for b in range(ord(a), ord(z) + 1)]
    table, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[b] = chr(256 + (n if offset == "n" else b))
            n += 1
    if order == "bytes":
        table = dict(sorted(table.items()))
    return ByteTable(table)


PRINTABLE = [("!", "~"), ("¡", "¬"), ("®", "ÿ")]

BYTES_MISTAKES = {
    "only ASCII's printable bytes ('!'..'~') keep their own character; the "
    "printable Latin-1 ranges '¡'..'¬' and '®'..'ÿ' keep theirs too": lambda: (
        _byte_table(PRINTABLE[:1])
    ),
    "each shifted byte went to 256 + its own value; the n-th byte that is not "
    "printable goes to 256 + n (n = 0, 1, 2...), so the space, byte 32, is 'Ġ' "
    "(256 + 32)": lambda: _byte_table(PRINTABLE, offset="byte"),
    "the table is in byte order; the printable bytes come first, then the "
    "others, since that order gives the first 256 token ids": lambda: _byte_table(
        PRINTABLE, order="bytes"
    ),
    "every byte maps to chr(byte): the space and the control codes must become "
    "visible characters past 255": lambda: ByteTable({b: chr(b) for b in range(256)}),
}

BYTES_HINTS = (
    "Two kinds of bytes: the printable ones keep their own character, the others "
    "are moved, in order, to the characters just past 255. The printable ones "
    "come first in the table.",
    "The printable bytes are three ranges: ord('!')..ord('~'), ord('¡')..ord('¬') "
    "and ord('®')..ord('ÿ'), ends included. Walk b over range(256); each b not "
    "among them gets chr(256 + n), with n counting the moved bytes from 0.",
    "printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), "
    "ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1)); table = {b: chr(b) for "
    "b in printable}; n = 0; for b in range(256): if b not in table: table[b] = "
    "chr(256 + n); n += 1; return table.",
)


def check_bytes_to_unicode(fn: Callable) -> Verdict:
    """Exercise 03.1: bytes_to_unicode() maps each byte to a printable
    character, as the package's (kept as "tokenizer:bytes_to_unicode")."""

    @functools.wraps(fn)
    def as_table() -> ByteTable:
        return ByteTable(fn())

    return check(
        "Exercise 03.1",
        as_table,
        [Case((), ByteTable(bytes_to_unicode()))],
        compare=_compare_tables,
        hints=BYTES_HINTS,
        mistakes=BYTES_MISTAKES,
        keep="tokenizer:bytes_to_unicode",
    )


# --- Exercise 03.2: cleaning the text ---------------------------------------------

CLEAN_TEXTS = [
    "A  photo of an ASTRONAUT,\nriding a horse!!",
    " Cafe\u0301 au lait\t ",  # "e" + a combining accent: NFC makes one "é"
    "ΟΔΥΣΣΕΥΣ\u3000and\u00a0ODYSSEUS",  # a word-final Σ; Unicode's own spaces
    "keep\x1cthis",  # U+001C is no whitespace for transformers
]


def _clean_variant(text: str, nfc=True, spaces="unicode", lower="each") -> str:
    """What a clean_text with one mistake returns."""
    if nfc:
        text = unicodedata.normalize("NFC", text)
    if spaces == "unicode":
        text = WHITESPACE_RUN.sub(" ", text)
    elif spaces == "python":
        text = re.sub(r"\s+", " ", text)
    else:  # split and join: the ends are stripped too
        text = " ".join(text.split())
    if lower == "each":
        return "".join(ch.lower() for ch in text)
    return text.lower() if lower == "str" else text


CLEAN_MISTAKES = {
    "the text is not lower-cased: CLIP's vocabulary has no upper case, so "
    "'Apple' and 'apple' must become the same": functools.partial(
        _clean_variant, lower="none"
    ),
    "no Unicode NFC: 'e' + a combining accent must become the one character "
    "'é', or the two spellings give different tokens": functools.partial(
        _clean_variant, nfc=False
    ),
    "Python's \\s also matches the separators U+001C..U+001F, which transformers "
    "keeps; use WHITESPACE_RUN, Unicode's White_Space": functools.partial(
        _clean_variant, spaces="python"
    ),
    "you split and joined the words: that also strips the spaces at both ends; "
    "replace each run of whitespace by one space, with WHITESPACE_RUN": (
        functools.partial(_clean_variant, spaces="split")
    ),
    "str.lower() turns a word-final 'Σ' into 'ς'; transformers lower-cases "
    "character by character, which gives 'σ'": functools.partial(
        _clean_variant, lower="str"
    ),
}

CLEAN_HINTS = (
    "Three steps, in order: compose accents into single characters, shrink every "
    "run of whitespace to one space, and lower-case each character on its own.",
    "unicodedata.normalize with the form 'NFC' composes the accents; the compiled "
    "pattern WHITESPACE_RUN finds the runs of whitespace (its sub method replaces "
    "them); ch.lower() lower-cases one character.",
    "text = unicodedata.normalize('NFC', text); text = WHITESPACE_RUN.sub(' ', "
    "text); return ''.join(ch.lower() for ch in text).",
)


def check_clean_text(fn: Callable) -> Verdict:
    """Exercise 03.2: clean_text(text), as the package's (kept as
    "tokenizer:clean_text")."""
    return check(
        "Exercise 03.2",
        fn,
        [Case((text,), clean_text(text)) for text in CLEAN_TEXTS],
        hints=CLEAN_HINTS,
        mistakes=CLEAN_MISTAKES,
        keep="tokenizer:clean_text",
    )


# --- Exercise 03.4: a text to tokens ----------------------------------------------

TOKENIZE_TEXTS = [
    "a small red circle on the left",
    "A  Photo, of 2 ASTRONAUTS!",
    "Ñandú in a café 🚀",
    "it's <|endoftext|>fine<|startoftext|>",
]


@functools.cache
def _tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


class Prompt:
    """A case's text, run on the package's tokenizer with an empty cache."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)


def _on_tokenizer(fn: Callable) -> Callable:
    """The learner's method, run on a tokenizer whose cache is empty."""

    @functools.wraps(fn)
    def run(prompt: Any) -> Any:
        tokenizer = _tokenizer()
        tokenizer.cache.clear()
        try:
            return types.MethodType(fn, tokenizer)(getattr(prompt, "text", prompt))
        finally:
            tokenizer.cache.clear()

    return run


def _tokenize_variant(prompt: Prompt, clean=True, as_bytes=True, specials=True):
    """What a tokenize with one mistake returns."""
    tokenizer = _tokenizer()
    parts = tokenizer._unsplit.split(prompt.text) if specials else [prompt.text]
    tokens = []
    for i, part in enumerate(parts):
        if i % 2 == 1:
            tokens.append(part)
            continue
        for word in pre_tokenize(clean_text(part) if clean else part):
            if as_bytes:
                word = "".join(tokenizer.byte_encoder[b] for b in word.encode())
            tokens.extend(bpe(word, tokenizer.ranks))
    return tokens


TOKENIZE_MISTAKES = {
    "the text was not cleaned: run clean_text on it first, so that it is in "
    "lower case (the vocabulary has no upper case) and its spaces are "
    "single": functools.partial(_tokenize_variant, clean=False),
    "BPE ran on the word's characters, not on its bytes: encode the word in "
    "UTF-8 and turn each byte into its character with self.byte_encoder "
    "('ñ' is two bytes, 'Ã±')": functools.partial(_tokenize_variant, as_bytes=False),
    "the special tokens were cut into pieces: split the text with "
    "self._unsplit first, and keep each special token whole": functools.partial(
        _tokenize_variant, specials=False
    ),
}

TOKENIZE_HINTS = (
    "The special tokens are cut out first and kept whole. Each other piece of "
    "text is cleaned and cut into words; each word becomes bytes, the bytes "
    "printable characters, and BPE splits those into tokens.",
    "self._unsplit.split(text) gives the pieces, the special tokens at odd "
    "indices. For each other piece: pre_tokenize(clean_text(piece)); for each "
    "word, word.encode('utf-8') gives its bytes, self.byte_encoder[b] each "
    "one's character, and self.merge_word(chars, self.ranks) the tokens; "
    "remember them in self.cache[word].",
    "tokens = []; for i, part in enumerate(self._unsplit.split(text)): if i % 2: "
    "tokens.append(part); continue; for word in pre_tokenize(clean_text(part)): "
    "if word not in self.cache: chars = ''.join(self.byte_encoder[b] for b in "
    "word.encode('utf-8')); self.cache[word] = self.merge_word(chars, "
    "self.ranks); tokens.extend(self.cache[word]); return tokens.",
)


def check_tokenize(fn: Callable) -> Verdict:
    """Exercise 03.4: `CLIPTokenizer.tokenize`, written as a function taking
    `self` (kept as "tokenizer:CLIPTokenizer.tokenize")."""
    tokenizer = _tokenizer()
    tokenizer.cache.clear()
    cases = [Case((Prompt(text),), tokenizer.tokenize(text)) for text in TOKENIZE_TEXTS]
    return check(
        "Exercise 03.4",
        _on_tokenizer(fn),
        cases,
        hints=TOKENIZE_HINTS,
        mistakes=TOKENIZE_MISTAKES,
        keep="tokenizer:CLIPTokenizer.tokenize",
    )


# --- Exercise 03.5: the (B, 77) layout --------------------------------------------

LONG_PROMPT = ", ".join(["a small red circle on the left"] * 12)  # 95 tokens
LAYOUT_BATCHES = [
    ["a red circle"],
    ["a photograph of an astronaut riding a horse", LONG_PROMPT, ""],
]


def _layout_variant(prompts: list[str], pad: str = "eos", cut: str = "body"):
    """What an encode_batch with one mistake returns."""
    tokenizer = _tokenizer()
    ids = torch.full((len(prompts), 77), 0 if pad == "zero" else 49407)  # (B, T)
    for row, prompt in enumerate(prompts):
        body = tokenizer.encode(prompt)
        if cut == "body":
            tokens = [49406, *body[:75], 49407]
        elif cut == "after":  # the end token cut away with the rest
            tokens = [49406, *body, 49407][:77]
        else:  # no start token
            tokens = [*body[:76], 49407]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


LAYOUT_MISTAKES = {
    "the padding is 0; SD 1.x pads with the end token, self.pad_token_id "
    "(49407)": functools.partial(_layout_variant, pad="zero"),
    "a long prompt lost its end token: cut the tokens to 75 before adding the "
    "start and end tokens, so that the end token always comes": functools.partial(
        _layout_variant, cut="after"
    ),
    "no start token: every row begins with self.bos_token_id "
    "(49406)": functools.partial(_layout_variant, cut="no start"),
}

LAYOUT_HINTS = (
    "Every row has 77 ids: the start token, the prompt's tokens (at most 75 of "
    "them), the end token, then padding. The padding of SD 1.x is the end token "
    "again.",
    "Start from a (B, 77) LongTensor full of self.pad_token_id. For each prompt, "
    "self.encode(prompt) gives its ids; keep the first 75, put "
    "self.bos_token_id before and self.eos_token_id after, and write the row's "
    "first len(...) entries.",
    "ids = torch.full((len(prompts), 77), self.pad_token_id, dtype=torch.long); "
    "for row, prompt in enumerate(prompts): tokens = [self.bos_token_id, "
    "*self.encode(prompt)[:75], self.eos_token_id]; ids[row, :len(tokens)] = "
    "torch.tensor(tokens); return ids.",
)


def check_encode_batch(fn: Callable) -> Verdict:
    """Exercise 03.5: `CLIPTokenizer.encode_batch`, written as a function taking
    `self` (kept as "tokenizer:CLIPTokenizer.encode_batch")."""
    tokenizer = _tokenizer()
    cases = [Case((batch,), tokenizer.encode_batch(batch)) for batch in LAYOUT_BATCHES]
    return check(
        "Exercise 03.5",
        _on_tokenizer(fn),
        cases,
        hints=LAYOUT_HINTS,
        mistakes=LAYOUT_MISTAKES,
        keep="tokenizer:CLIPTokenizer.encode_batch",
    )
