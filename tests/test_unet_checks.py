"""Chapter 04's exercise checks: right answers pass and are kept, the usual mistakes
are named, an unsolved exercise gets no hint, a wrong answer is not kept."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdlearn import unet as sd
from sdlearn.blocks import ResnetBlock
from sdlearn.checks import answers
from sdlearn.checks import unet as checks
from sdlearn.spatial_transformer import TransformerBlock
from tests.check_contract import (
    assert_mistake_named,
    assert_passes_and_is_kept,
    assert_untouched_gets_no_hint,
    assert_wrong_is_not_kept,
    named_mistakes,
)

# --- right answers, written the way a learner would ---------------------------


def timestep_embedding(
    timesteps, dim, flip_sin_to_cos=True, downscale_freq_shift=0.0, max_period=10000.0
):
    half = dim // 2
    exponent = (
        -math.log(max_period) * torch.arange(half) / (half - downscale_freq_shift)
    )
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    parts = [angles.cos(), angles.sin()]
    if not flip_sin_to_cos:
        parts = parts[::-1]
    return F.pad(torch.cat(parts, dim=-1), (0, dim % 2))


def transformer_block_forward(self, x, context):
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


def time_mlp_forward(self, x):
    return self.linear_2(F.silu(self.linear_1(x)))


def unet_forward(self, sample, timestep, encoder_hidden_states):
    timesteps = self._check_inputs(sample, timestep, encoder_hidden_states)
    context = encoder_hidden_states
    t_emb = timestep_embedding(timesteps, self.config.block_out_channels[0])
    temb = self.time_embedding(t_emb.to(sample.dtype))
    h = self.conv_in(sample)
    skips = [h]
    for block in self.down_blocks:
        h = block(h, temb, context, skips)
    h = self.mid_block(h, temb, context)
    for block in self.up_blocks:
        h = block(h, temb, context, skips)
    return self.conv_out(F.silu(self.conv_norm_out(h)))


def unet_forward_inline(self, sample, timestep, encoder_hidden_states):
    """The UNet's forward written without the blocks' forwards, as chapter 04
    asked before the blocks were exercises: kept answers of that time still pass."""
    timesteps = self._check_inputs(sample, timestep, encoder_hidden_states)
    context = encoder_hidden_states
    t_emb = timestep_embedding(timesteps, self.config.block_out_channels[0])
    temb = self.time_embedding(t_emb.to(sample.dtype))
    h = self.conv_in(sample)
    skips = [h]
    for block in self.down_blocks:
        for i, resnet in enumerate(block.resnets):
            h = resnet(h, temb)
            if block.attentions is not None:
                h = block.attentions[i](h, context)
            skips.append(h)
        if block.downsamplers is not None:
            h = block.downsamplers[0](h)
            skips.append(h)
    h = self.mid_block.resnets[0](h, temb)
    h = self.mid_block.attentions[0](h, context)
    h = self.mid_block.resnets[1](h, temb)
    for block in self.up_blocks:
        for i, resnet in enumerate(block.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if block.attentions is not None:
                h = block.attentions[i](h, context)
        if block.upsamplers is not None:
            h = block.upsamplers[0](h)
    return self.conv_out(F.silu(self.conv_norm_out(h)))


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (
        checks.check_timestep_embedding,
        timestep_embedding,
        sd.timestep_embedding,
        "unet:timestep_embedding",
    ),
    (
        checks.check_time_mlp_forward,
        time_mlp_forward,
        sd.TimestepEmbedding.forward,
        "unet:TimestepEmbedding.forward",
    ),
    (
        checks.check_transformer_block_forward,
        transformer_block_forward,
        TransformerBlock.forward,
        "spatial_transformer:TransformerBlock.forward",
    ),
    (checks.check_unet_forward, unet_forward, sd.UNet.forward, "unet:UNet.forward"),
]
IDS = ["timestep_embedding", "time_mlp", "transformer_block", "unet"]


def _keep_the_embedding(capsys):
    """The kept UNet.forward calls the learner's timestep_embedding, kept beside
    it: without it kept, a right UNet.forward waits."""
    assert checks.check_timestep_embedding(timestep_embedding)
    capsys.readouterr()


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    _keep_the_embedding(capsys)
    assert_passes_and_is_kept(check, right, package, part, capsys)


def test_the_package_passes_chapter_02s_resnet_check(capsys):
    assert checks.check_resnet_forward(ResnetBlock.forward)


def test_the_kept_unet_runs_with_the_kept_embedding(answers_home, capsys):
    """The kept UNet.forward calls `timestep_embedding`: in the answers file, the
    learner's own, kept beside it."""
    assert checks.check_timestep_embedding(timestep_embedding)
    assert checks.check_unet_forward(unet_forward)
    kept = answers.kept("unet")
    assert set(kept) == {"timestep_embedding", "UNet.forward"}
    assert checks.check_unet_forward(kept["UNet.forward"])


