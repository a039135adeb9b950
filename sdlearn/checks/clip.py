"""Checks for chapter 03's exercises: the text encoder's layer and its forward
pass, the pooled vector, the tiny CLIP's logits, CLIP's contrastive loss (the
tokenizer's are in sdlearn.checks.tokenizer, the MLP's and the tiny CLIP's
towers, step and zero-shot classification in sdlearn.checks.contrastive).

The references are sdlearn's own `bpe`, `CLIPEncoderLayer`, `CLIPTextModel`,
`ContrastiveCLIP` and `clip_loss`, which the test suite holds to transformers'
tokenizer and text encoder and to the InfoNCE formula. The modules are checked
with seeded weights: the learner's forward runs on the same module
(`types.MethodType`), so the same weights and inputs must give the same numbers.

Every check names the usual mistakes: each is a function computing what that
mistake gives, and a wrong answer equal to one of them is named.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sdlearn.checks import Case, Verdict, check, randn, seeded
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.checks.tokenizer import (  # noqa: F401  (the chapter calls them here)
    check_bpe,
    check_bytes_to_unicode,
    check_clean_text,
    check_encode_batch,
    check_tokenize,
)
from sdlearn.clip import (
    CLIPEncoderLayer,
    CLIPTextConfig,
    CLIPTextModel,
    ContrastiveCLIP,
    ContrastiveCLIPConfig,
    clip_loss,
    quick_gelu,
)


class Inputs:
    """The arguments of one case, described in a few words when a case fails
    (a module's repr is a page)."""

    def __init__(self, description: str, *args: Any) -> None:
        self.description = description
        self.args = args

    def __repr__(self) -> str:
        return self.description


# --- Exercise 03.7: the text encoder's layer ----------------------------------------

# (config, B, T, lengths of the prompts or None for no padding mask, seed)
LAYER_CASES = [
    (CLIPTextConfig.tiny(), 2, 7, [4, 7], 0),
    (CLIPTextConfig.tiny(), 3, 5, None, 1),
    (
        CLIPTextConfig(hidden_size=32, intermediate_size=80, num_attention_heads=2),
        2,
        9,
        [1, 6],
        2,
    ),
]


def _layer_cases() -> list[Case]:
    cases = []
    for config, B, T, lengths, seed in LAYER_CASES:
        layer = seeded(CLIPEncoderLayer(config), seed)
        x = randn(B, T, config.hidden_size, seed=seed + 10)  # (B, T, D)
        if lengths is None:
            mask, padding = None, "no attention_mask"
        else:
            mask = torch.arange(T) < torch.tensor(lengths)[:, None]  # (B, T) bool
            padding = f"attention_mask of {lengths} tokens, the rest padding"
        inputs = Inputs(
            f"a CLIPEncoderLayer of width D = {config.hidden_size} with "
            f"{config.num_attention_heads} heads, x of shape "
            f"{(B, T, config.hidden_size)}, {padding}",
            layer,
            x,
            mask,
        )
        with torch.no_grad():
            expected = layer(x, mask)
        cases.append(Case((inputs,), expected))
    return cases


def run_on(fn: Callable) -> Callable:
    """The learner's forward, run as a method of the case's module."""

    @functools.wraps(fn)
    def run(inputs: Inputs) -> Any:
        module, *args = inputs.args
        with torch.no_grad():
            return types.MethodType(fn, module)(*args)

    return run


def _layer_variant(
    inputs: Inputs,
    norm: str = "pre",
    allowed: str = "past",
    padding: str = "keys",
    activation: Callable = quick_gelu,
) -> torch.Tensor:
    """What a CLIPEncoderLayer forward with one mistake returns."""
    layer, x, attention_mask = inputs.args
    B, T, _ = x.shape
    ones = torch.ones(T, T, dtype=torch.bool)
    mask = {"past": ones.tril(), "future": ones.triu(), "all": ones}[allowed]
    mask = mask.expand(B, 1, T, T)  # (B, 1, T, T)
    if attention_mask is not None and padding == "keys":
        mask = mask & attention_mask[:, None, None, :]
    elif attention_mask is not None and padding == "queries":
        mask = mask & attention_mask[:, None, :, None]

    def mlp(h: torch.Tensor) -> torch.Tensor:
        return layer.mlp.fc2(activation(layer.mlp.fc1(h)))

    with torch.no_grad():
        if norm == "pre":
            x = x + layer.self_attn(layer.layer_norm1(x), attention_mask=mask)
            return x + mlp(layer.layer_norm2(x))
        if norm == "post":
            x = layer.layer_norm1(x + layer.self_attn(x, attention_mask=mask))
            return layer.layer_norm2(x + mlp(x))
        # the residual taken after the norm
        h = layer.layer_norm1(x)
        x = h + layer.self_attn(h, attention_mask=mask)
        h = layer.layer_norm2(x)
        return h + mlp(h)


LAYER_MISTAKES = {
    "no causal mask: every token sees the tokens after it. Query i may attend "
    "to keys 0..i only: a (T, T) boolean mask, True on and below the "
    "diagonal": functools.partial(_layer_variant, allowed="all"),
    "the causal mask is upside down: it lets token i see the tokens after it "
    "(triu) instead of the ones before it (tril)": functools.partial(
        _layer_variant, allowed="future"
    ),
    "the padding hides queries (axis 2), not keys (axis 3): padding must not be "
    "looked at, but a padding position still computes an output": functools.partial(
        _layer_variant, padding="queries"
    ),
    "the padding mask was ignored: combine attention_mask (B, T), reshaped to "
    "(B, 1, 1, T), with the causal mask": functools.partial(
        _layer_variant, padding="none"
    ),
    "post-norm: you normalised the sums (x + attention, x + MLP); CLIP is "
    "pre-norm, x + attention(layer_norm1(x)), so the residual path is never "
    "normalised inside the block": functools.partial(_layer_variant, norm="post"),
    "the residual was taken from the normalised input: add the branch to x "
    "itself, x + attention(layer_norm1(x)), not to layer_norm1(x)": (
        functools.partial(_layer_variant, norm="residual after the norm")
    ),
    "the exact GELU (F.gelu): CLIP was trained with quick-GELU, "
    "h * sigmoid(1.702 * h), and its weights only give its numbers with "
    "it": functools.partial(_layer_variant, activation=F.gelu),
}

LAYER_HINTS = (
    "Two branches, each added to x: attention, then the MLP. Each branch reads "
    "a normalised copy of x (pre-norm), and the attention may only look at the "
    "tokens before and at each position, and not at padding.",
    "The mask is boolean, True where query i (axis 2) may see key j (axis 3): "
    "j <= i, and key j is not padding. Give self.self_attn a mask of shape "
    "(B, 1, T, T) (the 1 broadcasts over the heads) as attention_mask=. The MLP "
    "is fc2(quick_gelu(fc1(h))) with quick_gelu(h) = h * sigmoid(1.702 h).",
    "allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T); if "
    "attention_mask is not None: allowed = allowed & attention_mask[:, None, "
    "None, :]; x = x + self.self_attn(self.layer_norm1(x), "
    "attention_mask=allowed); h = self.mlp.fc1(self.layer_norm2(x)); return x + "
    "self.mlp.fc2(h * torch.sigmoid(1.702 * h)).",
)


def check_encoder_layer(fn: Callable) -> Verdict:
    """Exercise 03.7: the forward of `CLIPEncoderLayer`, written as a function
    taking `self` (kept as "clip:CLIPEncoderLayer.forward")."""
    return check(
        "Exercise 03.7",
        run_on(fn),
        _layer_cases(),
        hints=LAYER_HINTS,
        mistakes=LAYER_MISTAKES,
        keep="clip:CLIPEncoderLayer.forward",
    )


# --- Exercise 03.8: the text encoder ----------------------------------------------


def _encoder_cases() -> list[Case]:
    cases = []
    # (seed, ids per row before the padding, or None for no attention_mask)
    for seed, lengths in ((0, None), (1, [3, 9, 5])):
        config = CLIPTextConfig(
            vocab_size=100,
            max_position_embeddings=12,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            eos_token_id=99,
        )
        model = seeded(CLIPTextModel(config), seed)
        g = torch.Generator().manual_seed(seed + 20)
        B, T = (2, 12) if lengths is None else (3, 10)
        input_ids = torch.randint(0, 99, (B, T), generator=g)  # (B, T)
        if lengths is None:
            mask, padding = None, "no attention_mask"
        else:
            mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()  # (B, T)
            padding = f"an attention_mask of 1s and 0s ({lengths} tokens)"
        inputs = Inputs(
            f"a CLIPTextModel of {config.num_hidden_layers} layers, width "
            f"{config.hidden_size}, input_ids of shape {(B, T)}, {padding}",
            model,
            input_ids,
            mask,
        )
        with torch.no_grad():
            expected = model(input_ids, mask)
        cases.append(Case((inputs,), expected))
    return cases


def _encoder_variant(
    inputs: Inputs,
    positions: bool = True,
    final_norm: bool = True,
    padding: bool = True,
) -> torch.Tensor:
    """What a CLIPTextModel forward with one mistake returns."""
    model, input_ids, attention_mask = inputs.args
    T = input_ids.shape[1]
    with torch.no_grad():
        x = model.embeddings.token_embedding(input_ids)  # (B, T, D)
        if positions:
            x = x + model.embeddings.position_embedding(torch.arange(T))
        mask = attention_mask.bool() if padding and attention_mask is not None else None
        for layer in model.encoder.layers:
            x = layer(x, mask)
        return model.final_layer_norm(x) if final_norm else x


ENCODER_MISTAKES = {
    "no position embeddings: without them attention cannot tell 'a red circle "
    "left of a blue square' from the same words in another order; add "
    "position_embedding(torch.arange(T))": functools.partial(
        _encoder_variant, positions=False
    ),
    "no final LayerNorm: pre-norm blocks add to x without normalising it, so "
    "the encoder normalises once at the end": functools.partial(
        _encoder_variant, final_norm=False
    ),
    "the padding mask was not passed to the layers: give each layer "
    "attention_mask as booleans (True = a token)": functools.partial(
        _encoder_variant, padding=False
    ),
}

ENCODER_HINTS = (
    "Each token's vector is its token embedding plus its position's embedding; "
    "then every layer in turn; then one LayerNorm at the end.",
    "self.embeddings.token_embedding(input_ids) is (B, T, D); "
    "self.embeddings.position_embedding(torch.arange(T)) is (T, D) and "
    "broadcasts. Call each layer of self.encoder.layers as layer(x, mask), with "
    "the mask as booleans (or None), and finish with self.final_layer_norm.",
    "mask = None if attention_mask is None else attention_mask.bool(); x = "
    "self.embeddings.token_embedding(input_ids) + "
    "self.embeddings.position_embedding(torch.arange(input_ids.shape[1])); for "
    "layer in self.encoder.layers: x = layer(x, mask); return "
    "self.final_layer_norm(x).",
)


def check_text_encoder(fn: Callable) -> Verdict:
    """Exercise 03.8: the forward of `CLIPTextModel`, written as a function
    taking `self` (kept as "clip:CLIPTextModel.forward")."""
    return check(
        "Exercise 03.8",
        run_on(fn),
        _encoder_cases(),
        hints=ENCODER_HINTS,
        mistakes=ENCODER_MISTAKES,
        keep="clip:CLIPTextModel.forward",
    )


# --- Exercise 03.9: the pooled vector ---------------------------------------------

# a model whose end token (50) is not the highest id, as in SD 1.x's older config
POOLED_CONFIG = CLIPTextConfig(
    vocab_size=100,
    max_position_embeddings=10,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    eos_token_id=50,
)
S, E = 49, 50  # the start and end tokens' ids in the cases
POOLED_IDS = [
    # padded with 0 (SD 2.x's "!"); an end token typed in the prompt; one prompt
    # fills every position
    [[S, 60, E, 9, E, 0, 0, 0, 0, 0], [S, 1, 2, 3, 4, 5, 6, 7, 8, E]],
    # padded with the end token (SD 1.x); ids above the end token's
    [[S, 7, 81, 93, E, E, E, E, E, E], [S, 99, 12, 64, 77, 3, E, E, E, E]],
    # a row without an end token: transformers takes position 0
    [[S, 5, 6, 7, 8, 9, 10, 11, 12, 13], [S, 88, E, E, E, E, E, E, E, E]],
]


def _pooled_cases() -> list[Case]:
    model = CLIPTextModel(POOLED_CONFIG)
    cases = []
    for seed, rows in enumerate(POOLED_IDS):
        input_ids = torch.tensor(rows)  # (B, T)
        hidden = randn(*input_ids.shape, POOLED_CONFIG.hidden_size, seed=seed)
        inputs = Inputs(
            f"input_ids {rows} (the end token is {E}), a last_hidden_state of "
            f"shape {tuple(hidden.shape)}",
            model,
            input_ids,
            hidden,
        )
        cases.append(Case((inputs,), model.pooled(input_ids, hidden)))
    return cases


def _pooled_at(inputs: Inputs, where: str) -> torch.Tensor:
    """What a pooled() with one mistake returns."""
    _, input_ids, hidden = inputs.args
    B, T = input_ids.shape
    rows = torch.arange(B)
    if where == "last":
        return hidden[:, -1]
    if where == "first":
        return hidden[:, 0]
    if where == "highest id":
        return hidden[rows, input_ids.argmax(dim=-1)]
    # the last end token of each row
    is_eos = (input_ids == E).int() * torch.arange(1, T + 1)  # (B, T)
    return hidden[rows, is_eos.argmax(dim=-1)]


POOLED_MISTAKES = {
    "you took the last position; the pooled vector is at each row's first "
    "end token, which moves with the prompt's length": functools.partial(
        _pooled_at, where="last"
    ),
    "you took the last end token; SD 1.x pads with the end token too, so take "
    "the first one, the prompt's own": functools.partial(_pooled_at, where="eos"),
    "you took the position of the highest id: that is the end token only when "
    "the end token has the highest id (49407 in CLIP's vocabulary); compare "
    "input_ids with self.config.eos_token_id": functools.partial(
        _pooled_at, where="highest id"
    ),
    "you took position 0, the start token: it has seen nothing of the prompt "
    "under the causal mask": functools.partial(_pooled_at, where="first"),
}

POOLED_HINTS = (
    "For each row, find where its end token first appears, and take the hidden "
    "state at that position: one vector of width D per prompt.",
    "input_ids == self.config.eos_token_id is a (B, T) boolean table; argmax "
    "along T of it, as integers, gives the first True (and 0 when there is "
    "none). Then index the hidden states with a row index and that position.",
    "first = (input_ids == self.config.eos_token_id).int().argmax(dim=-1); "
    "return last_hidden_state[torch.arange(input_ids.shape[0]), first].",
)


def check_pooled(fn: Callable) -> Verdict:
    """Exercise 03.9: `CLIPTextModel.pooled`, written as a function taking
    `self` (kept as "clip:CLIPTextModel.pooled")."""
    return check(
        "Exercise 03.9",
        run_on(fn),
        _pooled_cases(),
        hints=POOLED_HINTS,
        mistakes=POOLED_MISTAKES,
        keep="clip:CLIPTextModel.pooled",
    )


# --- Exercise 03.12: the tiny CLIP's logits ---------------------------------------

# a tiny CLIP of the chapter's shape, smaller: 16x16 images, a vocabulary of 100
LOGITS_CONFIG = ContrastiveCLIPConfig(
    text_config=CLIPTextConfig(
        vocab_size=100,
        max_position_embeddings=12,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        eos_token_id=99,
    ),
    image_channels=(8, 16),
    projection_dim=16,
)


def _logits_cases() -> list[Case]:
    cases = []
    # (seed, B, the temperature's log): CLIP's start, and one beyond the clip at 100
    for seed, B, log_scale in ((0, 4, math.log(1 / 0.07)), (1, 3, math.log(150.0))):
        model = seeded(ContrastiveCLIP(LOGITS_CONFIG), seed)
        with torch.no_grad():
            model.logit_scale.fill_(log_scale)
        g = torch.Generator().manual_seed(seed + 20)
        pixels = torch.rand(B, 3, 16, 16, generator=g) * 2 - 1  # (B, 3, H, W)
        input_ids = torch.randint(0, 99, (B, 12), generator=g)  # (B, T)
        ends = torch.randint(2, 12, (B,), generator=g)  # (B,)
        input_ids[torch.arange(12) >= ends[:, None]] = 99  # the end token, padding
        inputs = Inputs(
            f"a tiny CLIP with temperature exp({log_scale:.2f}), {B} images of "
            f"16x16 and their {B} captions' ids",
            model,
            pixels,
            input_ids,
        )
        with torch.no_grad():
            expected = model(pixels, input_ids)
        cases.append(Case((inputs,), expected))
    return cases


def _logits_variant(
    inputs: Inputs,
    normalise: bool = True,
    temperature: str = "clipped",
    transposed: bool = False,
) -> torch.Tensor:
    """What a ContrastiveCLIP forward with one mistake returns."""
    model, pixels, input_ids = inputs.args
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixels))  # (B, E)
        if normalise:
            image_embeds = F.normalize(image_embeds, dim=-1)
        text_embeds = model.encode_text(input_ids)  # (B, E)
        scale = {
            "clipped": model.scale(),
            "none": torch.tensor(1.0),
            "log": model.logit_scale,
            "not clipped": model.logit_scale.exp(),
        }[temperature]
        logits = scale * image_embeds @ text_embeds.T  # (B, B)
        return logits.T if transposed else logits


