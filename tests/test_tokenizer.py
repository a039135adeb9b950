"""The CLIP tokenizer: BPE pieces, SD 1.x batches, parity with transformers."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from sdlearn.tokenizer import (
    CLIPTokenizer,
    bpe,
    bpe_merge_step,
    bytes_to_unicode,
    clean_text,
    get_pairs,
    pre_tokenize,
)
from tests.helpers import load_reference, needs_transformers
from tools.reference.tokenizer import (
    CORPUS,
    build_transformers_tokenizer,
    corpus_digest,
    load_corpus,
    write_vocab_files,
)


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return load_corpus()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return build_transformers_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


# 1. the pieces a chapter builds


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())
    assert table[ord("a")] == "a"
    assert table[ord(" ")] == "Ġ"


def test_get_pairs():
    assert get_pairs(("l", "o", "w</w>")) == {("l", "o"), ("o", "w</w>")}
    assert get_pairs(("a",)) == set()


def test_bpe_merge_step_merges_the_lowest_ranked_pair():
    ranks = {("e", "r</w>"): 0, ("l", "o"): 1, ("lo", "w"): 2}
    word = ("l", "o", "w", "e", "r</w>")
    # ("e", "r</w>") is rightmost but ranked first, so it goes first
    word = bpe_merge_step(word, ranks)
    assert word == ("l", "o", "w", "er</w>")
    word = bpe_merge_step(word, ranks)
    assert word == ("lo", "w", "er</w>")
    word = bpe_merge_step(word, ranks)
    assert word == ("low", "er</w>")
    # nothing left to merge: the word comes back as it is
    assert bpe_merge_step(word, ranks) == ("low", "er</w>")


def test_bpe_merge_step_joins_every_occurrence_without_overlap():
    assert bpe_merge_step(("a", "b", "a", "b"), {("a", "b"): 0}) == ("ab", "ab")
    assert bpe_merge_step(("a", "a", "a"), {("a", "a"): 0}) == ("aa", "a")
    assert bpe_merge_step(("x",), {("a", "a"): 0}) == ("x",)


def test_bpe_with_the_real_merges(tokenizer):
    assert bpe("lower", tokenizer.ranks) == ("lower</w>",)
    assert bpe("a", tokenizer.ranks) == ("a</w>",)
    assert bpe("astronaut", tokenizer.ranks) == ("astronaut</w>",)


def test_clean_text_follows_transformers():
    # NFC composes accents, whitespace runs collapse, no final-sigma rule
    assert clean_text("Cafe\u0301 \t\n OK") == "café ok"
    assert clean_text("ΟΔΟΣ") == "οδοσ"
    # U+001C counts as space for Python's str.isspace() but not for Unicode
    assert clean_text("a\x1cb") == "a\x1cb"


def test_pre_tokenize():
    assert pre_tokenize("it's 42!") == ["it", "'s", "4", "2", "!"]
    assert pre_tokenize("don''t  a½") == ["don", "''", "t", "a", "½"]


# 2. the tokenizer's interface


def test_special_ids_and_sizes(tokenizer):
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token_id == 49407
    assert tokenizer.vocab_size == 49408
    assert tokenizer.model_max_length == 77


def test_encode_known_ids(tokenizer):
    # ids every SD 1.x user has seen in a prompt
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tokenizer.encode("") == []
    assert tokenizer.encode("a <|endoftext|>") == [320, 49407]


def test_call_pads_and_truncates(tokenizer):
    ids = tokenizer(["a photo of a cat", "a " * 100])
    assert ids.shape == (2, 77)
    assert ids.dtype == torch.long
    expected = torch.full((77,), 49407)
    expected[:6] = torch.tensor([49406, 320, 1125, 539, 320, 2368])
    torch.testing.assert_close(ids[0], expected)
    # 75 "a" tokens between start and end: the end token survives truncation
    assert ids[1, 0] == 49406
    assert (ids[1, 1:76] == 320).all()
    assert ids[1, 76] == 49407
    assert tokenizer("a cat").shape == (1, 77)


def test_decode_round_trip(tokenizer):
    for text in [
        "a photo of a cat",
        "an astronaut riding a horse on the moon",
        "a small red circle on the left",
        "supercalifragilisticexpialidocious",
    ]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer("a cat")[0, :4]
    assert tokenizer.decode(ids) == "<|startoftext|>a cat <|endoftext|>"


def test_decode_non_ascii(tokenizer):
    assert tokenizer.decode(tokenizer.encode("crème brûlée 🐱")) == "crème brûlée 🐱"
    # the first byte of "é" (0xC3 0xA9) alone is not UTF-8: it decodes to U+FFFD
    first_byte = tokenizer.vocab[bytes_to_unicode()[0xC3]]
    assert tokenizer.decode([first_byte]) == "\ufffd"


@pytest.mark.parametrize(
    ("prompts", "error"),
    [
        (123, TypeError),
        (None, TypeError),
        (b"a cat", TypeError),
        (["a cat", 1], TypeError),
        ([["a cat"]], TypeError),
        ([], ValueError),
    ],
)
def test_call_rejects_bad_prompts(tokenizer, prompts, error):
    with pytest.raises(error, match="expected"):
        tokenizer(prompts)


def test_encode_and_decode_reject_bad_input(tokenizer):
    with pytest.raises(TypeError, match="expected text as a str, got bytes"):
        tokenizer.encode(b"a cat")
    with pytest.raises(ValueError, match=r"expected ids in \[0, 49408\), got 49408"):
        tokenizer.decode([320, 49408])
    with pytest.raises(ValueError, match="got -1"):
        tokenizer.decode([-1])
    with pytest.raises(ValueError, match=r"1-D tensor of ids, got shape \(1, 77\)"):
        tokenizer.decode(tokenizer("a cat"))


def test_short_merges_file_is_rejected(tmp_path):
    path = tmp_path / "merges.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="expected 48894 merges .* got 2 lines"):
        CLIPTokenizer(merges_path=path)


# 3. the corpus and parity with transformers


def test_corpus_covers_the_hard_cases(tokenizer, corpus):
    groups = json.loads(CORPUS.read_text(encoding="utf-8"))
    assert len(corpus) >= 200
    assert len(set(corpus)) == len(corpus)
    joined = "\n".join(corpus)
    assert "" in corpus
    assert "a small red circle on the left" in corpus
    assert any(text.isupper() for text in corpus)
    for accent in "éñüÅ":
        assert accent in joined, accent
    assert "🐱" in joined  # emoji
    assert "猫" in joined and "고양이" in joined  # CJK
    # whitespace, and U+001C, whitespace for Python only
    for space in ["\t", "\n", "  ", "\u00a0", "\u3000", "\x1c"]:
        assert space in joined, repr(space)
    for contraction in ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]:
        assert contraction in joined, contraction
    assert any(text.startswith("https://") for text in corpus)
    assert any(ch.isdigit() for ch in joined)
    assert "!" in joined and "," in joined and "(" in joined
    assert "<|endoftext|>" in joined
    # prompts longer than the 75 tokens that fit between start and end tokens
    assert sum(len(tokenizer.encode(text)) > 75 for text in groups["long"]) >= 5


def test_matches_reference_ids(tokenizer, corpus):
    reference = load_reference("tokenizer")
    if not torch.equal(corpus_digest(corpus), reference["corpus_sha256"]):
        pytest.fail(
            "tests/fixtures/tokenizer_corpus.json changed after the reference was "
            "made; run `python tools/make_reference.py tokenizer`"
        )
    torch.testing.assert_close(tokenizer(corpus), reference["input_ids"])
    offsets = reference["encoded_offsets"].tolist()
    flat = reference["encoded_ids"].tolist()
    wrong = [
        text
        for i, text in enumerate(corpus)
        if tokenizer.encode(text) != flat[offsets[i] : offsets[i + 1]]
    ]
    assert wrong == []
    # some prompts are long enough to be truncated
    assert torch.diff(reference["encoded_offsets"]).max() > 75


@needs_transformers
def test_encode_matches_transformers(tokenizer, hf_tokenizer, corpus):
    wrong = [
        text
        for text in corpus
        if tokenizer.encode(text) != hf_tokenizer.encode(text, add_special_tokens=False)
    ]
    assert wrong == []


@needs_transformers
def test_call_matches_transformers(tokenizer, hf_tokenizer, corpus):
    # the call diffusers' StableDiffusionPipeline.encode_prompt makes
    expected = hf_tokenizer(
        corpus,
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    torch.testing.assert_close(tokenizer(corpus), expected)


@needs_transformers
def test_decode_matches_transformers(tokenizer, hf_tokenizer, corpus):
    batch = tokenizer(corpus)
    wrong = [
        text
        for text, ids in zip(corpus, batch, strict=True)
        if tokenizer.decode(ids) != hf_tokenizer.decode(ids.tolist())
    ]
    assert wrong == []
    # random ids cut characters in half and glue bytes of different words
    generator = torch.Generator().manual_seed(0)
    for ids in torch.randint(0, 49408, (50, 12), generator=generator):
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids.tolist())


@needs_transformers
def test_loads_a_transformers_merges_file(hf_tokenizer, corpus, tmp_path):
    write_vocab_files(tmp_path)
    other = CLIPTokenizer(merges_path=tmp_path / "merges.txt")
    expected = hf_tokenizer(
        corpus,
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    torch.testing.assert_close(other(corpus), expected)
