"""Chapter 03's checks for the MLP and the tiny CLIP (image tower, encode_text,
the training step's loss, zero-shot classification): right answers pass and are
kept, the usual mistakes are named, an untouched exercise gets no hint, a wrong
answer forgets a kept one."""

import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import answers
from sdlearn.checks import contrastive as checks
from sdlearn.checks.clip import Inputs
from sdlearn.clip import (
    CLIPMLP,
    ContrastiveCLIP,
    ContrastiveLoss,
    ShapesImageEncoder,
    clip_loss,
    zero_shot_classify,
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


def mlp_forward(self, x):
    h = self.fc1(x)
    h = h * torch.sigmoid(1.702 * h)
    return self.fc2(h)


def image_forward(self, pixels):
    return self.layers(pixels).mean(dim=(2, 3))


def encode_text(self, input_ids):
    is_eos = input_ids == self.text_model.config.eos_token_id
    T = int(is_eos.int().argmax(dim=-1).max()) + 1
    input_ids = input_ids[:, :T]
    pooled = self.text_model.pooled(input_ids, self.text_model(input_ids))
    return F.normalize(self.text_projection(pooled), dim=-1)


def encode_text_uncut(self, input_ids):
    pooled = self.text_model.pooled(input_ids, self.text_model(input_ids))
    embeds = self.text_projection(pooled)
    return embeds / embeds.norm(dim=-1, keepdim=True)


def step_forward(self, batch, generator=None):
    pixels = batch["pixel_values"]
    input_ids = self.tokenizer(list(batch["caption"])).to(pixels.device)
    loss = clip_loss(self.model(pixels, input_ids))
    return loss, {"temperature": self.model.scale().detach()}


def classify(model, tokenizer, pixels, prompts):
    text_embeds = model.encode_text(tokenizer(list(prompts)))
    return (model.encode_image(pixels) @ text_embeds.T).argmax(dim=-1)


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (checks.check_mlp, mlp_forward, CLIPMLP.forward, "clip:CLIPMLP.forward"),
    (
        checks.check_image_encoder,
        image_forward,
        ShapesImageEncoder.forward,
        "clip:ShapesImageEncoder.forward",
    ),
    (
        checks.check_encode_text,
        encode_text,
        ContrastiveCLIP.encode_text,
        "clip:ContrastiveCLIP.encode_text",
    ),
    (
        checks.check_contrastive_step,
        step_forward,
        ContrastiveLoss.forward,
        "clip:ContrastiveLoss.forward",
    ),
    (checks.check_zero_shot, classify, zero_shot_classify, "clip:zero_shot_classify"),
]
IDS = ["mlp", "image", "encode_text", "step", "zero_shot"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    assert_passes_and_is_kept(check, right, package, part, capsys)


def test_an_encode_text_that_keeps_the_padding_passes_and_is_kept(capsys):
    _, _, package, part = EXERCISES[2]
    check = checks.check_encode_text
    assert_passes_and_is_kept(check, encode_text_uncut, package, part, capsys)


def test_a_kept_step_runs_without_a_kept_loss(capsys):
    # the step calls clip_loss: the package's in the answers file, where the
    # learner's InfoNCE is kept under its own name
    assert checks.check_contrastive_step(step_forward)
    assert "clip_loss" not in answers.kept("clip")
    assert answers.is_learners(
        answers.use(
            "clip:ContrastiveLoss.forward",
            ContrastiveLoss.forward,
            checks.check_contrastive_step,
        )
    )


# --- the usual mistakes are named --------------------------------------------------


def _as_method(wrong):
    def method(self, x):
        return wrong(Inputs("", self, x))

    return method


def _as_step(wrong):
    def method(self, batch, generator=None):
        loss, temperature = wrong(Inputs("", self, batch))
        return loss.requires_grad_(), {"temperature": temperature}

    return method


def _as_classify(wrong):
    def my_classify(model, tokenizer, pixels, prompts):
        return wrong(Inputs("", model, tokenizer, pixels, prompts))

    return my_classify


MISTAKES = [
    (checks.check_mlp, "Exercise 03.6", checks.MLP_MISTAKES, _as_method),
    (checks.check_image_encoder, "Exercise 03.10", checks.IMAGE_MISTAKES, _as_method),
    (checks.check_encode_text, "Exercise 03.11", checks.TEXT_MISTAKES, _as_method),
    (checks.check_contrastive_step, "Exercise 03.14", checks.LOSS_MISTAKES, _as_step),
    (checks.check_zero_shot, "Exercise 03.15", checks.ZERO_SHOT_MISTAKES, _as_classify),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


def test_a_step_without_gradient_or_with_a_live_temperature_is_wrong(capsys):
    def no_grad_step(self, batch, generator=None):
        with torch.no_grad():
            return step_forward(self, batch)

    def live_temperature(self, batch, generator=None):
        loss, _ = step_forward(self, batch)
        return loss, {"temperature": self.model.scale()}

    assert not checks.check_contrastive_step(no_grad_step)
    assert "carries no gradient" in capsys.readouterr().out
    assert not checks.check_contrastive_step(live_temperature)
    assert "detach it" in capsys.readouterr().out


@pytest.mark.parametrize("check, exercise", [row[:2] for row in MISTAKES], ids=IDS)
def test_hints_come_in_three_tiers_and_the_first_gives_no_code(check, exercise):
    assert_three_hint_tiers(check, exercise, ("=", "torch.", "F.", "self.", "["))


# --- wrong and untouched answers ---------------------------------------------------


def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(capsys):
    def layers_only(self, pixels):
        return self.layers(pixels)

    check, right, package, part = EXERCISES[1]
    assert_wrong_is_not_kept(check, right, layers_only, package, part, capsys)
    assert answers.kept("clip") == {}


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES], ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys, answers_home):
    assert_untouched_gets_no_hint(check, capsys, answers_home)
