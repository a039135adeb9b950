r"""The CLIP tokenizer: byte-level BPE, from the raw merges file to (B, 77) ids.

Stable Diffusion 1.x reads a prompt through CLIP's text encoder, and the encoder
reads token ids. This module turns text into those ids exactly as transformers'
`CLIPTokenizer` does (transformers 5.x, which wraps the Rust `tokenizers`
library; it is the tokenizer diffusers' StableDiffusionPipeline calls):

1. `<|startoftext|>` and `<|endoftext|>` typed in the raw text become their ids.
2. `clean_text`: Unicode NFC, every run of whitespace -> one space, lower case.
3. `pre_tokenize`: OpenAI's regex cuts the text into words, dropping spaces.
4. Each word's UTF-8 bytes become printable characters (`bytes_to_unicode`),
   and its last character gets the end-of-word marker `</w>`.
5. `bpe`: merge adjacent symbols, lowest rank first (`bpe_merge_step`), until no
   learned merge applies.
6. Look the symbols up in the vocabulary.

Where transformers differs from OpenAI's original CLIP code we follow
transformers: no `ftfy.fix_text` and no `html.unescape` (so "&amp;" stays five
characters), accents are kept, "<|ENDOFTEXT|>" in upper case is ordinary text.

Unicode caveats. The standard library's `re` has no `\p{L}` / `\p{N}`, so we
build those classes from `unicodedata`. Python 3.11 ships Unicode 14.0 and
tokenizers (Oniguruma regex, Rust case mapping) a newer version, so characters
assigned after 14.0 may be split or lower-cased differently; all others agree
(checked on the test corpus and on 20000 random strings). "Whitespace" is
Unicode's White_Space property, as in tokenizers, not Python's `str.isspace()`,
which also counts the separators U+001C..U+001F.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import re
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_MERGES_PATH = (
    Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's vocabulary has 49408 entries: 256 byte characters, the same 256 with
# </w>, 48894 merges and the two special tokens. The merges file holds many more
# merges; CLIP was trained with the first 48894 only.
NUM_MERGES = 49152 - 256 - 2

# Unicode's White_Space characters, what `\s` matches in the regex engine of
# tokenizers. Python's `\s` also matches U+001C..U+001F, which transformers
# keeps as symbols. A character class body: "\u2000-\u200a" is a range.
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"  # ASCII, next line, no-break, ogham
    "\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # typographic spaces, separators
)
WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")
_SPECIAL_TOKEN = re.compile(f"({re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)})")


def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable unicode character.

    BPE works on strings, and the merges file is a text file, so every byte needs
    a visible character that is not whitespace or a control code. Printable
    latin-1 bytes map to themselves ("a" -> "a", "é"'s byte 0xE9 -> "é"); the 68
    others (space, control codes, ...) are shifted to 256 + n ("Ġ" for space).

    Returns:
        dict from byte value (0..255) to a one-character string, in the order
        that gives the first 256 token ids.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + n)
            n += 1
    return dict(zip(byte_values, map(chr, code_points), strict=True))


def get_pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    """The set of adjacent symbol pairs in a word.

    Args:
        word: the word as a sequence of symbols, e.g. ("l", "o", "w</w>").

    Returns:
        set of (left, right) pairs, e.g. {("l", "o"), ("o", "w</w>")}.
    """
    return set(zip(word[:-1], word[1:], strict=True))


def bpe_merge_step(
    word: tuple[str, ...], ranks: dict[tuple[str, str], int]
) -> tuple[str, ...]:
    """Apply one BPE merge: join the lowest-ranked adjacent pair of the word.

    The pair is joined wherever it occurs, left to right without overlap
    ("a a a" with merge ("a", "a") gives ("aa", "a")).

    Args:
        word: the word as a tuple of symbols.
        ranks: rank of each learned merge, 0 for the first (most frequent) one.

    Returns:
        the word with that one merge applied, or `word` itself if no adjacent
        pair is a learned merge.
    """
    pairs = [pair for pair in get_pairs(word) if pair in ranks]
    if not pairs:
        return word
    first, second = min(pairs, key=ranks.__getitem__)
    merged = []
    i = 0
    while i < len(word):
        if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Split one pre-tokenised word into BPE symbols.

    Args:
        word: the word in byte characters (see `bytes_to_unicode`), e.g. "lower".
        ranks: rank of each learned merge.

    Returns:
        the symbols, the last one ending in "</w>", e.g. ("lower</w>",).
    """
    # </w> tells the model where a word ends: "low" inside "lower" and the word
    # "low" get different tokens.
    symbols = (*word[:-1], word[-1] + END_OF_WORD)
    while True:
        merged = bpe_merge_step(symbols, ranks)
        if merged == symbols:
            return symbols
        symbols = merged