def test_a_unet_forward_that_runs_the_layers_itself_passes(answers_home, capsys):
    assert checks.check_timestep_embedding(timestep_embedding)
    assert checks.check_unet_forward(unet_forward_inline)


def test_a_unet_that_calls_the_package_embedding_is_not_kept(answers_home, capsys):
    """Exercise 04.3 done while the package's embedding stands in for 04.1: the
    kept file would have no timestep_embedding to call, so it waits for 04.1."""
    namespace = {
        **unet_forward.__globals__,
        "timestep_embedding": sd.timestep_embedding,
    }
    with_package_embedding = type(unet_forward)(unet_forward.__code__, namespace)
    assert checks.check_unet_forward(with_package_embedding)
    assert "Not kept yet" in capsys.readouterr().out
    assert "UNet.forward" not in answers.kept("unet")
    assert checks.check_timestep_embedding(timestep_embedding)
    assert checks.check_unet_forward(unet_forward)
    used = answers.use("unet:UNet.forward", sd.UNet.forward, checks.check_unet_forward)
    assert answers.is_learners(used)


# --- typical mistakes, each named ------------------------------------------------


def _embedding_sin_first(t, dim, flip_sin_to_cos=True, *args, **kwargs):
    return timestep_embedding(t, dim, not flip_sin_to_cos, *args, **kwargs)


def _embedding_without_shift(
    t, dim, flip_sin_to_cos=True, downscale_freq_shift=0.0, **kwargs
):
    return timestep_embedding(t, dim, flip_sin_to_cos, **kwargs)


def _embedding_without_max_period(
    t, dim, flip_sin_to_cos=True, downscale_freq_shift=0.0, **kwargs
):
    return timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift)


def _embedding_growing(t, dim, *args, **kwargs):
    return checks._embedding(t, dim, sign=1.0)


