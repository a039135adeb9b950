"""Chapter 04's UNet block checks (down, mid, up): right answers pass and are
kept, the usual mistakes are named, an unsolved exercise gets no hint, a wrong
answer is not kept; and every kept part of chapter 04 together is a drop-in for
the package's UNet."""

import pytest
import torch

from sdlearn import spatial_transformer as st
from sdlearn import unet as sd
from sdlearn.checks import answers
from sdlearn.checks import unet as unet_checks
from sdlearn.checks import unet_blocks as checks
from tests import test_spatial_transformer_checks as st_answers
from tests import test_unet_checks as unet_answers
from tests.check_contract import (
    assert_mistake_named,
    assert_passes_and_is_kept,
    assert_untouched_gets_no_hint,
    assert_wrong_is_not_kept,
    named_mistakes,
)

# --- right answers, written the way a learner would ---------------------------


def down_block_forward(self, x, temb, context, skips):
    for i, resnet in enumerate(self.resnets):
        x = resnet(x, temb)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
        skips.append(x)
    if self.downsamplers is not None:
        x = self.downsamplers[0](x)
        skips.append(x)
    return x


def mid_block_forward(self, x, temb, context):
    x = self.resnets[0](x, temb)
    x = self.attentions[0](x, context)
    return self.resnets[1](x, temb)


def up_block_forward(self, x, temb, context, skips):
    for i, resnet in enumerate(self.resnets):
        x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
    if self.upsamplers is not None:
        x = self.upsamplers[0](x)
    return x


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (
        checks.check_down_block_forward,
        down_block_forward,
        sd.DownBlock.forward,
        "unet:DownBlock.forward",
    ),
    (
        checks.check_mid_block_forward,
        mid_block_forward,
        sd.MidBlock.forward,
        "unet:MidBlock.forward",
    ),
    (
        checks.check_up_block_forward,
        up_block_forward,
        sd.UpBlock.forward,
        "unet:UpBlock.forward",
    ),
]
IDS = ["down", "mid", "up"]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    assert_passes_and_is_kept(check, right, package, part, capsys)


def test_the_chapter_finds_them_in_its_checks_module():
    assert unet_checks.check_down_block_forward is checks.check_down_block_forward
    assert unet_checks.check_mid_block_forward is checks.check_mid_block_forward
    assert unet_checks.check_up_block_forward is checks.check_up_block_forward


# --- typical mistakes, each named ------------------------------------------------


def _push_before_attention(self, x, temb, context, skips):
    for i, resnet in enumerate(self.resnets):
        x = resnet(x, temb)
        skips.append(x)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
    if self.downsamplers is not None:
        x = self.downsamplers[0](x)
        skips.append(x)
    return x


def _push_input(self, x, temb, context, skips):
    for i, resnet in enumerate(self.resnets):
        skips.append(x)
        x = resnet(x, temb)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
    if self.downsamplers is not None:
        x = self.downsamplers[0](x)
        skips.append(x)
    return x


def _no_downsample_push(self, x, temb, context, skips):
    down = self.downsamplers
    self.downsamplers = None
    try:
        x = down_block_forward(self, x, temb, context, skips)
    finally:
        self.downsamplers = down
    return x if down is None else down[0](x)


def test_a_down_block_that_pushes_too_little_is_told_so(capsys):
    def one_push(self, x, temb, context, skips):
        out = down_block_forward(self, x, temb, context, [])
        skips.append(out)
        return out

    assert not checks.check_down_block_forward(one_push)
    assert "pushed 1 feature maps, expected 3" in capsys.readouterr().out


def _mid_without_attention(self, x, temb, context):
    return self.resnets[1](self.resnets[0](x, temb), temb)


def _mid_attention_last(self, x, temb, context):
    x = self.resnets[1](self.resnets[0](x, temb), temb)
    return self.attentions[0](x, context)


