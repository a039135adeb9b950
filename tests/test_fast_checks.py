"""Chapter 10's checks: right answers pass and are kept, every named mistake
is named, an untouched exercise gets no hint, a wrong answer is not kept, and
checking draws from no global generator."""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.nn.functional as F

from sdlearn import fast, kernels, merging
from sdlearn.checks import fast as checks
from sdlearn.checks import fast_attention as attention_checks
from sdlearn.checks import named_slips
from sdlearn.kernels import EXP2_CUBIC, LOG2_E
from sdlearn.merging import Merge, grid_cells
from sdlearn.unet import timestep_embedding
from tests.check_contract import (
    assert_mistake_named,
    assert_passes_and_is_kept,
    assert_random_state_untouched,
    assert_three_hint_tiers,
    assert_untouched_gets_no_hint,
    assert_wrong_is_not_kept,
    named_mistakes,
    off_by_half,
)

# --- right answers, as a learner writes them ----------------------------------------


def time_alternating(steps, repeats=3, warmup=1):
    runs = {name: [] for name in steps}
    with torch.inference_mode():
        for step in steps.values():
            for _ in range(warmup):
                step()
        for r in range(repeats):
            order = list(steps) if r % 2 == 0 else list(reversed(steps))
            for name in order:
                start = time.perf_counter()
                steps[name]()
                runs[name].append(time.perf_counter() - start)
    return runs


def conv_flops(conv, x):
    B, _, H, W = x.shape
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    (ph, pw), (dh, dw) = conv.padding, conv.dilation
    H_out = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    W_out = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    per_output = conv.in_channels // conv.groups * kh * kw
    return 2 * B * conv.out_channels * H_out * W_out * per_output


def shallow_forward(unet, sample, timestep, context, deep):
    timesteps = unet._check_inputs(sample, timestep, context)
    emb = timestep_embedding(timesteps, unet.config.block_out_channels[0])
    temb = unet.time_embedding(emb.to(sample.dtype))
    h = unet.conv_in(sample)
    skips = [h]
    level = unet.down_blocks[0]
    for i in range(len(level.resnets)):
        h = level.resnets[i](h, temb)
        if level.attentions is not None:
            h = level.attentions[i](h, context)
        skips.append(h)
    h = unet.up_blocks[-1](deep, temb, context, skips)
    return unet.conv_out(F.silu(unet.conv_norm_out(h)))


def cache_forward(self, sample, timestep, encoder_hidden_states, batch_rule=True):
    t = float(torch.as_tensor(timestep).flatten()[0])
    other_batch = batch_rule and self.deep is not None and len(sample) != len(self.deep)
    if self.deep is None or t >= self.last_timestep or other_batch:
        self.reset()
    full = self.calls % self.every == 0
    self.calls += 1
    self.last_timestep = t
    if not full:
        return shallow_forward(
            self.unet, sample, timestep, encoder_hidden_states, self.deep
        )
    self.full_calls += 1
    noise, self.deep = deep_forward(self.unet, sample, timestep, encoder_hidden_states)
    return noise


