"""Checks for chapter 03's exercises on the text encoder's MLP and the tiny
contrastive CLIP: the image tower's forward, `encode_text`, the training step's
loss and zero-shot classification.

The references are sdlearn.clip's own `CLIPMLP`, `ShapesImageEncoder`,
`ContrastiveCLIP.encode_text`, `ContrastiveLoss` and `zero_shot_classify`, run
on seeded weights; the learner's function runs on the same module, so the same
weights and inputs must give the same numbers.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sdlearn.checks import Case, Verdict, check, compare_values, randn, seeded
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.checks.clip import LOGITS_CONFIG, Inputs, run_on
from sdlearn.clip import (
    CLIPMLP,
    CLIPTextConfig,
    ContrastiveCLIP,
    ContrastiveLoss,
    ShapesImageEncoder,
    clip_loss,
    zero_shot_classify,
)

# --- Exercise 03.6: the MLP ----------------------------------------------------------


def _mlp_cases() -> list[Case]:
    cases = []
    for seed, (D, hidden, shape) in enumerate(((64, 160, (2, 7)), (32, 80, (3,)))):
        config = CLIPTextConfig(
            hidden_size=D, intermediate_size=hidden, num_attention_heads=2
        )
        mlp = seeded(CLIPMLP(config), seed)
        x = 2 * randn(*shape, D, seed=seed + 30)  # large enough that GELUs differ
        inputs = Inputs(f"a CLIPMLP {D} -> {hidden} -> {D}, x of shape {(*shape, D)}")
        inputs.args = (mlp, x)
        with torch.no_grad():
            cases.append(Case((inputs,), mlp(x)))
    return cases


def _mlp_variant(inputs: Inputs, activation: Callable) -> torch.Tensor:
    mlp, x = inputs.args
    with torch.no_grad():
        return mlp.fc2(activation(mlp.fc1(x)))


MLP_MISTAKES = {
    "the exact GELU (F.gelu): CLIP was trained with quick-GELU, h * "
    "sigmoid(1.702 * h), and its weights only give its numbers with it": (
        functools.partial(_mlp_variant, activation=F.gelu)
    ),
    "ReLU: CLIP's activation is quick-GELU, h * sigmoid(1.702 * h)": (
        functools.partial(_mlp_variant, activation=F.relu)
    ),
    "sigmoid(1.702 * h) alone is a gate, not the activation: multiply it by h": (
        functools.partial(_mlp_variant, activation=lambda h: torch.sigmoid(1.702 * h))
    ),
    "SiLU, h * sigmoid(h): quick-GELU scales the input of the sigmoid by "
    "1.702": functools.partial(_mlp_variant, activation=F.silu),
}

MLP_HINTS = (
    "Widen, activate, narrow: the first linear layer, then quick-GELU on each "
    "number, then the second linear layer.",
    "self.fc1 maps D to the intermediate width, self.fc2 back to D; quick-GELU "
    "of h is h times the sigmoid of 1.702 h.",
    "h = self.fc1(x); h = h * torch.sigmoid(1.702 * h); return self.fc2(h).",
)


def check_mlp(fn: Callable) -> Verdict:
    """Exercise 03.6: the forward of `CLIPMLP`, written as a function taking
    `self` (kept as "clip:CLIPMLP.forward")."""
    return check(
        "Exercise 03.6",
        run_on(fn),
        _mlp_cases(),
        hints=MLP_HINTS,
        mistakes=MLP_MISTAKES,
        keep="clip:CLIPMLP.forward",
    )


# --- Exercise 03.10: the image tower's forward -------------------------------------


def _image_cases() -> list[Case]:
    cases = []
    for seed, (channels, shape) in enumerate(
        (((8, 16), (2, 3, 16, 16)), ((8, 16, 24), (3, 3, 24, 32)))
    ):
        encoder = seeded(ShapesImageEncoder(channels), seed)
        pixels = randn(*shape, seed=seed + 40)  # (B, 3, H, W)
        inputs = Inputs(
            f"a ShapesImageEncoder with channels {channels}, pixels of shape {shape}"
        )
        inputs.args = (encoder, pixels)
        with torch.no_grad():
            cases.append(Case((inputs,), encoder(pixels)))
    return cases


def _image_variant(inputs: Inputs, pool: str) -> torch.Tensor:
    encoder, pixels = inputs.args
    with torch.no_grad():
        x = encoder.layers(pixels)  # (B, C, h, w)
        return x.amax(dim=(2, 3)) if pool == "max" else x.sum(dim=(2, 3))


IMAGE_MISTAKES = {
    "the largest value of each channel (max pooling); the tower averages over "
    "the positions, x.mean over H and W": functools.partial(_image_variant, pool="max"),
    "the sum over the positions: it grows with the image's size; take the "
    "mean": functools.partial(_image_variant, pool="sum"),
}

IMAGE_HINTS = (
    "The convolutions give a small map of C channels; one vector per image is "
    "the average of that map over its positions.",
    "self.layers(pixels) is (B, C, h, w): average over the last two axes.",
    "return self.layers(pixels).mean(dim=(2, 3)).",
)


def check_image_encoder(fn: Callable) -> Verdict:
    """Exercise 03.10: the forward of `ShapesImageEncoder`, written as a function
    taking `self` (kept as "clip:ShapesImageEncoder.forward")."""
    return check(
        "Exercise 03.10",
        run_on(fn),
        _image_cases(),
        hints=IMAGE_HINTS,
        mistakes=IMAGE_MISTAKES,
        keep="clip:ShapesImageEncoder.forward",
    )


# --- Exercise 03.11: a caption's embedding ----------------------------------------

EOS = LOGITS_CONFIG.text_config.eos_token_id  # 99 in the cases


def _toy_ids(B: int, T: int, seed: int) -> torch.Tensor:
    """(B, T) ids below the end token, each row ended and padded by it."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, EOS, (B, T), generator=g)  # (B, T)
    ends = torch.randint(2, T, (B,), generator=g)  # (B,)
    input_ids[torch.arange(T) >= ends[:, None]] = EOS  # the end token, padding
    return input_ids


