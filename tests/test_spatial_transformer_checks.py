"""Chapter 04's spatial transformer checks (GEGLU, feed-forward, spatial
transformer): right answers pass and are kept, the usual mistakes are named, an
unsolved exercise gets no hint, a wrong answer is not kept."""

import functools

import pytest
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import sdlearn.checks
from sdlearn import spatial_transformer as st
from sdlearn.checks import Verdict, answers
from sdlearn.checks import spatial_transformer as checks


@pytest.fixture(autouse=True)
def first_tries(monkeypatch):
    """Every test starts with no failed tries, so its first hint is the first tier."""
    monkeypatch.setattr(sdlearn.checks, "_FAILED_TRIES", {})


def unsolved(*args, **kwargs):
    raise NotImplementedError


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


EXERCISES = [
    (checks.check_geglu_forward, geglu_forward, "spatial_transformer:GEGLU.forward"),
    (
        checks.check_feed_forward,
        feed_forward,
        "spatial_transformer:FeedForward.forward",
    ),
    (
        checks.check_spatial_transformer_forward,
        spatial_transformer_forward,
        "spatial_transformer:SpatialTransformer.forward",
    ),
]


@pytest.mark.parametrize(("check", "right", "part"), EXERCISES)
def test_a_right_answer_passes_and_is_kept(check, right, part, answers_home, capsys):
    assert check(right)
    out = capsys.readouterr().out
    assert "✅" in out and "Kept in" in out
    module, name = part.split(":")
    assert name in answers.kept(module)
    assert answers.is_learners(answers.use(part, None, check))


def test_the_package_passes_its_own_checks(answers_home, capsys):
    assert checks.check_geglu_forward(st.GEGLU.forward)
    assert checks.check_feed_forward(st.FeedForward.forward)
    assert checks.check_spatial_transformer_forward(st.SpatialTransformer.forward)


# --- typical mistakes, each named ------------------------------------------------


def _named(check, wrong, words, capsys):
    verdict = check(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "❌" in out and words in out, out
    assert "Hint 1 of 3" in out  # the idea first
    return out


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


@pytest.mark.parametrize(
    ("wrong", "words"),
    [
        (_geglu_swapped, "value and gate are swapped"),
        (_geglu_over_tokens, "split the tokens"),
        (_geglu_tanh, "tanh approximation"),
        (_swiglu, "SwiGLU"),
    ],
)
def test_geglu_mistakes_are_named(wrong, words, answers_home, capsys):
    _named(checks.check_geglu_forward, wrong, words, capsys)


@pytest.mark.parametrize(
    ("wrong", "words"),
    [
        (lambda self, x: self.net[2](F.gelu(self.net[0](x))), "an activation after"),
        (lambda self, x: x + feed_forward(self, x), "the residual was added here"),
        (lambda self, x: self.net[0](x), "projection back to D is missing"),
    ],
    ids=["extra activation", "residual", "no net.2"],
)
def test_feed_forward_mistakes_are_named(wrong, words, answers_home, capsys):
    _named(checks.check_feed_forward, wrong, words, capsys)


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


@pytest.mark.parametrize(
    ("wrong", "words"),
    [
        (_spatial_reshaped, "a reshape without a permute"),
        (_spatial_normed_residual, "the residual added the normalised map"),
        (_spatial_no_residual, "the input is not added back"),
        (
            functools.partial(checks._spatial, mistake="no proj_out"),
            "proj_out is missing",
        ),
        (
            functools.partial(checks._spatial, mistake="no proj_in"),
            "proj_in is missing",
        ),
        (
            functools.partial(checks._spatial, mistake="no norm"),
            "the GroupNorm is missing",
        ),
    ],
    ids=["reshape", "normed residual", "no residual", "proj_out", "proj_in", "norm"],
)
def test_spatial_transformer_mistakes_are_named(wrong, words, answers_home, capsys):
    _named(checks.check_spatial_transformer_forward, wrong, words, capsys)


# --- a wrong answer is not kept, an unsolved one gets no hint ---------------------


@pytest.mark.parametrize(
    ("check", "wrong", "part"),
    [
        (
            checks.check_geglu_forward,
            _geglu_swapped,
            "spatial_transformer:GEGLU.forward",
        ),
        (
            checks.check_feed_forward,
            lambda self, x: x + feed_forward(self, x),
            "spatial_transformer:FeedForward.forward",
        ),
        (
            checks.check_spatial_transformer_forward,
            _spatial_reshaped,
            "spatial_transformer:SpatialTransformer.forward",
        ),
    ],
)
def test_a_wrong_answer_is_not_kept(check, wrong, part, answers_home, capsys):
    right = {e[0]: e[1] for e in EXERCISES}[check]
    assert check(right)  # kept ...
    assert not check(wrong)  # ... and forgotten when a later try fails
    module, name = part.split(":")
    assert name not in answers.kept(module)
    fallback = object()
    assert answers.use(part, fallback) is fallback
    assert "the package's stands in" in capsys.readouterr().out


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES])
def test_unsolved_exercises_print_a_reminder_and_no_hint(check, answers_home, capsys):
    verdict = check(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "raise NotImplementedError" in out
    assert "Hint" not in out
