"""Chapter 03's exercise checks: right answers pass and are kept, the usual
mistakes are named, an untouched exercise gets no hint, a wrong answer is not
kept, and no check raises."""

import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import answers
from sdlearn.checks import clip as checks
from sdlearn.checks import tokenizer as bpe_checks
from sdlearn.clip import CLIPEncoderLayer, CLIPTextModel, ContrastiveCLIP, clip_loss
from sdlearn.tokenizer import bpe as package_bpe
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


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (checks.check_bpe, bpe, package_bpe, "tokenizer:bpe"),
    (
        checks.check_encoder_layer,
        encoder_layer_forward,
        CLIPEncoderLayer.forward,
        "clip:CLIPEncoderLayer.forward",
    ),
    (
        checks.check_text_encoder,
        text_encoder_forward,
        CLIPTextModel.forward,
        "clip:CLIPTextModel.forward",
    ),
    (checks.check_pooled, pooled, CLIPTextModel.pooled, "clip:CLIPTextModel.pooled"),
    (
        checks.check_clip_logits,
        clip_forward,
        ContrastiveCLIP.forward,
        "clip:ContrastiveCLIP.forward",
    ),
    (checks.check_info_nce, info_nce, clip_loss, "clip:clip_loss"),
]
IDS = ["bpe", "layer", "encoder", "pooled", "logits", "info_nce"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    assert_passes_and_is_kept(check, right, package, part, capsys)


@pytest.mark.parametrize(
    "exercise, right",
    [(1, encoder_layer_forward_additive), (5, info_nce_by_hand)],
    ids=["additive mask", "infonce by hand"],
)
def test_other_right_answers_pass_and_are_kept(exercise, right, capsys):
    check, _, package, part = EXERCISES[exercise]
    assert_passes_and_is_kept(check, right, package, part, capsys)


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


def _as_bpe(wrong):
    def my_bpe(word, ranks):
        return wrong(word, ranks).symbols

    return my_bpe


def _as_layer(wrong):
    def my_forward(self, x, attention_mask=None):
        return wrong(checks.Inputs("", self, x, attention_mask))

    return my_forward


def _as_encoder(wrong):
    def my_forward(self, input_ids, attention_mask=None):
        return wrong(checks.Inputs("", self, input_ids, attention_mask))

    return my_forward


def _as_pooled(wrong):
    def my_pooled(self, input_ids, last_hidden_state):
        return wrong(checks.Inputs("", self, input_ids, last_hidden_state))

    return my_pooled


def _as_logits(wrong):
    def my_forward(self, pixels, input_ids):
        return wrong(checks.Inputs("", self, pixels, input_ids))

    return my_forward


MISTAKES = [
    (checks.check_bpe, "Exercise 03.3", bpe_checks.BPE_MISTAKES, _as_bpe),
    (checks.check_encoder_layer, "Exercise 03.7", checks.LAYER_MISTAKES, _as_layer),
    (checks.check_text_encoder, "Exercise 03.8", checks.ENCODER_MISTAKES, _as_encoder),
    (checks.check_pooled, "Exercise 03.9", checks.POOLED_MISTAKES, _as_pooled),
    (checks.check_clip_logits, "Exercise 03.12", checks.LOGITS_MISTAKES, _as_logits),
    (checks.check_info_nce, "Exercise 03.13", checks.INFO_NCE_MISTAKES),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


@pytest.mark.parametrize("check, exercise", [row[:2] for row in MISTAKES], ids=IDS)
def test_hints_come_in_three_tiers_and_the_first_gives_no_code(check, exercise):
    code = ("=", "torch.", "F.", "self.", "zip(", "min(", "[")
    assert_three_hint_tiers(check, exercise, code)


# --- wrong answers: not kept, hints one tier at a time -----------------------------

# the part -> a wrong answer to it
WRONG = {
    "tokenizer:bpe": lambda word, ranks: tuple(word),
    "clip:CLIPEncoderLayer.forward": lambda self, x, attention_mask=None: x,
    "clip:CLIPTextModel.forward": lambda self, input_ids, attention_mask=None: (
        input_ids
    ),
    "clip:CLIPTextModel.pooled": lambda self, input_ids, last_hidden_state: (
        last_hidden_state[:, 1]
    ),
    "clip:ContrastiveCLIP.forward": lambda self, pixels, input_ids: torch.zeros(
        len(pixels), len(pixels)
    ),
    "clip:clip_loss": lambda logits: logits.sum(),
}


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(
    check, right, package, part, capsys
):
    assert_wrong_is_not_kept(check, right, WRONG[part], package, part, capsys)
    assert answers.kept(part.split(":")[0]) == {}


def test_hints_come_one_tier_per_failed_try(capsys):
    def wrong(word, ranks):
        return (word,)

    assert not checks.check_bpe(wrong)
    out = capsys.readouterr().out
    assert f"Hint 1 of 3: {bpe_checks.BPE_HINTS[0]}" in out
    assert not checks.check_bpe(wrong)
    assert f"Hint 2 of 3: {bpe_checks.BPE_HINTS[1]}" in capsys.readouterr().out


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


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES], ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys, answers_home):
    assert_untouched_gets_no_hint(check, capsys, answers_home)


def test_the_checks_inputs_do_not_depend_on_the_global_seed():
    torch.manual_seed(123)
    first = checks._layer_cases()[0].expected
    torch.manual_seed(456)
    torch.testing.assert_close(checks._layer_cases()[0].expected, first)
