"""Chapter 03's exercise checks: right answers pass and are kept, the usual
mistakes are named, an untouched exercise gets no hint, a wrong answer is not
kept, and no check raises."""

import pytest
import torch
import torch.nn.functional as F

import sdlearn.checks
from sdlearn.checks import Verdict, answers
from sdlearn.checks import clip as checks
from sdlearn.checks import tokenizer as bpe_checks
from sdlearn.clip import CLIPEncoderLayer, CLIPTextModel, ContrastiveCLIP, clip_loss
from sdlearn.tokenizer import bpe as package_bpe

pytestmark = pytest.mark.usefixtures("one_thread")


def unsolved(*args):
    raise NotImplementedError


# --- right answers, written the way a learner would -------------------------------


def bpe(word, ranks):
    symbols = (*word[:-1], word[-1] + "</w>")
    while True:
        pairs = [p for p in zip(symbols[:-1], symbols[1:], strict=True) if p in ranks]
        if not pairs:
            return symbols
        first, second = min(pairs, key=ranks.get)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = tuple(merged)


def encoder_layer_forward(self, x, attention_mask=None):
    B, T, _ = x.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :]
    x = x + self.self_attn(self.layer_norm1(x), attention_mask=allowed)
    h = self.mlp.fc1(self.layer_norm2(x))
    return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))


def encoder_layer_forward_additive(self, x, attention_mask=None):
    # a float mask of 0 and -inf, built the way transformers builds it
    T = x.shape[1]
    mask = torch.full((T, T), float("-inf")).triu(diagonal=1)[None, None]
    if attention_mask is not None:
        padding = torch.zeros(attention_mask.shape).masked_fill(
            ~attention_mask, float("-inf")
        )  # (B, T)
        mask = mask + padding[:, None, None, :]
    h = self.layer_norm1(x)
    x = x + self.self_attn(h, attention_mask=mask)
    return x + self.mlp(self.layer_norm2(x))


def text_encoder_forward(self, input_ids, attention_mask=None):
    T = input_ids.shape[1]
    if attention_mask is not None:
        attention_mask = attention_mask.bool()
    x = self.embeddings.token_embedding(input_ids)
    x = x + self.embeddings.position_embedding(torch.arange(T))
    for layer in self.encoder.layers:
        x = layer(x, attention_mask)
    return self.final_layer_norm(x)


def pooled(self, input_ids, last_hidden_state):
    first = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
    return last_hidden_state[torch.arange(len(input_ids)), first]


def clip_forward(self, pixels, input_ids):
    image_embeds = self.visual_projection(self.vision_model(pixels))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = self.encode_text(input_ids)
    return self.scale() * image_embeds @ text_embeds.T


def info_nce(logits_per_image):
    targets = torch.arange(logits_per_image.shape[0])
    image_loss = F.cross_entropy(logits_per_image, targets)
    text_loss = F.cross_entropy(logits_per_image.T, targets)
    return (image_loss + text_loss) / 2


def info_nce_by_hand(logits):
    rows = logits.log_softmax(dim=1).diagonal()
    columns = logits.log_softmax(dim=0).diagonal()
    return -(rows.mean() + columns.mean()) / 2


RIGHT = [
    (checks.check_bpe, bpe, "tokenizer", "bpe"),
    (
        checks.check_encoder_layer,
        encoder_layer_forward,
        "clip",
        "CLIPEncoderLayer.forward",
    ),
    (
        checks.check_encoder_layer,
        encoder_layer_forward_additive,
        "clip",
        "CLIPEncoderLayer.forward",
    ),
    (
        checks.check_encoder_layer,
        CLIPEncoderLayer.forward,
        "clip",
        "CLIPEncoderLayer.forward",
    ),
    (checks.check_text_encoder, text_encoder_forward, "clip", "CLIPTextModel.forward"),
    (checks.check_pooled, pooled, "clip", "CLIPTextModel.pooled"),
    (checks.check_pooled, CLIPTextModel.pooled, "clip", "CLIPTextModel.pooled"),
    (checks.check_clip_logits, clip_forward, "clip", "ContrastiveCLIP.forward"),
    (
        checks.check_clip_logits,
        ContrastiveCLIP.forward,
        "clip",
        "ContrastiveCLIP.forward",
    ),
    (checks.check_info_nce, info_nce, "clip", "clip_loss"),
    (checks.check_info_nce, info_nce_by_hand, "clip", "clip_loss"),
    (checks.check_info_nce, clip_loss, "clip", "clip_loss"),
]