def load_merges(
    path: str | Path, num_merges: int = NUM_MERGES
) -> list[tuple[str, str]]:
    """Read BPE merges from OpenAI's gzipped file or a transformers merges.txt.

    Both have one header line ("#version: 0.2") and then one merge per line,
    most frequent first: "i n" means "join i and n".

    Args:
        path: a `.gz` file or a plain text file.
        num_merges: how many merges to keep.

    Returns:
        list of (left, right) pairs; the index of a pair is its rank.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        # skip the header; the file goes on far beyond the merges CLIP uses
        lines = list(itertools.islice(f, 1, num_merges + 1))
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != num_merges or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"expected {num_merges} merges of two symbols after the header of {path}, "
            f"got {len(merges)} lines"
        )
    return merges


def clean_text(text: str) -> str:
    """Normalise text before pre-tokenisation, as transformers' CLIPTokenizer does.

    Args:
        text: raw text.

    Returns:
        NFC-composed text ("e" + combining acute -> "é"), each run of whitespace
        replaced by one space, lower-cased.
    """
    text = unicodedata.normalize("NFC", text)
    text = WHITESPACE_RUN.sub(" ", text)
    # Character by character, as Rust's tokenizers does: str.lower() turns a
    # word-final "Σ" into "ς", transformers gives "σ".
    return "".join(ch.lower() for ch in text)


@functools.cache
def _word_pattern() -> re.Pattern[str]:
    r"""OpenAI's pre-tokenisation regex, for the standard library's `re`.

    The original reads

        's|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+

    `re` lacks `\p{L}` (letters) and `\p{N}` (numbers), so we list their code
    point ranges from `unicodedata`: one pass over all code points, about 0.2 s,
    done once.
    """
    ranges: dict[str, list[list[int]]] = {"L": [], "N": []}
    for code_point in range(sys.maxunicode + 1):
        major = unicodedata.category(chr(code_point))[0]
        if major in ranges:
            spans = ranges[major]
            if spans and spans[-1][1] == code_point - 1:
                spans[-1][1] = code_point
            else:
                spans.append([code_point, code_point])

    def char_class(spans: list[list[int]]) -> str:
        return "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in spans)

    letters, numbers = char_class(ranges["L"]), char_class(ranges["N"])
    alternatives = [
        "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",  # contractions: "it's" -> it 's
        f"[{letters}]+",  # a run of letters
        f"[{numbers}]",  # one number character: "2024" -> 2 0 2 4
        f"[^{_WHITESPACE}{letters}{numbers}]+",  # a run of anything else but spaces
    ]  # fmt: skip
    # first alternative that matches wins, so "'s" beats the run of symbols
    return re.compile("|".join(alternatives))


def pre_tokenize(text: str) -> list[str]:
    """Cut cleaned text into the words BPE runs on; whitespace is dropped.

    Args:
        text: output of `clean_text`.

    Returns:
        the words, e.g. "it's 42!" -> ["it", "'s", "4", "2", "!"].
    """
    return _word_pattern().findall(text)


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer with Stable Diffusion 1.x settings.

    Sequences are `<|startoftext|>` + tokens + `<|endoftext|>`, padded with
    `<|endoftext|>` to 77 ids: SD 1.x pads with the end token (SD 2.x uses "!").

    Args:
        merges_path: BPE merges file; OpenAI's gzipped file shipped with sdlearn
            by default, or a transformers merges.txt.
    """

    model_max_length = 77

    def __init__(self, merges_path: str | Path | None = None) -> None:
        merges = load_merges(
            DEFAULT_MERGES_PATH if merges_path is None else merges_path
        )
        self.merges = merges
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        # the merge loop that turns a word into tokens: chapter 06 can run the
        # learner's own in its place (sdlearn.checks.pipeline)
        self.merge_word = bpe
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {ch: b for b, ch in self.byte_encoder.items()}
        # The vocabulary lists every symbol BPE can produce, in id order: single
        # bytes, single bytes ending a word, one symbol per merge, then specials.
        byte_chars = list(self.byte_encoder.values())
        tokens = byte_chars + [ch + END_OF_WORD for ch in byte_chars]
        tokens += [left + right for left, right in merges]
        tokens += [BOS_TOKEN, EOS_TOKEN]
        self.id_to_token: list[str] = tokens
        self.vocab: dict[str, int] = {token: i for i, token in enumerate(tokens)}
        self.bos_token_id = self.vocab[BOS_TOKEN]  # 49406
        self.eos_token_id = self.vocab[EOS_TOKEN]  # 49407
        self.pad_token_id = self.eos_token_id
        # prompts repeat words ("a", "of", "the"), so remember each word's symbols
        self.cache: dict[str, tuple[str, ...]] = {}
        # tokens added after training (textual inversion's "<diamond>"), kept
        # whole like the special tokens; ids from 49408 on
        self.added_tokens: list[str] = []
        self._unsplit = _SPECIAL_TOKEN

    def add_tokens(self, tokens: str | Sequence[str]) -> list[int]:
        """Give new words ids of their own after the vocabulary's (as transformers'
        `add_tokens`): the text encoder needs as many new embedding rows.

        Args:
            tokens: e.g. "<diamond>", lower case and without spaces; matched
                in prompts as written, before BPE, and never split.

        Returns:
            the ids of the tokens, in order.
        """
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        for token in tokens:
            if (
                not isinstance(token, str)
                or not token
                or token != clean_text(token)
                or " " in token
            ):
                raise ValueError(
                    "expected a lower-case token without spaces, e.g. '<diamond>', "
                    f"got {token!r}"
                )
            if token in self.vocab:
                raise ValueError(
                    f"{token!r} is already in the vocabulary (id {self.vocab[token]})"
                )
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"expected different tokens, got {tokens}")
        for token in tokens:
            self.vocab[token] = len(self.id_to_token)
            self.id_to_token.append(token)
            self.added_tokens.append(token)
        # the longest first, so that "<dia>" is not cut out of "<diamond>"
        specials = sorted([BOS_TOKEN, EOS_TOKEN, *self.added_tokens], key=len)[::-1]
        self._unsplit = re.compile(f"({'|'.join(map(re.escape, specials))})")
        return [self.vocab[token] for token in tokens]

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the files transformers' `CLIPTokenizer.from_pretrained` reads.

        vocab.json, merges.txt (which this class also reads back),
        tokenizer_config.json and special_tokens_map.json, with SD 1.x's
        settings: 77 tokens, padded with <|endoftext|>; added_tokens.json
        if tokens were added (`from_pretrained` reads them back).

        Args:
            directory: the folder to write into; made if missing.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = {
            token: i
            for token, i in self.vocab.items()
            if token not in self.added_tokens
        }
        (directory / "vocab.json").write_text(json.dumps(base), "utf-8")
        if self.added_tokens:
            added = {token: self.vocab[token] for token in self.added_tokens}
            (directory / "added_tokens.json").write_text(json.dumps(added), "utf-8")
        merges = "\n".join(f"{left} {right}" for left, right in self.merges)
        (directory / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", "utf-8")
        special = {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": self.id_to_token[self.pad_token_id],
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            "do_lower_case": True,
            **special,
        }
        for name, content in (
            ("tokenizer_config.json", config),
            ("special_tokens_map.json", special),
        ):
            (directory / name).write_text(json.dumps(content, indent=2) + "\n")

    @property
    def vocab_size(self) -> int:
        """Number of token ids, 49408 for CLIP."""
        return len(self.id_to_token)

    def tokenize(self, text: str) -> list[str]:
        """Split text into token strings, without start and end tokens.

        Args:
            text: a prompt.

        Returns:
            the tokens, e.g. "a cat" -> ["a</w>", "cat</w>"].
        """
        if not isinstance(text, str):
            raise TypeError(f"expected text as a str, got {type(text).__name__}")
        tokens = []
        # re.split with a group keeps the special tokens: odd indices are them
        for i, part in enumerate(self._unsplit.split(text)):
            if i % 2 == 1:
                tokens.append(part)
                continue
            for word in pre_tokenize(clean_text(part)):
                if word not in self.cache:
                    chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                    self.cache[word] = self.merge_word(chars, self.ranks)
                tokens.extend(self.cache[word])
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without start and end tokens, never truncated.

        Args:
            text: a prompt.

        Returns:
            list of ids, e.g. "a photo of a cat" -> [320, 1125, 539, 320, 2368].
        """
        return [self.vocab[token] for token in self.tokenize(text)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a sequence of ids; special tokens are kept as text.

        Words come back separated by single spaces, so punctuation gets spaces
        around it ("a, b" -> "a , b"), as in transformers.

        Args:
            ids: token ids, a list or a 1-D tensor.

        Returns:
            the decoded text.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"expected a 1-D tensor of ids, got shape {tuple(ids.shape)}"
                )
            ids = ids.tolist()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"expected ids in [0, {self.vocab_size}), got {i}")
        text = "".join(self.id_to_token[i] for i in ids)
        data = bytes(self.byte_decoder[ch] for ch in text)
        # a byte sequence cut inside a character decodes to U+FFFD, like Rust's
        # from_utf8_lossy in transformers
        text = data.decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Ids for the text encoder: start, tokens, end, padded to 77.

        Prompts longer than 75 tokens are cut, keeping the end token last.

        Args:
            prompts: one prompt or a list of B prompts.

        Returns:
            LongTensor of shape (B, 77).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(
            isinstance(p, str) for p in prompts
        ):
            raise TypeError(
                f"expected a str or a list of str, got {_describe(prompts)}"
            )
        if not prompts:
            raise ValueError("expected at least one prompt, got an empty list")
        return self.encode_batch(prompts)

    def encode_batch(self, prompts: Sequence[str]) -> torch.Tensor:
        """The (B, 77) layout: start, tokens cut to 75, end, then padding.

        Args:
            prompts: B prompts.

        Returns:
            LongTensor of shape (B, 77).
        """
        B, T = len(prompts), self.model_max_length
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)  # (B, T)
        for row, prompt in enumerate(prompts):
            body = self.encode(prompt)[: T - 2]  # leave room for start and end
            tokens = [self.bos_token_id, *body, self.eos_token_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


def _describe(value: object) -> str:
    """Type of a bad argument, with element types for lists: 'list[str | int]'."""
    if isinstance(value, (list, tuple)):
        inner = sorted({type(v).__name__ for v in value})
        return f"{type(value).__name__}[{' | '.join(inner)}]"
    return type(value).__name__
