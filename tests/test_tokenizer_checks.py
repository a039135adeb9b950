"""Chapter 03's tokenizer exercise checks (bytes, cleaning, tokenize, the
(B, 77) layout): right answers pass and are kept, the usual mistakes are named,
an untouched exercise gets no hint, a wrong answer forgets a kept one. The BPE
merge loop's are in tests/test_clip_checks.py."""

import unicodedata

import pytest
import torch

from sdlearn.checks import Verdict, answers
from sdlearn.checks import tokenizer as checks
from sdlearn.tokenizer import (
    WHITESPACE_RUN,
    CLIPTokenizer,
    bytes_to_unicode,
    clean_text,
    pre_tokenize,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def unsolved(*args):
    raise NotImplementedError


# --- right answers, written the way a learner would -------------------------------


def my_bytes_to_unicode():
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def my_clean_text(text):
    text = unicodedata.normalize("NFC", text)
    text = WHITESPACE_RUN.sub(" ", text)
    return "".join(ch.lower() for ch in text)


def my_tokenize(self, text):
    tokens = []
    for i, part in enumerate(self._unsplit.split(text)):
        if i % 2 == 1:
            tokens.append(part)
            continue
        for word in pre_tokenize(clean_text(part)):
            chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            tokens.extend(self.merge_word(chars, self.ranks))  # no cache: also right
    return tokens


def my_encode_batch(self, prompts):
    ids = torch.full((len(prompts), 77), self.pad_token_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens = [self.bos_token_id, *self.encode(prompt)[:75], self.eos_token_id]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


RIGHT = [
    (checks.check_bytes_to_unicode, my_bytes_to_unicode, "bytes_to_unicode"),
    (checks.check_bytes_to_unicode, bytes_to_unicode, "bytes_to_unicode"),
    (checks.check_clean_text, my_clean_text, "clean_text"),
    (checks.check_clean_text, clean_text, "clean_text"),
    (checks.check_tokenize, my_tokenize, "CLIPTokenizer.tokenize"),
    (checks.check_tokenize, CLIPTokenizer.tokenize, "CLIPTokenizer.tokenize"),
    (checks.check_encode_batch, my_encode_batch, "CLIPTokenizer.encode_batch"),
    (
        checks.check_encode_batch,
        CLIPTokenizer.encode_batch,
        "CLIPTokenizer.encode_batch",
    ),
]


@pytest.mark.parametrize(
    ("check", "answer", "part"), RIGHT, ids=[a.__qualname__ for _, a, _ in RIGHT]
)
def test_right_answers_pass_and_are_kept(check, answer, part, capsys):
    verdict = check(answer)
    out = capsys.readouterr().out
    assert isinstance(verdict, Verdict) and verdict, out
    assert "✅" in out and "Kept in" in out
    assert answers.kept("tokenizer")[part].__name__ == answer.__name__
    used = answers.use(f"tokenizer:{part}", answer, check)
    assert answers.is_learners(used)


def test_kept_answers_make_a_tokenizer_that_equals_the_package(capsys):
    for check, answer, _ in RIGHT[::2]:
        assert check(answer)
    kept = answers.kept("tokenizer")
    tokenizer = CLIPTokenizer()
    tokenizer.byte_encoder = kept["bytes_to_unicode"]()
    tokenizer.tokenize = kept["CLIPTokenizer.tokenize"].__get__(tokenizer)
    tokenizer.encode_batch = kept["CLIPTokenizer.encode_batch"].__get__(tokenizer)
    prompts = ["A  Photo of an ASTRONAUT 🚀", "Ñandú in a café<|endoftext|>"]
    torch.testing.assert_close(tokenizer(prompts), CLIPTokenizer()(prompts))


# --- the usual mistakes are named --------------------------------------------------


@pytest.mark.parametrize("message", list(checks.BYTES_MISTAKES))
def test_bytes_mistakes_are_named(message, capsys):
    wrong = checks.BYTES_MISTAKES[message]
    assert not checks.check_bytes_to_unicode(lambda: wrong().table)
    out = capsys.readouterr().out
    assert "❌ Exercise 03.1" in out and message in out


@pytest.mark.parametrize("message", list(checks.CLEAN_MISTAKES))
def test_clean_mistakes_are_named(message, capsys):
    assert not checks.check_clean_text(checks.CLEAN_MISTAKES[message])
    out = capsys.readouterr().out
    assert "❌ Exercise 03.2" in out and message in out


@pytest.mark.parametrize("message", list(checks.TOKENIZE_MISTAKES))
def test_tokenize_mistakes_are_named(message, capsys):
    wrong = checks.TOKENIZE_MISTAKES[message]

    def tokenize(self, text):
        return wrong(checks.Prompt(text))

    assert not checks.check_tokenize(tokenize)
    out = capsys.readouterr().out
    assert "❌ Exercise 03.4" in out and message in out


@pytest.mark.parametrize("message", list(checks.LAYOUT_MISTAKES))
def test_layout_mistakes_are_named(message, capsys):
    wrong = checks.LAYOUT_MISTAKES[message]
    assert not checks.check_encode_batch(lambda self, prompts: wrong(prompts))
    out = capsys.readouterr().out
    assert "❌ Exercise 03.5" in out and message in out


def test_a_wrong_byte_table_says_which_byte(capsys):
    def off_by_one():
        table = my_bytes_to_unicode()
        table[32] = chr(257)
        return table

    assert not checks.check_bytes_to_unicode(off_by_one)
    assert "byte 32 maps to 'ā', expected 'Ġ'" in capsys.readouterr().out


def test_every_exercise_names_two_mistakes_and_hints_in_three_tiers():
    for mistakes, hints in (
        (checks.BYTES_MISTAKES, checks.BYTES_HINTS),
        (checks.CLEAN_MISTAKES, checks.CLEAN_HINTS),
        (checks.TOKENIZE_MISTAKES, checks.TOKENIZE_HINTS),
        (checks.LAYOUT_MISTAKES, checks.LAYOUT_HINTS),
    ):
        assert len(mistakes) >= 2 and len(hints) == 3
        code = ("=", "torch.", "self.", "[", "F.")
        assert not any(token in hints[0] for token in code), hints[0]


# --- wrong and untouched answers ---------------------------------------------------


def test_a_wrong_answer_forgets_a_kept_one(capsys):
    assert checks.check_encode_batch(my_encode_batch)
    assert "CLIPTokenizer.encode_batch" in answers.kept("tokenizer")
    assert not checks.check_encode_batch(lambda self, prompts: torch.zeros(1, 77))
    assert answers.kept("tokenizer") == {}


@pytest.mark.parametrize(
    "check",
    [
        checks.check_bytes_to_unicode,
        checks.check_clean_text,
        checks.check_tokenize,
        checks.check_encode_batch,
    ],
)
def test_unsolved_exercises_get_a_reminder_and_no_hint(check, capsys, answers_home):
    verdict = check(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "Hint" not in out
    assert not answers_home.exists() or not any(answers_home.iterdir())


def test_the_tokenize_check_leaves_the_cache_empty():
    checks.check_tokenize(my_tokenize)
    assert checks._tokenizer().cache == {}
