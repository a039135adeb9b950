"""Chapter 04's spatial transformer checks (GEGLU, feed-forward, spatial
transformer): right answers pass and are kept, the usual mistakes are named, an
unsolved exercise gets no hint, a wrong answer is not kept."""

from functools import partial

import pytest
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn import spatial_transformer as st
from sdlearn.checks import spatial_transformer as checks
from tests.check_contract import (
    assert_mistake_named,
    assert_passes_and_is_kept,
    assert_untouched_gets_no_hint,
    assert_wrong_is_not_kept,
    named_mistakes,
)

# --- right answers, written the way a learner would ---------------------------


def geglu_forward(self, x):
    value, gate = self.proj(x).chunk(2, dim=-1)
    return value * F.gelu(gate)


def feed_forward(self, x):
    for layer in self.net:
        x = layer(x)
    return x


def spatial_transformer_forward(self, x, context):
    H, W = x.shape[-2:]
    h = self.norm(x)
    conv = isinstance(self.proj_in, nn.Conv2d)
    if conv:
        h = self.proj_in(h)
    h = rearrange(h, "B C H W -> B (H W) C")
    if not conv:
        h = self.proj_in(h)
    for block in self.transformer_blocks:
        h = block(h, context)
    if not conv:
        h = self.proj_out(h)
    h = rearrange(h, "B (H W) C -> B C H W", H=H, W=W)
    if conv:
        h = self.proj_out(h)
    return x + h


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (
        checks.check_geglu_forward,
        geglu_forward,
        st.GEGLU.forward,
        "spatial_transformer:GEGLU.forward",
    ),
    (
        checks.check_feed_forward,
        feed_forward,
        st.FeedForward.forward,
        "spatial_transformer:FeedForward.forward",
    ),
    (
        checks.check_spatial_transformer_forward,
        spatial_transformer_forward,
        st.SpatialTransformer.forward,
        "spatial_transformer:SpatialTransformer.forward",
    ),
]
IDS = ["geglu", "feed_forward", "spatial_transformer"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    assert_passes_and_is_kept(check, right, package, part, capsys)


# --- typical mistakes, each named ------------------------------------------------


def _geglu_swapped(self, x):
    value, gate = self.proj(x).chunk(2, dim=-1)
    return gate * F.gelu(value)


def _geglu_over_tokens(self, x):
    value, gate = self.proj(x).chunk(2, dim=1)
    return value * F.gelu(gate)


def _geglu_tanh(self, x):
    value, gate = self.proj(x).chunk(2, dim=-1)
    return value * F.gelu(gate, approximate="tanh")


def _swiglu(self, x):
    value, gate = self.proj(x).chunk(2, dim=-1)
    return value * F.silu(gate)


def _feed_forward_with_residual(self, x):
    return x + feed_forward(self, x)


def _spatial_reshaped(self, x, context):
    """The tokens made with a bare reshape, a 1x1 convolution on the map."""
    B, C, H, W = x.shape
    h = self.norm(x)
    conv = isinstance(self.proj_in, nn.Conv2d)
    h = self.proj_in(h) if conv else h
    h = h.reshape(B, H * W, C)
    h = h if conv else self.proj_in(h)
    for block in self.transformer_blocks:
        h = block(h, context)
    h = h if conv else self.proj_out(h)
    h = h.reshape(B, C, H, W)
    return x + (self.proj_out(h) if conv else h)


def _spatial_normed_residual(self, x, context):
    return spatial_transformer_forward(self, x, context) - x + self.norm(x)


def _spatial_no_residual(self, x, context):
    return spatial_transformer_forward(self, x, context) - x


MISTAKES = [
    (
        checks.check_geglu_forward,
        "Exercise 04.3",
        {
            "value and gate are swapped": _geglu_swapped,
            "split the tokens": _geglu_over_tokens,
            "tanh approximation": _geglu_tanh,
            "SwiGLU": _swiglu,
        },
    ),
    (
        checks.check_feed_forward,
        "Exercise 04.4",
        {
            "an activation after": lambda self, x: self.net[2](F.gelu(self.net[0](x))),
            "the residual was added here": _feed_forward_with_residual,
            "projection back to D is missing": lambda self, x: self.net[0](x),
        },
    ),
    (
        checks.check_spatial_transformer_forward,
        "Exercise 04.6",
        {
            "a reshape without a permute": _spatial_reshaped,
            "the residual added the normalised map": _spatial_normed_residual,
            "the input is not added back": _spatial_no_residual,
            "proj_out is missing": partial(checks._spatial, mistake="no proj_out"),
            "proj_in is missing": partial(checks._spatial, mistake="no proj_in"),
            "the GroupNorm is missing": partial(checks._spatial, mistake="no norm"),
        },
    ),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


# --- a wrong answer is not kept, an unsolved one gets no hint ---------------------

# the part -> a wrong answer to it
WRONG = {
    "spatial_transformer:GEGLU.forward": _geglu_swapped,
    "spatial_transformer:FeedForward.forward": _feed_forward_with_residual,
    "spatial_transformer:SpatialTransformer.forward": _spatial_reshaped,
}


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(
    check, right, package, part, capsys
):
    assert_wrong_is_not_kept(check, right, WRONG[part], package, part, capsys)


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES], ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys):
    assert_untouched_gets_no_hint(check, capsys)
