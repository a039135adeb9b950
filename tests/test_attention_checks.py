"""Chapter 01's exercise checks: right answers pass and are kept, the usual
mistakes are named, an untouched exercise gets no hint, none raise."""

import math

import pytest
import torch
from einops import rearrange

import sdlearn.checks
from sdlearn import attention as sd
from sdlearn.checks import Verdict, answers
from sdlearn.checks import attention as checks
from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_tries(monkeypatch):
    """Every test starts with no failed tries, as a fresh kernel does."""
    monkeypatch.setattr(sdlearn.checks, "_FAILED_TRIES", {})


def unsolved(*args, **kwargs):
    raise NotImplementedError


# --- right answers, written the way a learner would -----------------------------
# Named as the package names them: the kept forward calls the other three by name.


def attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return scores.softmax(dim=-1) @ v


def scaled_dot_product_attention(q, k, v, mask=None, causal=False):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1).nan_to_num(0.0) @ v


def split_heads(x, num_heads):
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2)


def merge_heads(x):
    B, nh, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hd)


def attention_forward(
    self, hidden_states, encoder_hidden_states=None, attention_mask=None, causal=False
):
    context = hidden_states
    if encoder_hidden_states is not None:
        context = encoder_hidden_states
    q = split_heads(self.to_q(hidden_states), self.heads)
    k = split_heads(self.to_k(context), self.heads)
    v = split_heads(self.to_v(context), self.heads)
    mask = attention_mask
    if mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]
    elif mask is not None and mask.ndim == 3:
        mask = mask[:, None]
    out = merge_heads(scaled_dot_product_attention(q, k, v, mask, causal))
    return self.to_out[1](self.to_out[0](out))


RIGHT = [
    (checks.check_attention, attention, None),
    (
        checks.check_scaled_dot_product_attention,
        scaled_dot_product_attention,
        "scaled_dot_product_attention",
    ),
    (checks.check_split_heads, split_heads, "split_heads"),
    (checks.check_merge_heads, merge_heads, "merge_heads"),
    (checks.check_attention_forward, attention_forward, "Attention.forward"),
]


@pytest.mark.parametrize(("check", "fn", "part"), RIGHT, ids=lambda x: "")
def test_right_answers_pass_and_are_kept(check, fn, part, answers_home, capsys):
    assert check(fn)
    out = capsys.readouterr().out
    assert "✅" in out and "Hint" not in out
    if part is None:  # a warm-up: nothing to keep
        assert not (answers_home / "attention.py").exists()
        return
    text = (answers_home / "attention.py").read_text()
    assert f"# >>> {part} (Exercise 01." in text and f"def {fn.__name__}(" in text
    assert part in answers.kept("attention")


def test_the_package_passes_its_own_checks(capsys):
    assert checks.check_attention(sd.scaled_dot_product_attention)
    assert checks.check_scaled_dot_product_attention(sd.scaled_dot_product_attention)
    assert checks.check_split_heads(sd.split_heads)
    assert checks.check_split_heads(
        lambda x, nh: rearrange(x, "b t (nh hd) -> b nh t hd", nh=nh)
    )
    assert checks.check_merge_heads(sd.merge_heads)
    assert checks.check_attention_forward(sd.Attention.forward)
    assert capsys.readouterr().out.count("✅") == 6


def _keep_all() -> None:
    assert checks.check_scaled_dot_product_attention(scaled_dot_product_attention)
    assert checks.check_split_heads(split_heads)
    assert checks.check_merge_heads(merge_heads)
    assert checks.check_attention_forward(attention_forward)


def test_the_kept_forward_runs_alone_with_the_kept_functions(answers_home, capsys):
    _keep_all()
    # a kernel restart later: the file alone, with its own attention function
    forward = answers.use(
        "attention:Attention.forward",
        sd.Attention.forward,
        checks.check_attention_forward,
    )
    assert answers.is_learners(forward)
    assert forward.__globals__["scaled_dot_product_attention"].__module__ != __name__
    assert "stands in" not in capsys.readouterr().out


def test_a_forward_kept_alone_says_what_it_still_needs(answers_home, capsys):
    assert checks.check_split_heads(split_heads)
    assert checks.check_attention_forward(attention_forward)
    out = capsys.readouterr().out
    assert "calls scaled_dot_product_attention, merge_heads, not kept yet" in out
    _keep_all()
    assert "not kept yet" not in capsys.readouterr().out