@pytest.mark.parametrize(
    ("check", "answer", "module", "part"),
    RIGHT,
    ids=[f"{a.__qualname__}" for _, a, _, _ in RIGHT],
)
def test_right_answers_pass_and_are_kept(check, answer, module, part, capsys):
    verdict = check(answer)
    out = capsys.readouterr().out
    assert isinstance(verdict, Verdict) and verdict, out
    assert "✅" in out and "Kept in" in out
    kept = answers.kept(module)[part]
    assert kept.__name__ == answer.__name__
    # the kept code, read back from the file, passes again and is used
    used = answers.use(f"{module}:{part}", answer, check)
    assert answers.is_learners(used)


def test_kept_forwards_run_a_model(capsys):
    assert checks.check_encoder_layer(encoder_layer_forward)
    assert checks.check_text_encoder(text_encoder_forward)
    layer_forward = answers.use(
        "clip:CLIPEncoderLayer.forward",
        CLIPEncoderLayer.forward,
        checks.check_encoder_layer,
    )
    encoder_forward = answers.use(
        "clip:CLIPTextModel.forward", CLIPTextModel.forward, checks.check_text_encoder
    )
    assert answers.is_learners(layer_forward) and answers.is_learners(encoder_forward)
    (inputs,) = checks._encoder_cases()[1].args
    model, input_ids, mask = inputs.args
    with torch.no_grad():
        expected = model(input_ids, mask)
        assert answers.install_forward(model, CLIPEncoderLayer, layer_forward) == 2
        assert answers.install_forward(model, CLIPTextModel, encoder_forward) == 1
        torch.testing.assert_close(model(input_ids, mask), expected)


# --- the usual mistakes are named --------------------------------------------------


@pytest.mark.parametrize("message", list(bpe_checks.BPE_MISTAKES))
def test_bpe_mistakes_are_named(message, capsys):
    wrong = bpe_checks.BPE_MISTAKES[message]

    def my_bpe(word, ranks):
        return wrong(word, ranks).symbols

    assert not checks.check_bpe(my_bpe)
    out = capsys.readouterr().out
    assert "❌ Exercise 03.3" in out and message in out


@pytest.mark.parametrize("message", list(checks.LAYER_MISTAKES))
def test_layer_mistakes_are_named(message, capsys):
    wrong = checks.LAYER_MISTAKES[message]

    def my_forward(self, x, attention_mask=None):
        return wrong(checks.Inputs("", self, x, attention_mask))

    assert not checks.check_encoder_layer(my_forward)
    out = capsys.readouterr().out
    assert "❌ Exercise 03.7" in out and message in out


@pytest.mark.parametrize("message", list(checks.ENCODER_MISTAKES))
def test_encoder_mistakes_are_named(message, capsys):
    wrong = checks.ENCODER_MISTAKES[message]

    def my_forward(self, input_ids, attention_mask=None):
        return wrong(checks.Inputs("", self, input_ids, attention_mask))

    assert not checks.check_text_encoder(my_forward)
    out = capsys.readouterr().out
    assert "❌ Exercise 03.8" in out and message in out


@pytest.mark.parametrize("message", list(checks.POOLED_MISTAKES))
def test_pooled_mistakes_are_named(message, capsys):
    wrong = checks.POOLED_MISTAKES[message]

    def my_pooled(self, input_ids, last_hidden_state):
        return wrong(checks.Inputs("", self, input_ids, last_hidden_state))

    assert not checks.check_pooled(my_pooled)
    out = capsys.readouterr().out
    assert "❌ Exercise 03.9" in out and message in out


@pytest.mark.parametrize("message", list(checks.LOGITS_MISTAKES))
def test_logits_mistakes_are_named(message, capsys):
    wrong = checks.LOGITS_MISTAKES[message]

    def my_forward(self, pixels, input_ids):
        return wrong(checks.Inputs("", self, pixels, input_ids))

    assert not checks.check_clip_logits(my_forward)
    out = capsys.readouterr().out
    assert "❌ Exercise 03.12" in out and message in out


@pytest.mark.parametrize("message", list(checks.INFO_NCE_MISTAKES))
def test_info_nce_mistakes_are_named(message, capsys):
    assert not checks.check_info_nce(checks.INFO_NCE_MISTAKES[message])
    out = capsys.readouterr().out
    assert "❌ Exercise 03.13" in out and message in out