LOGITS_MISTAKES = {
    "the image embeddings are not normalised: divide each by its length "
    "(F.normalize(..., dim=-1)), so that a dot product is a cosine "
    "similarity": functools.partial(_logits_variant, normalise=False),
    "no temperature: the cosines, in [-1, 1], are multiplied by self.scale() "
    "so that the softmax can become confident": functools.partial(
        _logits_variant, temperature="none"
    ),
    "you multiplied by self.logit_scale, the temperature's log; the "
    "temperature is its exp, clipped: self.scale()": functools.partial(
        _logits_variant, temperature="log"
    ),
    "the temperature is not clipped at 100: self.scale() clips it, so the "
    "logits never grow past 100 times a cosine": functools.partial(
        _logits_variant, temperature="not clipped"
    ),
    "the logits are transposed: row i must be image i against every caption, "
    "image_embeds @ text_embeds.T": functools.partial(_logits_variant, transposed=True),
}

LOGITS_HINTS = (
    "Both towers end in a projection to the shared space and a normalisation "
    "to unit length; then every image meets every caption, and a learned "
    "temperature sharpens the result.",
    "Images: the CNN self.vision_model, then self.visual_projection, then "
    "F.normalize over the last axis, (B, E). Captions: self.encode_text, (B, "
    "E). Row i of the result is image i against every caption, times "
    "self.scale().",
    "image_embeds = F.normalize(self.visual_projection(self.vision_model(pixels)),"
    " dim=-1); text_embeds = self.encode_text(input_ids); return self.scale() * "
    "image_embeds @ text_embeds.T.",
)