@pytest.mark.parametrize("model", ["clip", "unet"])
def test_the_kept_forward_is_a_drop_in_on_the_pipelines_models(
    model, answers_home, capsys
):
    """Chapter 06 installs the kept forward in the text encoder and the UNet."""
    _keep_all()
    forward = answers.kept("attention")["Attention.forward"]
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the weights' init, seeded
        torch.manual_seed(0)
        if model == "clip":
            net = CLIPTextModel(CLIPTextConfig.tiny()).eval()
        else:
            net = UNet(UNetConfig.tiny(cross_attention_dim=32)).eval()
    if model == "clip":
        ids = torch.randint(0, net.config.vocab_size, (2, 77), generator=g)
        padding = torch.arange(77)[None] < torch.tensor([[9], [77]])  # (B, T)
        inputs, kwargs = (ids,), {"attention_mask": padding}
    else:
        inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]))
        kwargs = {"encoder_hidden_states": torch.randn(2, 77, 32, generator=g)}
    with torch.no_grad():
        expected = net(*inputs, **kwargs)
        assert answers.install_forward(net, sd.Attention, forward) > 0
        actual = net(*inputs, **kwargs)
    torch.testing.assert_close(actual, expected)


# --- each named mistake, as a learner would make it ------------------------------


def not_scaled(q, k, v):
    return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def divided_by_hd(q, k, v):
    return (q @ k.transpose(-2, -1) / q.shape[-1]).softmax(dim=-1) @ v


def softmax_over_queries(q, k, v):
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(dim=-2) @ v


def scaled_by_value_width(q, k, v):
    return (q @ k.transpose(-2, -1) / v.shape[-1] ** 0.5).softmax(dim=-1) @ v


ATTENTION_MISTAKES = [
    (not_scaled, checks.NOT_SCALED),
    (divided_by_hd, checks.NO_SQUARE_ROOT),
    (softmax_over_queries, checks.SOFTMAX_OVER_QUERIES),
    (scaled_by_value_width, checks.SCALED_BY_VALUES),
]


def masked(
    causal_triangle=lambda Tq, Tk: torch.ones(Tq, Tk, dtype=torch.bool).tril(),
    invert=False,
    after_softmax=False,
    use_mask_with_causal=True,
    use_causal_with_mask=True,
    zero_empty_rows=True,
    scale=True,
    float_mask="add",
):
    """A learner's attention with masks, with one choice made wrongly."""

    def fn(q, k, v, mask=None, causal=False):
        scores = q @ k.transpose(-2, -1)
        if scale:
            scores = scores / math.sqrt(q.shape[-1])
        if mask is not None and causal and not use_mask_with_causal:
            mask = None
        if mask is not None and causal and not use_causal_with_mask:
            causal = False
        blocked = torch.zeros(scores.shape, dtype=torch.bool)
        if causal:
            blocked = blocked | ~causal_triangle(q.shape[-2], k.shape[-2])
        if mask is not None and mask.is_floating_point() and float_mask != "add":
            mask = None if float_mask == "leave out" else mask.bool()
        if mask is not None and mask.dtype == torch.bool:
            blocked = blocked | (mask if invert else ~mask)
        elif mask is not None:
            scores = scores + mask
        if after_softmax:
            weights = scores.softmax(dim=-1).masked_fill(blocked, 0.0)
        else:
            weights = scores.masked_fill(blocked, float("-inf")).softmax(dim=-1)
        if zero_empty_rows:
            weights = weights.nan_to_num(0.0)
        return weights @ v

    return fn


MASK_MISTAKES = [
    (masked(scale=False), checks.NOT_SCALED),
    (masked(after_softmax=True), checks.MASK_AFTER_SOFTMAX),
    (masked(float_mask="leave out"), checks.FLOAT_MASK_NOT_ADDED),
    (masked(float_mask="as booleans"), checks.FLOAT_MASK_NOT_ADDED),
    (masked(invert=True), checks.INVERTED_MASK),
    (
        masked(
            causal_triangle=lambda Tq, Tk: torch.ones(Tq, Tk, dtype=torch.bool).triu()
        ),
        checks.UPSIDE_DOWN,
    ),
    (
        masked(
            causal_triangle=lambda Tq, Tk: torch.ones(Tq, Tk, dtype=torch.bool).tril(
                diagonal=Tk - Tq
            )
        ),
        checks.BOTTOM_RIGHT,
    ),
    (masked(use_causal_with_mask=False), checks.CAUSAL_IGNORED),
    (masked(use_mask_with_causal=False), checks.MASK_IGNORED),
    (masked(zero_empty_rows=False), checks.FULLY_MASKED_NAN),
    (
        masked(
            causal_triangle=lambda Tq, Tk: torch.ones(Tq, Tk, dtype=torch.bool).tril(
                -1
            ),
            zero_empty_rows=False,
        ),
        checks.NAN_ELSEWHERE,
    ),
]

SPLIT_MISTAKES = [
    (lambda x, nh: x.view(x.shape[0], nh, x.shape[1], -1), checks.VIEWED_STRAIGHT),
    (
        lambda x, nh: rearrange(x, "b t (hd nh) -> b nh t hd", nh=nh),
        checks.SPLIT_INTERLEAVED,
    ),
    (lambda x, nh: x.view(*x.shape[:2], nh, -1), checks.NOT_SWAPPED),
]