def test_embedding_without_the_odd_pad_names_the_shape(capsys):
    def no_pad(t, dim, *args, **kwargs):
        return timestep_embedding(t, dim)[:, : 2 * (dim // 2)]

    assert not checks.check_timestep_embedding(no_pad)
    assert "expected shape" in capsys.readouterr().out


def _time_mlp_without_activation(self, x):
    return self.linear_2(self.linear_1(x))


def _post_norm(self, x, context):
    x = self.norm1(x + self.attn1(x))
    x = self.norm2(x + self.attn2(x, context))
    return self.norm3(x + self.ff(x))


def _attn2_on_pixels(self, x, context):
    x = x + self.attn1(self.norm1(x))
    h = self.norm2(x)
    x = x + self.attn2(h, h)
    return x + self.ff(self.norm3(x))


def _no_attn1_residual(self, x, context):
    x = self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


def _no_attn2_residual(self, x, context):
    x = x + self.attn1(self.norm1(x))
    x = self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


def _no_ff_residual(self, x, context):
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return self.ff(self.norm3(x))


def _cross_first(self, x, context):
    x = x + self.attn2(self.norm1(x), context)
    x = x + self.attn1(self.norm2(x))
    return x + self.ff(self.norm3(x))


def _parallel(self, x, context):
    return (
        x
        + self.attn1(self.norm1(x))
        + self.attn2(self.norm2(x), context)
        + self.ff(self.norm3(x))
    )


def _unet_with(mistake):
    def wrong(self, sample, timestep, encoder_hidden_states):
        return checks._unet_forward(
            self, sample, timestep, encoder_hidden_states, mistake=mistake
        )

    return wrong


MISTAKES = [
    (
        checks.check_timestep_embedding,
        "Exercise 04.1",
        {
            "wrong way round": _embedding_sin_first,
            "grow with i": _embedding_growing,
            "divides i by": lambda t, dim, *a, **k: checks._embedding(
                t, dim, over="dim"
            ),
            "downscale_freq_shift is ignored": _embedding_without_shift,
            "max_period is ignored": _embedding_without_max_period,
            "at the front": lambda t, dim, *a, **k: F.pad(
                timestep_embedding(t, dim - dim % 2), (dim % 2, 0)
            ),
        },
    ),
    (
        checks.check_time_mlp_forward,
        "Exercise 04.2",
        {
            "no activation": _time_mlp_without_activation,
            "a ReLU": lambda self, x: self.linear_2(F.relu(self.linear_1(x))),
            "a GELU": lambda self, x: self.linear_2(F.gelu(self.linear_1(x))),
            "after linear_2": lambda self, x: F.silu(time_mlp_forward(self, x)),
        },
    ),
    (
        checks.check_transformer_block_forward,
        "Exercise 04.5",
        {
            "post-norm": _post_norm,
            "attends to the pixels again": _attn2_on_pixels,
            "self-attention's result replaces x": _no_attn1_residual,
            "cross-attention's result replaces x": _no_attn2_residual,
            "feed-forward's result replaces x": _no_ff_residual,
            "cross-attention ran before self-attention": _cross_first,
            "one after the other": _parallel,
        },
    ),
    (
        checks.check_unet_forward,
        "Exercise 04.10",
        {
            "the middle is missing": _unet_with("no middle"),
            "without conv_norm_out": _unet_with("no out norm"),
            "SiLU ran before conv_norm_out": _unet_with("silu first"),
        },
    ),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


# --- a wrong answer is not kept, an unsolved one gets no hint ---------------------

# the part -> a wrong answer to it
WRONG = {
    "unet:timestep_embedding": _embedding_growing,
    "unet:TimestepEmbedding.forward": _time_mlp_without_activation,
    "spatial_transformer:TransformerBlock.forward": _post_norm,
    "unet:UNet.forward": _unet_with("no middle"),
}


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(
    check, right, package, part, capsys
):
    _keep_the_embedding(capsys)
    assert_wrong_is_not_kept(check, right, WRONG[part], package, part, capsys)


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES], ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys):
    assert_untouched_gets_no_hint(check, capsys)


def test_a_forward_that_ignores_the_time_is_not_used(answers_home, capsys):
    def no_temb(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h

    assert not checks.check_resnet_forward(no_temb)


def test_hints_come_on_request_one_tier_more_each_time(capsys):
    assert not checks.check_transformer_block_forward(_post_norm)
    capsys.readouterr()
    checks.hint("Exercise 04.5")
    out = capsys.readouterr().out
    assert "Hint 2 of 3" in out and "attn2" in out


def test_the_kept_answers_are_drop_ins_for_the_package(answers_home, capsys):
    """What chapter 06 does: install the kept forwards in a UNet of the course's
    shape; it gives the package's numbers, in float32 and in bfloat16."""
    for check, right, *_ in EXERCISES:
        assert check(right)
    kept = {**answers.kept("unet"), **answers.kept("spatial_transformer")}
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 64)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = sd.UNet(sd.UNetConfig.tiny()).eval().to(dtype)
        inputs = (latents.to(dtype), torch.tensor(500), text.to(dtype))
        with torch.no_grad():
            expected = model(*inputs)
            answers.install_forward(model, sd.UNet, kept["UNet.forward"])
            answers.install_forward(
                model, TransformerBlock, kept["TransformerBlock.forward"]
            )
            actual = model(*inputs)
        assert model.forward.__func__ is kept["UNet.forward"]
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
