"""Chapter 03's tokenizer exercise checks (bytes, cleaning, tokenize, the
(B, 77) layout): right answers pass and are kept, the usual mistakes are named,
an untouched exercise gets no hint, a wrong answer forgets a kept one. The BPE
merge loop's are in tests/test_clip_checks.py."""

import unicodedata

import pytest
import torch

from sdlearn.checks import answers
from sdlearn.checks import tokenizer as checks
from sdlearn.tokenizer import (
    WHITESPACE_RUN,
    CLIPTokenizer,
    bytes_to_unicode,
    clean_text,
    pre_tokenize,
)
from tests.check_contract import (
    assert_mistake_named,
    assert_passes_and_is_kept,
    assert_three_hint_tiers,
    assert_untouched_gets_no_hint,
    assert_wrong_is_not_kept,
    named_mistakes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (
        checks.check_bytes_to_unicode,
        my_bytes_to_unicode,
        bytes_to_unicode,
        "tokenizer:bytes_to_unicode",
    ),
    (checks.check_clean_text, my_clean_text, clean_text, "tokenizer:clean_text"),
    (
        checks.check_tokenize,
        my_tokenize,
        CLIPTokenizer.tokenize,
        "tokenizer:CLIPTokenizer.tokenize",
    ),
    (
        checks.check_encode_batch,
        my_encode_batch,
        CLIPTokenizer.encode_batch,
        "tokenizer:CLIPTokenizer.encode_batch",
    ),
]
IDS = ["bytes_to_unicode", "clean_text", "tokenize", "encode_batch"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    assert_passes_and_is_kept(check, right, package, part, capsys)


def test_kept_answers_make_a_tokenizer_that_equals_the_package(capsys):
    for check, right, *_ in EXERCISES:
        assert check(right)
    kept = answers.kept("tokenizer")
    tokenizer = CLIPTokenizer()
    tokenizer.byte_encoder = kept["bytes_to_unicode"]()
    tokenizer.tokenize = kept["CLIPTokenizer.tokenize"].__get__(tokenizer)
    tokenizer.encode_batch = kept["CLIPTokenizer.encode_batch"].__get__(tokenizer)
    prompts = ["A  Photo of an ASTRONAUT 🚀", "Ñandú in a café<|endoftext|>"]
    torch.testing.assert_close(tokenizer(prompts), CLIPTokenizer()(prompts))


# --- the usual mistakes are named --------------------------------------------------


def _as_bytes_to_unicode(wrong):
    def my_bytes_to_unicode():
        return wrong().table

    return my_bytes_to_unicode


def _as_encode_batch(wrong):
    def encode_batch(self, prompts):
        return wrong(prompts)

    return encode_batch


def _as_tokenize(wrong):
    def tokenize(self, text):
        return wrong(checks.Prompt(text))

    return tokenize


MISTAKES = [
    (
        checks.check_bytes_to_unicode,
        "Exercise 03.1",
        checks.BYTES_MISTAKES,
        _as_bytes_to_unicode,
    ),
    (checks.check_clean_text, "Exercise 03.2", checks.CLEAN_MISTAKES),
    (checks.check_tokenize, "Exercise 03.4", checks.TOKENIZE_MISTAKES, _as_tokenize),
    (
        checks.check_encode_batch,
        "Exercise 03.5",
        checks.LAYOUT_MISTAKES,
        _as_encode_batch,
    ),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


def test_a_wrong_byte_table_says_which_byte(capsys):
    def off_by_one():
        table = my_bytes_to_unicode()
        table[32] = chr(257)
        return table

    assert not checks.check_bytes_to_unicode(off_by_one)
    assert "byte 32 maps to 'ā', expected 'Ġ'" in capsys.readouterr().out


@pytest.mark.parametrize("check, exercise", [row[:2] for row in MISTAKES], ids=IDS)
def test_hints_come_in_three_tiers_and_the_first_gives_no_code(check, exercise):
    assert_three_hint_tiers(check, exercise, ("=", "torch.", "self.", "[", "F."))


# --- wrong and untouched answers ---------------------------------------------------


def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(capsys):
    def zeros(self, prompts):
        return torch.zeros(1, 77)

    check, right, package, part = EXERCISES[3]
    assert_wrong_is_not_kept(check, right, zeros, package, part, capsys)
    assert answers.kept("tokenizer") == {}


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES], ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys, answers_home):
    assert_untouched_gets_no_hint(check, capsys, answers_home)


def test_the_tokenize_check_leaves_the_cache_empty():
    checks.check_tokenize(my_tokenize)
    assert checks._tokenizer().cache == {}