def _clip_model(seed: int, log_scale: float = math.log(1 / 0.07)) -> ContrastiveCLIP:
    model = seeded(ContrastiveCLIP(LOGITS_CONFIG), seed)
    with torch.no_grad():
        model.logit_scale.fill_(log_scale)
    return model


def _text_cases() -> list[Case]:
    cases = []
    for seed, (B, T) in enumerate(((3, 12), (4, 9))):
        model = _clip_model(seed)
        input_ids = _toy_ids(B, T, seed + 50)
        inputs = Inputs(
            f"a tiny CLIP (text width 32, E = 16, end token {EOS}), input_ids "
            f"{input_ids.tolist()}"
        )
        inputs.args = (model, input_ids)
        with torch.no_grad():
            cases.append(Case((inputs,), model.encode_text(input_ids)))
    return cases


def _text_variant(inputs: Inputs, mistake: str) -> torch.Tensor:
    model, input_ids = inputs.args
    text = model.text_model
    if mistake == "cut short":  # the end token is cut away
        T = int((input_ids == EOS).int().argmax(dim=-1).max())
        input_ids = input_ids[:, :T]
    with torch.no_grad():
        pooled = text.pooled(input_ids, text(input_ids))  # (B, D)
        if mistake == "normalised first":
            return model.text_projection(F.normalize(pooled, dim=-1))
        if mistake == "last position":
            pooled = text(input_ids)[:, -1]  # (B, D)
        embeds = model.text_projection(pooled)  # (B, E)
        return embeds if mistake == "not normalised" else F.normalize(embeds, dim=-1)


TEXT_MISTAKES = {
    "the embeddings are not of unit length: F.normalize(..., dim=-1) after the "
    "projection, so that dot products are cosines": functools.partial(
        _text_variant, mistake="not normalised"
    ),
    "you normalised before the projection: project first, then normalise, so "
    "that the embedding itself has unit length": functools.partial(
        _text_variant, mistake="normalised first"
    ),
    "the cut dropped the end token: keep positions up to and including the "
    "latest first end token of the rows (+ 1)": functools.partial(
        _text_variant, mistake="cut short"
    ),
    "you took the last position, not the pooled vector at the first end token: "
    "self.text_model.pooled(input_ids, last_hidden_state)": functools.partial(
        _text_variant, mistake="last position"
    ),
}