def check_clip_logits(fn: Callable) -> Verdict:
    """Exercise 03.12: the forward of `ContrastiveCLIP`, written as a function
    taking `self` (kept as "clip:ContrastiveCLIP.forward")."""
    return check(
        "Exercise 03.12",
        run_on(fn),
        _logits_cases(),
        hints=LOGITS_HINTS,
        mistakes=LOGITS_MISTAKES,
        keep="clip:ContrastiveCLIP.forward",
    )


# --- Exercise 03.13: the contrastive loss ------------------------------------------

# (B, seed): B = 1 has loss 0
INFO_NCE_SIZES = [(4, 0), (8, 1), (5, 2), (1, 3)]


def _cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.arange(logits.shape[0]))


INFO_NCE_MISTAKES = {
    "only the images pick their captions (the rows); CLIP's loss also has the "
    "captions pick their images (the columns, logits.T), and averages the "
    "two": _cross_entropy,
    "only the captions pick their images (the columns); CLIP's loss also has "
    "the images pick their captions (the rows), and averages the "
    "two": lambda logits: _cross_entropy(logits.T),
    "the sum of the two directions; CLIP's loss is their mean": lambda logits: (
        _cross_entropy(logits) + _cross_entropy(logits.T)
    ),
}

INFO_NCE_HINTS = (
    "It is two classifications: each image picks its caption among the B "
    "captions, and each caption its image among the B images. The right answer "
    "for pair i is i.",
    "The targets are torch.arange(B). One cross-entropy over the rows, one over "
    "the columns (transpose the logits), and the mean of the two.",
    "targets = torch.arange(B); return (F.cross_entropy(logits, targets) + "
    "F.cross_entropy(logits.T, targets)) / 2.",
)


def check_info_nce(fn: Callable) -> Verdict:
    """Exercise 03.13: the symmetric InfoNCE loss of a (B, B) logits matrix
    (kept as "clip:clip_loss")."""
    cases = [Case((torch.zeros(3, 3),), clip_loss(torch.zeros(3, 3)))]
    for B, seed in INFO_NCE_SIZES:
        # not symmetric, and a diagonal that stands out, as after some training
        logits = 5 * randn(B, B, seed=seed) + 4 * torch.eye(B)
        cases.append(Case((logits,), clip_loss(logits)))
    return check(
        "Exercise 03.13",
        fn,
        cases,
        hints=INFO_NCE_HINTS,
        mistakes=INFO_NCE_MISTAKES,
        keep="clip:clip_loss",
    )
