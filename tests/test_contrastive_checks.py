"""Chapter 03's checks for the MLP and the tiny CLIP (image tower, encode_text,
the training step's loss, zero-shot classification): right answers pass and are
kept, the usual mistakes are named, an untouched exercise gets no hint, a wrong
answer forgets a kept one."""

import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import Verdict, answers
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

pytestmark = pytest.mark.usefixtures("one_thread")


def unsolved(*args):
    raise NotImplementedError


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


RIGHT = [
    (checks.check_mlp, mlp_forward, "CLIPMLP.forward"),
    (checks.check_mlp, CLIPMLP.forward, "CLIPMLP.forward"),
    (checks.check_image_encoder, image_forward, "ShapesImageEncoder.forward"),
    (
        checks.check_image_encoder,
        ShapesImageEncoder.forward,
        "ShapesImageEncoder.forward",
    ),
    (checks.check_encode_text, encode_text, "ContrastiveCLIP.encode_text"),
    (checks.check_encode_text, encode_text_uncut, "ContrastiveCLIP.encode_text"),
    (
        checks.check_encode_text,
        ContrastiveCLIP.encode_text,
        "ContrastiveCLIP.encode_text",
    ),
    (checks.check_contrastive_step, step_forward, "ContrastiveLoss.forward"),
    (
        checks.check_contrastive_step,
        ContrastiveLoss.forward,
        "ContrastiveLoss.forward",
    ),
    (checks.check_zero_shot, classify, "zero_shot_classify"),
    (checks.check_zero_shot, zero_shot_classify, "zero_shot_classify"),
]


@pytest.mark.parametrize(
    ("check", "answer", "part"), RIGHT, ids=[a.__qualname__ for _, a, _ in RIGHT]
)
def test_right_answers_pass_and_are_kept(check, answer, part, capsys):
    verdict = check(answer)
    out = capsys.readouterr().out
    assert isinstance(verdict, Verdict) and verdict, out
    assert "✅" in out and "Kept in" in out
    assert answers.kept("clip")[part].__name__ == answer.__name__
    used = answers.use(f"clip:{part}", answer, check)
    assert answers.is_learners(used)


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


def _as_method(wrong, n_args):
    def method(self, *args):
        return wrong(Inputs("", self, *args[:n_args]))

    return method


@pytest.mark.parametrize(
    ("check", "mistakes", "exercise", "n_args"),
    [
        (checks.check_mlp, checks.MLP_MISTAKES, "03.6", 1),
        (checks.check_image_encoder, checks.IMAGE_MISTAKES, "03.10", 1),
        (checks.check_encode_text, checks.TEXT_MISTAKES, "03.11", 1),
        (checks.check_contrastive_step, checks.LOSS_MISTAKES, "03.14", 1),
    ],
    ids=["mlp", "image", "encode_text", "step"],
)
def test_method_mistakes_are_named(check, mistakes, exercise, n_args, capsys):
    for message, wrong in mistakes.items():
        method = _as_method(wrong, n_args)
        if check is checks.check_contrastive_step:

            def method(self, batch, generator=None, wrong=wrong):
                loss, temperature = wrong(Inputs("", self, batch))
                return loss.requires_grad_(), {"temperature": temperature}

        assert not check(method)
        out = capsys.readouterr().out
        assert f"❌ Exercise {exercise}" in out and message in out, out


@pytest.mark.parametrize("message", list(checks.ZERO_SHOT_MISTAKES))
def test_zero_shot_mistakes_are_named(message, capsys):
    wrong = checks.ZERO_SHOT_MISTAKES[message]

    def my_classify(model, tokenizer, pixels, prompts):
        return wrong(Inputs("", model, tokenizer, pixels, prompts))

    assert not checks.check_zero_shot(my_classify)
    out = capsys.readouterr().out
    assert "❌ Exercise 03.15" in out and message in out


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


def test_every_exercise_names_two_mistakes_and_hints_in_three_tiers():
    for mistakes, hints in (
        (checks.MLP_MISTAKES, checks.MLP_HINTS),
        (checks.IMAGE_MISTAKES, checks.IMAGE_HINTS),
        (checks.TEXT_MISTAKES, checks.TEXT_HINTS),
        (checks.LOSS_MISTAKES, checks.LOSS_HINTS),
        (checks.ZERO_SHOT_MISTAKES, checks.ZERO_SHOT_HINTS),
    ):
        assert len(mistakes) >= 2 and len(hints) == 3
        code = ("=", "torch.", "F.", "self.", "[")
        assert not any(token in hints[0] for token in code), hints[0]


# --- wrong and untouched answers ---------------------------------------------------


def test_a_wrong_answer_forgets_a_kept_one(capsys):
    assert checks.check_image_encoder(image_forward)
    assert "ShapesImageEncoder.forward" in answers.kept("clip")
    assert not checks.check_image_encoder(lambda self, pixels: self.layers(pixels))
    assert answers.kept("clip") == {}


@pytest.mark.parametrize(
    "check",
    [
        checks.check_mlp,
        checks.check_image_encoder,
        checks.check_encode_text,
        checks.check_contrastive_step,
        checks.check_zero_shot,
    ],
)
def test_unsolved_exercises_get_a_reminder_and_no_hint(check, capsys, answers_home):
    verdict = check(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "Hint" not in out
    assert not answers_home.exists() or not any(answers_home.iterdir())