TEXT_HINTS = (
    "Run the text encoder, take one vector per caption where its end token "
    "first appears, project it to the shared space and give it unit length.",
    "self.text_model(input_ids) is (B, T, D); self.text_model.pooled(input_ids, "
    "that) is (B, D); self.text_projection maps it to (B, E); F.normalize with "
    "dim=-1. Optionally cut input_ids to the first T columns, T one past the "
    "latest first end token.",
    "is_eos = input_ids == self.text_model.config.eos_token_id; T = "
    "int(is_eos.int().argmax(dim=-1).max()) + 1; input_ids = input_ids[:, :T]; "
    "hidden = self.text_model(input_ids); pooled = self.text_model.pooled("
    "input_ids, hidden); return F.normalize(self.text_projection(pooled), dim=-1).",
)


def check_encode_text(fn: Callable) -> Verdict:
    """Exercise 03.11: `ContrastiveCLIP.encode_text`, written as a function
    taking `self` (kept as "clip:ContrastiveCLIP.encode_text")."""
    return check(
        "Exercise 03.11",
        run_on(fn),
        _text_cases(),
        hints=TEXT_HINTS,
        mistakes=TEXT_MISTAKES,
        keep="clip:ContrastiveCLIP.encode_text",
    )


# --- Exercise 03.14: the training step's loss --------------------------------------


class ToyTokenizer:
    """Captions -> (B, 12) ids for the cases' model: a word's id is the sum of
    its characters' codes modulo the end token, then the end token as padding.
    One caption alone is a batch of one, as the real tokenizer takes it."""

    def __call__(self, captions: str | Sequence[str]) -> torch.Tensor:
        if isinstance(captions, str):
            captions = [captions]
        ids = torch.full((len(captions), 12), EOS, dtype=torch.long)  # (B, T)
        for row, caption in enumerate(captions):
            words = [sum(map(ord, word)) % EOS for word in caption.split()][:11]
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        return ids

    def __repr__(self) -> str:
        return "a toy tokenizer"


CAPTIONS = [
    "a red circle",
    "a small blue square on the left",
    "a yellow triangle at the top",
    "there is a green circle",
    "a purple square",
]


def _loss_cases() -> list[Case]:
    cases = []
    for seed, B in enumerate((4, 5)):
        step = ContrastiveLoss(_clip_model(seed, math.log(20.0)), ToyTokenizer())
        g = torch.Generator().manual_seed(seed + 60)
        batch = {
            "pixel_values": torch.rand(B, 3, 16, 16, generator=g) * 2 - 1,
            "caption": CAPTIONS[:B],
        }
        inputs = Inputs(f"a ContrastiveLoss on a tiny CLIP, a batch of {B} pairs")
        inputs.args = (step, batch)
        loss, logs = step(batch)
        cases.append(Case((inputs,), (loss.detach(), logs["temperature"])))
    return cases


def _step(fn: Callable) -> Callable:
    """The learner's step on the case's ContrastiveLoss, as (loss, temperature)."""

    @functools.wraps(fn)
    def run(inputs: Inputs) -> Any:
        step, batch = inputs.args
        result = types.MethodType(fn, step)(batch)
        if isinstance(result, tuple) and len(result) == 2:
            loss, logs = result
            if isinstance(logs, dict) and "temperature" in logs:
                return (loss, logs["temperature"])
        return result

    return run


def _compare_step(actual: Any, case: Case) -> str | None:
    if not (isinstance(actual, tuple) and len(actual) == 2):
        return "expected (loss, {'temperature': ...}): a tuple of the loss and a dict"
    problem = compare_values(actual, case.expected, 1e-5, 1.3e-6)
    if problem:
        return problem
    if not actual[0].requires_grad:
        return "the loss carries no gradient: the training loop must backpropagate it"
    if actual[1].requires_grad:
        return "the temperature is logged, not trained through: detach it"
    return None


def _loss_variant(inputs: Inputs, mistake: str) -> tuple[torch.Tensor, torch.Tensor]:
    step, batch = inputs.args
    model = step.model
    with torch.no_grad():
        logits = model(batch["pixel_values"], step.tokenizer(batch["caption"]))
        targets = torch.arange(len(logits))
        if mistake == "one way":
            loss = F.cross_entropy(logits, targets)
        else:
            loss = clip_loss(logits)
        temperature = model.logit_scale if mistake == "log" else model.scale()
        return loss, temperature.detach()


LOSS_MISTAKES = {
    "the loss runs one way only (images pick captions): use the symmetric "
    "InfoNCE loss, clip_loss(logits)": functools.partial(
        _loss_variant, mistake="one way"
    ),
    "the temperature logged is self.model.logit_scale, its log; log "
    "self.model.scale(), detached": functools.partial(_loss_variant, mistake="log"),
}