def test_every_exercise_names_two_mistakes_and_has_three_hints():
    for mistakes in (
        bpe_checks.BPE_MISTAKES,
        checks.LAYER_MISTAKES,
        checks.ENCODER_MISTAKES,
        checks.POOLED_MISTAKES,
        checks.LOGITS_MISTAKES,
        checks.INFO_NCE_MISTAKES,
    ):
        assert len(mistakes) >= 2
    for hints in (
        bpe_checks.BPE_HINTS,
        checks.LAYER_HINTS,
        checks.ENCODER_HINTS,
        checks.POOLED_HINTS,
        checks.LOGITS_HINTS,
        checks.INFO_NCE_HINTS,
    ):
        assert len(hints) == 3


# --- wrong answers: not kept, hints one tier at a time -----------------------------


def test_a_wrong_answer_is_not_kept_and_forgets_a_kept_one(answers_home, capsys):
    my_bpe = bpe
    assert checks.check_bpe(my_bpe)
    assert "bpe" in answers.kept("tokenizer")

    def my_bpe(word, ranks):  # the learner edits the cell and runs it again
        return tuple(word)

    assert not checks.check_bpe(my_bpe)
    assert answers.kept("tokenizer") == {}
    used = answers.use("tokenizer:bpe", package_bpe, checks.check_bpe)
    assert used is package_bpe
    assert "the package's stands in" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("check", "wrong", "module"),
    [
        (checks.check_encoder_layer, lambda self, x, attention_mask=None: x, "clip"),
        (
            checks.check_text_encoder,
            lambda self, input_ids, attention_mask=None: input_ids,
            "clip",
        ),
        (
            checks.check_pooled,
            lambda self, input_ids, last_hidden_state: last_hidden_state[:, 1],
            "clip",
        ),
        (
            checks.check_clip_logits,
            lambda self, pixels, input_ids: torch.zeros(len(pixels), len(pixels)),
            "clip",
        ),
        (checks.check_info_nce, lambda logits: logits.sum(), "clip"),
    ],
    ids=["layer", "encoder", "pooled", "logits", "info_nce"],
)
def test_wrong_forwards_are_not_kept(check, wrong, module, answers_home, capsys):
    assert not check(wrong)
    assert answers.kept(module) == {}


def test_hints_come_one_tier_per_failed_try(capsys, monkeypatch):
    monkeypatch.setattr(sdlearn.checks, "_FAILED_TRIES", {})  # a fresh session

    def wrong(word, ranks):
        return (word,)

    assert not checks.check_bpe(wrong)
    out = capsys.readouterr().out
    assert f"Hint 1 of 3: {bpe_checks.BPE_HINTS[0]}" in out
    assert not checks.check_bpe(wrong)
    assert f"Hint 2 of 3: {bpe_checks.BPE_HINTS[1]}" in capsys.readouterr().out


def test_first_hints_do_not_give_the_code():
    for hints in (
        bpe_checks.BPE_HINTS,
        checks.LAYER_HINTS,
        checks.ENCODER_HINTS,
        checks.POOLED_HINTS,
        checks.LOGITS_HINTS,
        checks.INFO_NCE_HINTS,
    ):
        code = ("=", "torch.", "F.", "self.", "zip(", "min(", "[")
        assert not any(token in hints[0] for token in code), hints[0]


def test_a_failing_forward_shows_its_error_and_a_short_message(capsys):
    def broken(self, x, attention_mask=None):
        return self.self_attn(x, attention_mask=torch.ones(x.shape[1], x.shape[1]))

    assert not checks.check_encoder_layer(broken)
    out = capsys.readouterr().out
    assert "❌ Exercise 03.7 (broken) raised" in out and len(out) < 2000

    assert not checks.check_bpe(lambda word, ranks: tuple(word))
    out = capsys.readouterr().out
    assert "Ranks with" in out or "merges" in out
    assert len(out) < 2000


@pytest.mark.parametrize(
    "check",
    [
        checks.check_bpe,
        checks.check_encoder_layer,
        checks.check_text_encoder,
        checks.check_pooled,
        checks.check_clip_logits,
        checks.check_info_nce,
    ],
)
def test_unsolved_exercises_get_a_reminder_and_no_hint(check, capsys, answers_home):
    verdict = check(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "raise NotImplementedError" in out
    assert "Hint" not in out
    assert not answers_home.exists() or not any(answers_home.iterdir())


def test_the_checks_inputs_do_not_depend_on_the_global_seed():
    torch.manual_seed(123)
    first = checks._layer_cases()[0].expected
    torch.manual_seed(456)
    torch.testing.assert_close(checks._layer_cases()[0].expected, first)