MERGE_MISTAKES = [
    (lambda x: x.reshape(x.shape[0], x.shape[2], -1), checks.MERGED_UNSWAPPED),
    (lambda x: rearrange(x, "b nh t hd -> b t (hd nh)"), checks.MERGE_INTERLEAVED),
    (lambda x: x.transpose(1, 2), checks.NOT_JOINED),
]


def forward_with(
    keys_from_hidden=False,
    queries_from_context=False,
    heads_of_width_heads=False,
    to_out=True,
    pass_mask=True,
    pass_causal=True,
):
    """A learner's forward, with one choice made wrongly."""

    def fn(
        self,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        causal=False,
    ):
        if encoder_hidden_states is None:
            context = hidden_states
        else:
            context = encoder_hidden_states
        queries = hidden_states
        if keys_from_hidden:
            context = hidden_states
        if queries_from_context:
            queries, context = context, hidden_states
        nh = self.dim_head if heads_of_width_heads else self.heads
        q = split_heads(self.to_q(queries), nh)
        k = split_heads(self.to_k(context), nh)
        v = split_heads(self.to_v(context), nh)
        mask = attention_mask if pass_mask else None
        if mask is not None and mask.ndim == 2:
            mask = mask[:, None, None, :]
        elif mask is not None and mask.ndim == 3:
            mask = mask[:, None]
        out = merge_heads(
            scaled_dot_product_attention(q, k, v, mask, causal and pass_causal)
        )
        return self.to_out[1](self.to_out[0](out)) if to_out else out

    return fn


FORWARD_MISTAKES = [
    (forward_with(keys_from_hidden=True), checks.KEYS_FROM_HIDDEN),
    (forward_with(queries_from_context=True), checks.QUERIES_FROM_CONTEXT),
    (forward_with(heads_of_width_heads=True), checks.HEADS_SWAPPED),
    (forward_with(to_out=False), checks.NO_TO_OUT),
    (forward_with(pass_mask=False), checks.MASK_NOT_PASSED),
    (forward_with(pass_causal=False), checks.CAUSAL_NOT_PASSED),
]

MISTAKES = (
    [(checks.check_attention, fn, m) for fn, m in ATTENTION_MISTAKES]
    + [(checks.check_scaled_dot_product_attention, fn, m) for fn, m in MASK_MISTAKES]
    + [(checks.check_split_heads, fn, m) for fn, m in SPLIT_MISTAKES]
    + [(checks.check_merge_heads, fn, m) for fn, m in MERGE_MISTAKES]
    + [(checks.check_attention_forward, fn, m) for fn, m in FORWARD_MISTAKES]
)


@pytest.mark.parametrize(
    ("check", "wrong", "message"),
    MISTAKES,
    ids=[f"{c.__name__}-{m[:30]}" for c, _, m in MISTAKES],
)
def test_each_named_mistake_is_recognised(check, wrong, message, answers_home, capsys):
    verdict = check(wrong)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert message in out, out
    assert "Hint 1 of 3" in out  # a failed try earns the first hint, the idea
    assert not answers.kept("attention")  # a wrong answer is not kept


def test_a_wrong_answer_replaces_a_kept_right_one(answers_home, capsys):
    assert checks.check_split_heads(split_heads)
    assert "split_heads" in answers.kept("attention")
    assert not checks.check_split_heads(SPLIT_MISTAKES[0][0])
    assert "split_heads" not in answers.kept("attention")
    used = answers.use(
        "attention:split_heads", sd.split_heads, checks.check_split_heads
    )
    assert used is sd.split_heads
    assert "the package's stands in" in capsys.readouterr().out


def test_errors_are_shown_with_their_line(capsys):
    # .view after .transpose: not contiguous, so torch raises
    def merge_with_view(x):
        return x.transpose(1, 2).view(x.shape[0], x.shape[2], -1)

    assert not checks.check_merge_heads(merge_with_view)
    out = capsys.readouterr().out
    assert "raised RuntimeError" in out and ".view(" in out


@pytest.mark.parametrize(
    "check",
    [
        checks.check_attention,
        checks.check_scaled_dot_product_attention,
        checks.check_split_heads,
        checks.check_merge_heads,
        checks.check_attention_forward,
    ],
)
def test_unsolved_exercises_print_a_reminder_and_no_hint(check, answers_home, capsys):
    verdict = check(unsolved)
    assert isinstance(verdict, Verdict) and not verdict
    out = capsys.readouterr().out
    assert "not done yet" in out and "raise NotImplementedError" in out
    assert "Hint" not in out
    assert not answers.kept("attention")
