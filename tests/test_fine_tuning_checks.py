"""Chapter 09's exercise checks: right answers pass and are kept, the usual
mistakes are named, an unsolved exercise gets no hint, a wrong answer is not
kept, and the kept answers are drop-ins for the package."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.checks import answers
from sdlearn.checks import fine_tuning as checks
from sdlearn.checks import lora as lora_checks
from sdlearn.checks import textual_inversion as ti_checks
from sdlearn.lora import (
    LoRAConv2d,
    LoRALinear,
    add_lora,
    lora_layers,
    lora_state_dict,
)
from sdlearn.textual_inversion import NewTokenEmbedding, TextEncoderLoss, add_token
from tests.check_contract import (
    assert_mistake_named,
    assert_passes_and_is_kept,
    assert_untouched_gets_no_hint,
    assert_wrong_is_not_kept,
    named_mistakes,
)
from tests.helpers import assert_refused

# --- right answers, written as a learner would ---


def lora_forward(self, x):
    out = self.base(x)
    if self.merged or self.multiplier == 0:
        return out
    return out + self.scale * self.lora_B(self.lora_A(x))


def delta_weight(self):
    B = self.lora_B.weight.flatten(1)
    A = self.lora_A.weight.flatten(1)
    return self.scale * (B @ A).view_as(self.base.weight)


def merge(self):
    if self.merged:
        raise ValueError("merged already")
    with torch.no_grad():
        self._unmerged_weight = self.base.weight.detach().clone()
        self.base.weight += self.delta_weight()


def unmerge(self):
    if not self.merged:
        raise ValueError("not merged")
    with torch.no_grad():
        self.base.weight.copy_(self._unmerged_weight)
    self._unmerged_weight = None


def conv_factors(base, rank):
    factory = {"device": base.weight.device, "dtype": base.weight.dtype}
    A = nn.Conv2d(
        base.in_channels,
        rank,
        base.kernel_size,
        stride=base.stride,
        padding=base.padding,
        dilation=base.dilation,
        padding_mode=base.padding_mode,
        bias=False,
        **factory,
    )
    return A, nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)


def add_token_by_hand(tokenizer, text_encoder, token, initializer):
    ids = tokenizer.encode(initializer)
    if len(ids) != 1:
        raise ValueError("one token please")
    (token_id,) = tokenizer.add_tokens(token)
    table = text_encoder.resize_token_embeddings(tokenizer.vocab_size)
    with torch.no_grad():
        table.weight[token_id] = table.weight[ids[0]].clone()
    return token_id


def lora_state_dict_by_hand(model, prefix="unet"):
    # the scale folded into A instead of B: a reader computes the same B A
    state = {}
    for name, adapter in lora_layers(model):
        key = f"{prefix}.{name}" if prefix else name
        scale = adapter.alpha / adapter.rank
        state[f"{key}.lora_A.weight"] = adapter.lora_A.weight.detach() * scale
        state[f"{key}.lora_B.weight"] = adapter.lora_B.weight.detach().clone()
    return state


def add_lora_by_hand(model, rank=4, alpha=None, targets=("to_q",)):
    model.requires_grad_(False)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
        and any(name == t or name.endswith("." + t) for t in targets)
    ]
    adapters = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child) if not child.isdigit() else parent[int(child)]
        kind = LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear
        adapters[name] = kind(base, rank, alpha)
        setattr(parent, child, adapters[name])
    return adapters


def new_token_embedding_forward(self, input_ids):
    return F.embedding(input_ids, torch.cat([self.frozen, self.new]))


def new_token_embedding_where(self, input_ids):
    # old ids from the frozen table, new ones from `new`, chosen per position
    V = self.frozen.shape[0]
    old = self.frozen[input_ids.clamp(max=V - 1)]
    fresh = self.new[(input_ids - V).clamp(min=0)]
    return torch.where((input_ids >= V)[..., None], fresh, old)


def param_groups(self, lr):
    text = [p for p in self.text_encoder.parameters() if p.requires_grad]
    in_text = {id(p) for p in text}
    rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_text]
    groups = [{"params": text, "lr": self.text_encoder_lr or lr}]
    return groups + ([{"params": rest, "lr": lr}] if rest else [])


# (check, right answer, the package's own, the part it is kept as)
EXERCISES = [
    (
        checks.check_lora_forward,
        lora_forward,
        LoRALinear.forward,
        "lora:LoRALinear.forward",
    ),
    (
        checks.check_delta_weight,
        delta_weight,
        LoRALinear.delta_weight,
        "lora:LoRALinear.delta_weight",
    ),
    (checks.check_merge, merge, LoRALinear.merge, "lora:LoRALinear.merge"),
    (checks.check_unmerge, unmerge, LoRALinear.unmerge, "lora:LoRALinear.unmerge"),
    (checks.check_add_lora, add_lora_by_hand, add_lora, "lora:add_lora"),
    (
        checks.check_conv_factors,
        conv_factors,
        LoRAConv2d.factors,
        "lora:LoRAConv2d.factors",
    ),
    (
        checks.check_lora_state_dict,
        lora_state_dict_by_hand,
        lora_state_dict,
        "lora:lora_state_dict",
    ),
    (
        checks.check_add_token,
        add_token_by_hand,
        add_token,
        "textual_inversion:add_token",
    ),
    (
        checks.check_new_token_embedding,
        new_token_embedding_forward,
        NewTokenEmbedding.forward,
        "textual_inversion:NewTokenEmbedding.forward",
    ),
    (
        checks.check_param_groups,
        param_groups,
        TextEncoderLoss.param_groups,
        "textual_inversion:TextEncoderLoss.param_groups",
    ),
]
IDS = [part.split(":")[1] for *_, part in EXERCISES]


@pytest.mark.parametrize("check, right, package, part", EXERCISES, ids=IDS)
def test_a_right_answer_passes_and_is_kept(check, right, package, part, capsys):
    assert_passes_and_is_kept(check, right, package, part, capsys)


def test_other_right_answers_pass(capsys):
    assert checks.check_new_token_embedding(new_token_embedding_where)


# --- the usual mistakes are named ---

MISTAKES = [
    (checks.check_lora_forward, "Exercise 09.1", lora_checks.FORWARD_MISTAKES),
    (checks.check_delta_weight, "Exercise 09.2", lora_checks.DELTA_MISTAKES),
    (checks.check_merge, "Exercise 09.3", lora_checks.MERGE_MISTAKES),
    (checks.check_unmerge, "Exercise 09.4", lora_checks.UNMERGE_MISTAKES),
    (checks.check_conv_factors, "Exercise 09.5", checks.FACTOR_MISTAKES),
    (checks.check_add_lora, "Exercise 09.6", lora_checks.ADD_MISTAKES),
    (checks.check_add_token, "Exercise 09.7", ti_checks.TOKEN_MISTAKES),
    (
        checks.check_new_token_embedding,
        "Exercise 09.8",
        ti_checks.EMBEDDING_MISTAKES,
    ),
    (checks.check_param_groups, "Exercise 09.9", ti_checks.GROUP_MISTAKES),
    (checks.check_lora_state_dict, "Exercise 09.10", checks.FILE_MISTAKES),
]


@pytest.mark.parametrize("check, exercise, message, wrong", named_mistakes(MISTAKES))
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


def merge_in_autograd(self):
    # no torch.no_grad(): autograd refuses to record the in-place change
    self._unmerged_weight = self.base.weight.detach().clone()
    self.base.weight += self.delta_weight()


def forward_swapped(self, x):
    return self.base(x) + self.scale * self.lora_A(self.lora_B(x))


def embedding_detached(self, input_ids):
    return F.embedding(input_ids, torch.cat([self.frozen, self.new.detach()]))


@pytest.mark.parametrize(
    ("check", "wrong", "words"),
    [
        (checks.check_merge, merge_in_autograd, "raised"),
        (checks.check_lora_forward, forward_swapped, "raised RuntimeError"),
        (checks.check_new_token_embedding, embedding_detached, "no gradient"),
    ],
)
def test_other_slips_fail_with_a_hint(check, wrong, words, capsys):
    assert words in assert_refused(check, wrong, capsys)


def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(capsys):
    check, right, package, part = EXERCISES[0]
    assert_wrong_is_not_kept(check, right, forward_swapped, package, part, capsys)


@pytest.mark.parametrize("check", [e[0] for e in EXERCISES], ids=IDS)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(check, capsys):
    assert_untouched_gets_no_hint(check, capsys)


def test_hints_come_on_request_one_tier_more_each_time(capsys):
    assert not checks.check_merge(
        lora_checks.MERGE_MISTAKES[next(iter(lora_checks.MERGE_MISTAKES))]
    )
    capsys.readouterr()
    checks.hint("Exercise 09.3")
    out = capsys.readouterr().out
    assert "Hint 2 of 3" in out and "_unmerged_weight" in out


# --- the kept answers are drop-ins for the package ---


def test_the_kept_lora_runs_a_model_as_the_package(answers_home, capsys):
    """What the chapter does: the kept add_lora wraps a UNet, the kept methods
    run its adapters; the outputs, merged and unmerged, are the package's."""
    for check, right, *_ in EXERCISES[:6]:
        assert check(right)
    kept = answers.kept("lora")
    from sdlearn.unet import UNet
    from tests.helpers import UNET_CONFIG

    torch.manual_seed(0)
    model = UNet(UNET_CONFIG).eval()
    reference = UNet(UNET_CONFIG).eval()
    reference.load_state_dict(model.state_dict())
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1")
    adapters = kept["add_lora"](model, rank=2, alpha=4.0, targets=targets)
    expected = add_lora(reference, rank=2, alpha=4.0, targets=targets)
    assert list(adapters) == list(expected)
    with torch.no_grad():
        for (_, a), (_, b) in zip(
            lora_layers(model), lora_layers(reference), strict=True
        ):
            nn.init.normal_(b.lora_B.weight, std=0.1)
            a.load_state_dict(b.state_dict())
            for name in ("forward", "delta_weight", "merge", "unmerge"):
                method = kept[f"LoRALinear.{name}"]
                setattr(a, name, types.MethodType(method, a))
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), reference(*inputs))
        for _, adapter in lora_layers(model):
            adapter.merge()
        torch.testing.assert_close(
            model(*inputs), reference(*inputs), atol=1e-5, rtol=1e-5
        )
        for _, adapter in lora_layers(model):
            adapter.unmerge()
    assert all(not a.merged for _, a in lora_layers(model))
    torch.testing.assert_close(
        model.state_dict(), reference.state_dict(), atol=0, rtol=0
    )


def test_a_merge_that_keeps_an_alias_is_told_to_clone(capsys):
    # the alias changes with the weight: what is kept is the merged weight
    def merge(self):
        if self.merged:
            raise ValueError("merged already")
        with torch.no_grad():
            self._unmerged_weight = self.base.weight
            self.base.weight += self.delta_weight()

    assert not checks.check_merge(merge)
    assert "an alias of self.base.weight changes with it" in capsys.readouterr().out