LOSS_HINTS = (
    "Tokenise the batch's captions, let the model compare every image with "
    "every caption, and score that with the contrastive loss. Return the loss "
    "and a dict of what to log.",
    "batch['pixel_values'] is (B, 3, H, W); self.tokenizer(list(batch['caption'])) "
    "is (B, T), moved to the pixels' device; self.model(pixels, ids) is (B, B); "
    "clip_loss of it is the loss; log {'temperature': self.model.scale().detach()}.",
    "pixels = batch['pixel_values']; input_ids = self.tokenizer(list(batch["
    "'caption'])).to(pixels.device); loss = clip_loss(self.model(pixels, "
    "input_ids)); return loss, {'temperature': self.model.scale().detach()}.",
)


def check_contrastive_step(fn: Callable) -> Verdict:
    """Exercise 03.14: `ContrastiveLoss.forward`, written as a function taking
    `self` (kept as "clip:ContrastiveLoss.forward")."""
    return check(
        "Exercise 03.14",
        _step(fn),
        _loss_cases(),
        compare=_compare_step,
        hints=LOSS_HINTS,
        mistakes=LOSS_MISTAKES,
        keep="clip:ContrastiveLoss.forward",
    )


# --- Exercise 03.15: zero-shot classification --------------------------------------


def _zero_shot_cases() -> list[Case]:
    cases = []
    # as many images as prompts first, so that a wrong axis still has the shape
    for seed, (B, K) in enumerate(((4, 4), (6, 3))):
        model = _clip_model(seed + 2)
        g = torch.Generator().manual_seed(seed + 70)
        pixels = torch.rand(B, 3, 16, 16, generator=g) * 2 - 1  # (B, 3, H, W)
        inputs = Inputs(f"a tiny CLIP, {B} images of 16x16, the prompts {CAPTIONS[:K]}")
        inputs.args = (model, ToyTokenizer(), pixels, CAPTIONS[:K])
        cases.append(Case((inputs,), zero_shot_classify(*inputs.args)))
    return cases


def _zero_shot_variant(inputs: Inputs, mistake: str) -> torch.Tensor:
    model, tokenizer, pixels, prompts = inputs.args
    with torch.no_grad():
        text_embeds = model.encode_text(tokenizer(list(prompts)))  # (K, E)
        similarity = model.encode_image(pixels) @ text_embeds.T  # (B, K)
        if mistake == "axis":
            return similarity.argmax(dim=0)
        if mistake == "argmin":
            return similarity.argmin(dim=-1)
        return similarity.argmax(dim=-1)


ZERO_SHOT_MISTAKES = {
    "the argmax ran over the images (axis 0): for each image, take the best "
    "prompt, the argmax over the prompts' axis": functools.partial(
        _zero_shot_variant, mistake="axis"
    ),
    "argmin picks the least similar prompt: take the argmax of the cosine "
    "similarities": functools.partial(_zero_shot_variant, mistake="argmin"),
}

ZERO_SHOT_HINTS = (
    "Embed the prompts and the images in the shared space, compare every image "
    "with every prompt, and name each image by its most similar prompt.",
    "tokenizer(list(prompts)) is (K, T), model.encode_text of it (K, E); "
    "model.encode_image(pixels) is (B, E). Their (B, K) dot products are "
    "cosines; the argmax along the prompts' axis is (B,).",
    "text_embeds = model.encode_text(tokenizer(list(prompts)).to(pixels.device)); "
    "image_embeds = model.encode_image(pixels); return (image_embeds @ "
    "text_embeds.T).argmax(dim=-1).",
)


def check_zero_shot(fn: Callable) -> Verdict:
    """Exercise 03.15: zero_shot_classify(model, tokenizer, pixels, prompts),
    as the package's (kept as "clip:zero_shot_classify")."""

    @functools.wraps(fn)
    def run(inputs: Inputs) -> Any:
        with torch.no_grad():
            return fn(*inputs.args)

    return check(
        "Exercise 03.15",
        run,
        _zero_shot_cases(),
        hints=ZERO_SHOT_HINTS,
        mistakes=ZERO_SHOT_MISTAKES,
        keep="clip:zero_shot_classify",
    )