def fused_forward(self, hidden_states):
    B, T, _ = hidden_states.shape
    q, k, v = self.to_qkv(hidden_states).chunk(3, dim=-1)
    q, k, v = (x.view(B, T, self.heads, -1).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(B, T, -1)
    return self.to_out[1](self.to_out[0](out))


def bipartite_merge(x, height, width, r):
    dst, src = grid_cells(height, width)
    unit = F.normalize(x, dim=-1)
    similarity = torch.einsum("bsc,bdc->bsd", unit[:, src], unit[:, dst])
    best, into = similarity.max(dim=-1)
    order = torch.sort(best, dim=-1, descending=True).indices
    return Merge(dst, src, order[:, r:], order[:, :r], into.gather(1, order[:, :r]))


def exp_by_powers_of_two(x):
    t = x * LOG2_E
    whole = t.floor()
    fraction = t - whole
    c0, c1, c2, c3 = EXP2_CUBIC
    cubic = c0 + c1 * fraction + c2 * fraction**2 + c3 * fraction**3
    return cubic * torch.exp2(whole)


deep_forward = fast.deep_forward  # in a learner's kept file, the package's

EXERCISES = [
    (
        checks.check_time_alternating,
        time_alternating,
        fast.time_alternating,
        "fast:time_alternating",
        "Exercise 10.1",
    ),
    (
        checks.check_conv_flops,
        conv_flops,
        fast.conv_flops,
        "fast:conv_flops",
        "Exercise 10.2",
    ),
    (
        checks.check_shallow_forward,
        shallow_forward,
        fast.shallow_forward,
        "fast:shallow_forward",
        "Exercise 10.3",
    ),
    (
        checks.check_cache_forward,
        cache_forward,
        fast.FeatureCache.forward,
        "fast:FeatureCache.forward",
        "Exercise 10.4",
    ),
    (
        attention_checks.check_fused_forward,
        fused_forward,
        fast.FusedSelfAttention.forward,
        "fast:FusedSelfAttention.forward",
        "Exercise 10.5",
    ),
    (
        attention_checks.check_bipartite_merge,
        bipartite_merge,
        merging.bipartite_merge,
        "merging:bipartite_merge",
        "Exercise 10.6",
    ),
    (
        attention_checks.check_exp_by_powers_of_two,
        exp_by_powers_of_two,
        kernels.exp_by_powers_of_two,
        "kernels:exp_by_powers_of_two",
        "Exercise 10.7",
    ),
]


@pytest.mark.parametrize("check, right, package, part, exercise", EXERCISES)
def test_a_right_answer_passes_and_is_kept(
    check, right, package, part, exercise, capsys
):
    assert_passes_and_is_kept(check, right, package, part, capsys)


_slipped = named_slips  # each mistake as the learner's function makes it


@pytest.mark.parametrize(
    "check, exercise, message, wrong",
    named_mistakes(
        [
            (
                checks.check_time_alternating,
                "Exercise 10.1",
                _slipped(checks._slipped_timer, checks.TIMER_SLIPS),
            ),
            (
                checks.check_conv_flops,
                "Exercise 10.2",
                _slipped(checks._slipped_flops, checks.FLOP_SLIPS),
            ),
            (
                checks.check_shallow_forward,
                "Exercise 10.3",
                _slipped(checks._slipped_shallow, checks.SHALLOW_SLIPS),
            ),
            (
                checks.check_cache_forward,
                "Exercise 10.4",
                _slipped(checks._slipped_cache_forward, checks.CACHE_SLIPS),
            ),
            (
                attention_checks.check_fused_forward,
                "Exercise 10.5",
                _slipped(
                    attention_checks._slipped_forward, attention_checks.FUSED_SLIPS
                ),
            ),
            (
                attention_checks.check_bipartite_merge,
                "Exercise 10.6",
                _slipped(attention_checks._slipped_merge, attention_checks.MERGE_SLIPS),
            ),
            (
                attention_checks.check_exp_by_powers_of_two,
                "Exercise 10.7",
                _slipped(attention_checks._slipped_exp, attention_checks.EXP_SLIPS),
            ),
        ]
    ),
)
def test_each_named_mistake_is_recognised(check, exercise, message, wrong, capsys):
    assert_mistake_named(check, exercise, message, wrong, capsys)


def test_a_wrong_answer_is_not_kept_and_forgets_the_old_one(capsys):
    package, part = fast.conv_flops, "fast:conv_flops"
    wrong = off_by_half(package)
    assert_wrong_is_not_kept(
        checks.check_conv_flops, conv_flops, wrong, package, part, capsys
    )


@pytest.mark.parametrize("check, right, package, part, exercise", EXERCISES)
def test_an_untouched_exercise_gets_a_reminder_and_no_hint(
    check, right, package, part, exercise, capsys
):
    assert_untouched_gets_no_hint(check, capsys)


@pytest.mark.parametrize("check, right, package, part, exercise", EXERCISES)
def test_hints_come_in_three_tiers_and_the_first_gives_no_code(
    check, right, package, part, exercise
):
    assert_three_hint_tiers(check, exercise, ("self.", "(", "torch."))


def test_a_timer_on_the_real_clock_is_not_taken_for_the_fake_one(capsys):
    def wall_clock(steps, repeats=3, warmup=1):
        runs = {name: [] for name in steps}
        for step in steps.values():
            step()
        for r in range(repeats):
            for name in list(steps) if r % 2 == 0 else list(reversed(steps)):
                start = time.time()
                steps[name]()
                runs[name].append(time.time() - start)
        return runs

    assert not checks.check_time_alternating(wall_clock)
    assert "❌ Exercise 10.1" in capsys.readouterr().out


def test_a_cache_that_never_refreshes_fails(capsys):
    def stale(self, sample, timestep, encoder_hidden_states):
        if self.deep is None:
            noise, self.deep = fast.deep_forward(
                self.unet, sample, timestep, encoder_hidden_states
            )
            return noise
        return fast.shallow_forward(
            self.unet, sample, timestep, encoder_hidden_states, self.deep
        )

    assert not checks.check_cache_forward(stale)
    assert "❌ Exercise 10.4" in capsys.readouterr().out


def test_checking_draws_from_no_global_generator():
    assert_random_state_untouched(
        [
            (checks.check_time_alternating, time_alternating),
            (checks.check_conv_flops, conv_flops),
            (checks.check_shallow_forward, shallow_forward),
            (checks.check_cache_forward, cache_forward),
            (attention_checks.check_fused_forward, fused_forward),
            (attention_checks.check_bipartite_merge, bipartite_merge),
            (attention_checks.check_exp_by_powers_of_two, exp_by_powers_of_two),
        ]
    )


def test_a_cache_that_ignores_the_batch_size_fails(capsys):
    def no_batch_rule(self, sample, timestep, encoder_hidden_states):
        return cache_forward(self, sample, timestep, encoder_hidden_states, False)

    assert not checks.check_cache_forward(no_batch_rule)
    out = capsys.readouterr().out
    assert "❌ Exercise 10.4" in out
    assert "the deep features are of a batch of 1 and this step's of 2" in out


def test_a_cache_that_forgets_to_count_full_calls_is_told_which_count(capsys):
    def uncounted(self, sample, timestep, encoder_hidden_states):
        out = cache_forward(self, sample, timestep, encoder_hidden_states)
        self.full_calls = 0
        return out

    assert not checks.check_cache_forward(uncounted)
    assert "self.full_calls is 0 after the last call" in capsys.readouterr().out


def test_a_shallow_step_with_the_wrong_skips_is_told_which(capsys):
    def whole_level(unet, sample, timestep, context, deep):
        timesteps = unet._check_inputs(sample, timestep, context)
        emb = timestep_embedding(timesteps, unet.config.block_out_channels[0])
        temb = unet.time_embedding(emb)
        h = unet.conv_in(sample)
        skips = [h]
        unet.down_blocks[0](h, temb, context, skips)  # its downsampler too
        h = unet.up_blocks[-1](deep, temb, context, skips)
        return unet.conv_out(F.silu(unet.conv_norm_out(h)))

    assert not checks.check_shallow_forward(whole_level)
    out = capsys.readouterr().out
    assert "the last up block was handed 3 skips" in out
    assert "its downsampler's output is level 1's" in out


def test_a_case_names_its_unet_by_shape_not_by_layers(capsys):
    reversed_skips = functools.partial(checks._slipped_shallow, slip="reversed")
    assert not checks.check_shallow_forward(reversed_skips)
    out = capsys.readouterr().out
    assert "(a UNet of 2 levels (16, 32), a tensor of shape" in out
    assert "SpatialTransformer(" not in out


def test_an_unnamed_exponential_mistake_is_shown_where_it_is_worst(capsys):
    def no_cubic_term(x):
        t = x * LOG2_E
        n = t.floor()
        f = t - n
        c0, c1, c2, _ = EXP2_CUBIC
        return torch.ldexp(c0 + f * (c1 + f * c2), n)

    assert not attention_checks.check_exp_by_powers_of_two(no_cubic_term)
    out = capsys.readouterr().out
    # relative, at an x of the input: not the absolute error of the largest values
    assert "wrong values: the largest relative error is" in out and "at x = " in out