def _mid_attention_first(self, x, temb, context):
    x = self.attentions[0](x, context)
    return self.resnets[1](self.resnets[0](x, temb), temb)


def _fifo(self, x, temb, context, skips):
    for i, resnet in enumerate(self.resnets):
        x = resnet(torch.cat([x, skips.pop(0)], dim=1), temb)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
    if self.upsamplers is not None:
        x = self.upsamplers[0](x)
    return x


def _skip_first(self, x, temb, context, skips):
    for i, resnet in enumerate(self.resnets):
        x = resnet(torch.cat([skips.pop(), x], dim=1), temb)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
    if self.upsamplers is not None:
        x = self.upsamplers[0](x)
    return x


MISTAKES = [
    (
        checks.check_down_block_forward,
        "Exercise 04.7",
        {
            "pushed before its SpatialTransformer": _push_before_attention,
            "each ResnetBlock's input was pushed": _push_input,
            "the downsampler's output was not pushed": _no_downsample_push,
        },
    ),
    (
        checks.check_mid_block_forward,
        "Exercise 04.8",
        {
            "the SpatialTransformer is missing": _mid_without_attention,
            "ran after both ResnetBlocks": _mid_attention_last,
            "the SpatialTransformer ran first": _mid_attention_first,
        },
    ),
    (
        checks.check_up_block_forward,
        "Exercise 04.9",
        {"first-in, first-out": _fifo, "the skip came first": _skip_first},
    ),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


# --- a wrong answer is not kept, an unsolved one gets no hint ---------------------

# the part -> a wrong answer to it
WRONG = {
    "unet:DownBlock.forward": _push_before_attention,
    "unet:MidBlock.forward": _mid_without_attention,
    "unet:UpBlock.forward": _fifo,
}


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(
    check, right, package, part, capsys
):
    assert_wrong_is_not_kept(check, right, WRONG[part], package, part, capsys)


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES], ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys):
    assert_untouched_gets_no_hint(check, capsys)


# --- all of chapter 04's kept parts together ---------------------------------------

# every kept part of chapter 04 -> the class whose forward it replaces
PARTS = {
    "unet:TimestepEmbedding.forward": sd.TimestepEmbedding,
    "spatial_transformer:GEGLU.forward": st.GEGLU,
    "spatial_transformer:FeedForward.forward": st.FeedForward,
    "spatial_transformer:TransformerBlock.forward": st.TransformerBlock,
    "spatial_transformer:SpatialTransformer.forward": st.SpatialTransformer,
    "unet:DownBlock.forward": sd.DownBlock,
    "unet:MidBlock.forward": sd.MidBlock,
    "unet:UpBlock.forward": sd.UpBlock,
    "unet:UNet.forward": sd.UNet,
}


def test_every_kept_part_together_is_a_drop_in_for_the_package(capsys):
    """What chapter 06 does: install every kept forward of chapter 04 in a UNet
    of the course's shape; it gives the package's numbers, in float32 and in
    bfloat16 (within rounding: the learner's 1x1 convolutions run where the
    package runs the same maps as matmuls)."""
    for exercises in (unet_answers.EXERCISES, st_answers.EXERCISES, EXERCISES):
        for check, right, *_ in exercises:
            assert check(right)
    assert unet_answers.checks.check_transformer_block_forward(
        unet_answers.transformer_block_forward
    )
    kept = {}
    for part in PARTS:
        module, name = part.split(":")
        kept[part] = answers.kept(module)[name]
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 64)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        torch.manual_seed(0)
        model = sd.UNet(sd.UNetConfig.tiny()).eval().to(dtype)
        inputs = (latents.to(dtype), torch.tensor(500), text.to(dtype))
        with torch.no_grad():
            expected = model(*inputs)
            installed = {
                part: answers.install_forward(model, cls, kept[part])
                for part, cls in PARTS.items()
            }
            actual = model(*inputs)
        assert all(installed.values()), installed
        torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)
