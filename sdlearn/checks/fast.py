"""Checks for chapter 10's exercises: a fair timer, a convolution's FLOPs, and
the deep-feature cache (its shallow step and its schedule).

- 10.1 `time_alternating(steps, repeats, warmup)` runs on fake steps that move
  a fake clock (`time.perf_counter`, patched while the check runs) by known
  amounts, and log the order they ran in and whether inference mode was on: the
  learner's dict of seconds and the log must be the package's.
- 10.2 `conv_flops(conv, x)` is compared with torch's own FlopCounterMode on
  convolutions with strides, groups, padding, dilation and odd kernels.
- 10.3 `shallow_forward(unet, sample, timestep, context, deep)` and 10.4
  `FeatureCache.forward` are compared with the package's on seeded UNets of
  two and three levels.

Passing answers are kept as "fast:time_alternating", "fast:conv_flops",
"fast:shallow_forward" and "fast:FeatureCache.forward"; the rest of the
chapter measures with them.
"""

from __future__ import annotations

import contextlib
import functools
import time
import types
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sdlearn import fast
from sdlearn.checks import (
    Case,
    Verdict,
    check,
    compare_values,
    harnessed,
    named_slips,
    randn,
    seeded,
)
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.unet import UNet, UNetConfig, timestep_embedding

# --- 10.1: timing in turns --------------------------------------------------------


class _Clock:
    """A fake time.perf_counter that the fake steps move forward."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def _fake_clock(clock: _Clock) -> Iterator[None]:
    real = time.perf_counter
    time.perf_counter = clock
    try:
        yield
    finally:
        time.perf_counter = real


class FakeSteps(dict):
    """{name: [seconds of its 1st run, 2nd run...]}, cycled: what each fake step
    moves the fake clock by. Shown in a verdict by its names."""

    def __repr__(self) -> str:
        return f"({', '.join(self)}): steps that move a fake clock"


def _run_timer(
    fn: Callable, durations: dict[str, list[float]], repeats: int, warmup: int
) -> tuple[dict, list]:
    """fn(steps, repeats, warmup) on fake steps: (its result, the steps' log)."""
    clock, log = _Clock(), []

    def make(name: str) -> Callable[[], str]:
        calls = iter(range(10**6))

        def step() -> str:
            seconds = durations[name][next(calls) % len(durations[name])]
            log.append((name, torch.is_inference_mode_enabled()))
            clock.now += seconds
            return name

        return step

    steps = {name: make(name) for name in durations}
    with _fake_clock(clock):
        runs = fn(steps, repeats, warmup)
    return runs, log


def _slipped_timer(steps, repeats=3, warmup=1, *, slip: str) -> dict:
    """time_alternating with one known slip."""
    names = list(steps)
    runs = {name: [] for name in names}
    mode = contextlib.nullcontext() if slip == "grad" else torch.inference_mode()
    with mode:
        for name in names:
            for _ in range(0 if slip == "no warmup" else warmup):
                if slip == "timed warmup":
                    start = time.perf_counter()
                    steps[name]()
                    runs[name].append(time.perf_counter() - start)
                else:
                    steps[name]()
        if slip == "in blocks":
            order = [name for name in names for _ in range(repeats)]
        else:
            order = [
                name
                for r in range(repeats)
                for name in (names if r % 2 == 0 or slip == "no flip" else names[::-1])
            ]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            runs[name].append(time.perf_counter() - start)
    return runs


TIMER_SLIPS = {
    "no warm-up: run each step `warmup` times, untimed, before the timed rounds "
    "(a model's first run allocates memory and picks kernels)": "no warmup",
    "the warm-up runs were timed too: they are there to be left out": "timed warmup",
    "the same step always went first: flip the order every other round, so that "
    "none always follows another": "no flip",
    "all runs of one step, then all of the next: take turns, one run of each a "
    "round, so that a change in the machine's load hits them alike": "in blocks",
    "the steps ran with autograd on: run everything under "
    "torch.inference_mode(), as inference does": "grad",
}
TIMER_HINTS = [
    "warm every step up first, untimed; then `repeats` rounds, each running "
    "every step once, the order flipped every other round. Time each run with "
    "the performance counter, and do it all in inference mode.",
    "names = list(steps); runs = {name: [] for name in names}; inside `with "
    "torch.inference_mode():` warm up, then for r in range(repeats) loop over "
    "`names if r % 2 == 0 else names[::-1]`.",
    "for name in order: start = time.perf_counter(); steps[name](); "
    "runs[name].append(time.perf_counter() - start); return runs",
]


def check_time_alternating(fn: Callable) -> Verdict:
    """Exercise 10.1: `time_alternating(steps, repeats=3, warmup=1)`."""
    settings = [
        (FakeSteps(fused=[0.5, 0.25], readable=[0.75]), 3, 1),
        (FakeSteps(a=[0.125], b=[0.25, 0.5], c=[1.0, 2.0, 4.0]), 4, 2),
        (FakeSteps(only=[0.5, 1.5]), 2, 0),
    ]
    cases = [Case(args, _run_timer(fast.time_alternating, *args)) for args in settings]
    mistakes = named_slips(_slipped_timer, TIMER_SLIPS, _run_timer)
    return check(
        "Exercise 10.1",
        harnessed(_run_timer, fn),
        cases,
        hints=TIMER_HINTS,
        mistakes=mistakes,
        keep="fast:time_alternating",
    )


# --- 10.2: a convolution's FLOPs -----------------------------------------------


def _counted(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """torch's own count, the reference."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        conv(x)
    return counter.get_total_flops()


def _slipped_flops(conv: nn.Conv2d, x: torch.Tensor, *, slip: str) -> int:
    B, _, H, W = x.shape
    H_out, W_out = fast._conv_output_size(conv, x.shape[-2:])
    if slip == "input size":
        H_out, W_out = H, W
    kh, kw = conv.kernel_size
    groups = 1 if slip == "groups" else conv.groups
    patch = conv.in_channels // groups * (kh if slip == "one side" else kh * kw)
    flops = B * conv.out_channels * H_out * W_out * patch
    if slip == "batch":
        flops //= B
    flops *= 1 if slip == "macs" else 2
    if slip == "bias":
        flops += B * conv.out_channels * H_out * W_out
    return flops


FLOP_SLIPS = {
    "half the count: that is multiply-adds; each is 2 FLOPs, a multiply and an "
    "add": "macs",
    "you counted the input's H x W: an output number is one patch's dot "
    "product, so count the output's H_out x W_out (a stride of 2 halves them)": (
        "input size"
    ),
    "the groups were left out: each output channel reads C_in / groups "
    "channels": "groups",
    "the batch was left out: every image of the batch is convolved": "batch",
    "the bias was counted: torch's counter (and the roofline) counts the "
    "products only": "bias",
    "one side of the kernel: a patch is kh x kw pixels": "one side",
}
FLOP_HINTS = [
    "count the output numbers, then the multiply-adds each one takes: one "
    "patch of the input, across the channels it reads, times the kernel's "
    "pixels; 2 FLOPs each.",
    "H_out = (H + 2 padding - dilation (k - 1) - 1) // stride + 1, and the same "
    "for W; each output reads C_in / groups channels times kh x kw pixels; "
    "there are B x C_out x H_out x W_out outputs.",
    "2 * B * conv.out_channels * H_out * W_out * (conv.in_channels // "
    "conv.groups) * kh * kw, with kh, kw = conv.kernel_size and conv.stride, "
    "conv.padding, conv.dilation pairs for the output size",
]


def _convs() -> list[tuple[nn.Conv2d, torch.Tensor]]:
    """Convolutions and inputs on the meta device: shapes only. The layers are
    built here, where their initialisation's draw is put back, so that a check
    never moves the notebook's random generator."""
    P = functools.partial
    shapes = [
        # first a batch of 5, so that leaving out the batch is no other slip
        (P(nn.Conv2d, 8, 16, 3, stride=2, padding=1), (5, 8, 9, 9)),  # a Downsample
        (P(nn.Conv2d, 8, 16, 3, padding=1), (2, 8, 9, 9)),
        (P(nn.Conv2d, 8, 12, 3, groups=4), (1, 8, 7, 11)),
        (P(nn.Conv2d, 8, 4, 1), (2, 8, 5, 6)),  # a 1x1: a matrix product per pixel
        (P(nn.Conv2d, 4, 8, (3, 5), dilation=2, padding=(1, 2)), (2, 4, 12, 12)),
    ]
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return [(conv(), torch.zeros(shape)) for conv, shape in shapes]


def check_conv_flops(fn: Callable) -> Verdict:
    """Exercise 10.2: `conv_flops(conv, x) -> int`."""
    cases = [Case((conv, x), _counted(conv, x)) for conv, x in _convs()]
    mistakes = named_slips(_slipped_flops, FLOP_SLIPS)
    return check(
        "Exercise 10.2",
        fn,
        cases,
        hints=FLOP_HINTS,
        mistakes=mistakes,
        keep="fast:conv_flops",
    )


# --- 10.3 and 10.4: the deep-feature cache ----------------------------------------

CONFIGS = (
    UNetConfig(  # two levels, as the course's tiny UNet
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_levels=(True, True),
        num_heads=(2, 4),
        cross_attention_dim=24,
        norm_num_groups=8,
    ),
    UNetConfig(  # three levels, two layers each, no attention at level 0
        sample_size=8,
        block_out_channels=(16, 24, 32),
        layers_per_block=2,
        cross_attention_levels=(False, True, True),
        num_heads=(2, 2, 4),
        cross_attention_dim=24,
        norm_num_groups=8,
    ),
)


@functools.cache
def _unet(index: int) -> UNet:
    with torch.device("meta"):
        unet = UNet(CONFIGS[index])
    unet = seeded(unet, seed=1000 + index)
    unet.up_blocks[-1].register_forward_pre_hook(_check_skips)
    return unet


def _check_skips(block: nn.Module, args: tuple) -> None:
    """Before the last up block runs in a check: the skips it will pop are
    level 0's, else a ValueError that says which are missing or too many (torch
    would fail later, in a concatenation or a pop, with no word on why)."""
    h, _, _, skips = args
    if skips and h.shape[0] != skips[-1].shape[0]:
        raise ValueError(
            f"the deep features are of a batch of {h.shape[0]} and this step's of "
            f"{skips[-1].shape[0]}: features kept for another batch do not fit (a "
            "batch of another size starts a new image)"
        )
    wanted = len(block.resnets)  # conv_in's output and one per layer of level 0
    sizes = [tuple(skip.shape[-2:]) for skip in skips]
    if len(skips) == wanted and all(size == h.shape[-2:] for size in sizes):
        return
    raise ValueError(
        f"the last up block was handed {len(skips)} skips of sizes {sizes}; it "
        f"pops {wanted}, all {tuple(h.shape[-2:])}: conv_in's output, then each "
        "layer's of level 0 (its downsampler's output is level 1's, not a skip)"
    )


def _inputs(index: int, batch: int, seed: int) -> tuple:
    """(sample, timestep, context) for one call of a check's UNet."""
    unet = _unet(index)
    size = unet.config.sample_size
    sample = randn(batch, 4, size, size, seed=seed)
    context = randn(batch, 5, unet.config.cross_attention_dim, seed=seed + 1)
    return sample, context


def _slipped_shallow(unet, sample, timestep, context, deep, *, slip: str):
    """shallow_forward with one known slip."""
    timesteps = unet._check_inputs(sample, timestep, context)
    t_emb = timestep_embedding(timesteps, unet.config.block_out_channels[0])
    temb = unet.time_embedding(t_emb.to(sample.dtype))
    h = unet.conv_in(sample)
    skips = [h]
    first = unet.down_blocks[0]
    for i, resnet in enumerate(first.resnets):
        h = resnet(h, temb)
        if first.attentions is not None and slip != "no attention":
            h = first.attentions[i](h, context)
        skips.append(h)
    if slip == "reversed":
        skips.reverse()
    h = unet.up_blocks[-1](deep, temb, context, skips)
    h = unet.conv_norm_out(h)
    return unet.conv_out(h if slip == "no silu" else F.silu(h))


SHALLOW_SLIPS = {
    "the skips went in reversed: push conv_in's output first, then each layer's, "
    "as the full forward does; the up block pops the last first": "reversed",
    "the skips are the ResnetBlocks' outputs, without their SpatialTransformers: "
    "where level 0 has attentions, each layer is a ResnetBlock, then its "
    "SpatialTransformer, and what a layer pushes is the transformer's output "
    "(were they left out, or was the skip pushed before them?)": "no attention",
    "no SiLU after the last norm: the way out is norm, SiLU, conv_out": "no silu",
}
SHALLOW_HINTS = [
    "it is chapter 04's UNet forward with the middle cut out: the time embedding, "
    "conv_in and level 0's layers on the way down, then the last up block, fed "
    "the kept `deep` features instead of what the deeper levels would compute, "
    "then the way out.",
    "the last up block pops conv_in's output and one output per layer of level 0 "
    "(not the downsampler's, which feeds level 1); push them in that order, and "
    "call unet.up_blocks[-1](deep, temb, context, skips).",
    "t_emb = timestep_embedding(timesteps, unet.config.block_out_channels[0]); "
    "temb = unet.time_embedding(t_emb.to(sample.dtype)); h = unet.conv_in(sample); "
    "skips = [h]; for each resnet i of unet.down_blocks[0]: h = resnet(h, temb), "
    "then its attentions[i](h, context) if it has them, skips.append(h)",
]


def _shallow_cases() -> list[Case]:
    cases = []
    for index, batch, t in ((0, 2, 500), (1, 3, 20), (0, 1, 999)):
        unet = _unet(index)
        earlier, context = _inputs(index, batch, seed=10 * index + batch)
        sample = earlier + 0.1 * randn(*earlier.shape, seed=7)
        timestep = torch.full((batch,), t)
        with torch.no_grad():
            _, deep = fast.deep_forward(unet, earlier, timestep + 25, context)
            expected = fast.shallow_forward(unet, sample, timestep, context, deep)
        cases.append(Case((unet, sample, timestep, context, deep), expected))
    return cases


def check_shallow_forward(fn: Callable) -> Verdict:
    """Exercise 10.3: `shallow_forward(unet, sample, timestep, context, deep)`."""
    mistakes = named_slips(_slipped_shallow, SHALLOW_SLIPS)
    with torch.no_grad():
        return check(
            "Exercise 10.3",
            fn,
            _shallow_cases(),
            atol=1e-5,
            rtol=1e-5,
            hints=SHALLOW_HINTS,
            mistakes=mistakes,
            keep="fast:shallow_forward",
        )


def _slipped_cache_forward(self, sample, timestep, encoder_hidden_states, *, slip):
    """FeatureCache.forward with one known slip."""
    t = float(torch.as_tensor(timestep).flatten()[0])
    new_image = self.deep is None or self.deep.shape[0] != sample.shape[0]
    if slip != "never new":
        new_image = new_image or t >= self.last_timestep
    if new_image:
        if slip == "calls kept":
            self.deep, self.last_timestep = None, None
        else:
            self.reset()
    full = slip == "always full" or self.calls % self.every == 0
    if slip == "calls kept" and self.deep is None:
        full = True
    self.calls += 1
    self.last_timestep = t
    if full:
        self.full_calls += 1
        noise, self.deep = fast.deep_forward(
            self.unet, sample, timestep, encoder_hidden_states
        )
        return noise
    return fast.shallow_forward(
        self.unet, sample, timestep, encoder_hidden_states, self.deep
    )


CACHE_SLIPS = {
    "a new image reused the last image's features: when a call's timestep is no "
    "smaller than the last call's, a new image has begun, so reset() first": (
        "never new"
    ),
    "every call ran in full: only calls 0, every, 2 every... of an image do; "
    "the others run shallow_forward on the kept features": "always full",
    "the call count went on across images: reset() at a new image, so that its "
    "calls count from 0 again": "calls kept",
}
CACHE_HINTS = [
    "first decide whether this call starts a new image: nothing kept, a "
    "timestep no smaller than the last, or another batch size; if so, reset. "
    "Then run in full on calls 0, every, 2 every... and keep the deep features "
    "the full step returns; in between, run the shallow step on the kept ones.",
    "t = float(torch.as_tensor(timestep).flatten()[0]); a new image: self.deep is "
    "None or t >= self.last_timestep or self.deep.shape[0] != sample.shape[0]. "
    "Count every call in self.calls and every full one in self.full_calls; "
    "remember t in self.last_timestep.",
    "full = self.calls % self.every == 0; self.calls += 1; self.last_timestep = "
    "t; if full: self.full_calls += 1; noise, self.deep = deep_forward(self.unet, "
    "sample, timestep, encoder_hidden_states); return noise",
]


class CacheRun(NamedTuple):
    """One run of a check's FeatureCache: which UNet, its period, and the
    (batch size, timestep) of each call, in order."""

    unet: int  # index into CONFIGS
    every: int
    calls: tuple[tuple[int, int], ...]

    def __repr__(self) -> str:
        levels = len(CONFIGS[self.unet].block_out_channels)
        return (
            f"a {levels}-level UNet, full every {self.every}, calls of (batch, "
            f"timestep) {list(self.calls)}"
        )


CACHE_RUNS = (  # two images, then a batch of another size
    CacheRun(0, 2, ((2, 900), (2, 800), (2, 700), (2, 600), (2, 500), (2, 900))),
    CacheRun(1, 3, ((1, 999), (1, 666), (2, 500), (2, 400), (2, 300), (2, 200))),
    CacheRun(1, 2, ((1, 999), (1, 666), (1, 333), (1, 1), (1, 800), (1, 800))),
)


def _run_cache(forward: Callable, run: CacheRun) -> tuple:
    """Each call's noise, then how many calls of the last image ran in full."""
    index, every, calls = run
    cache = fast.FeatureCache(_unet(index), every)
    cache.forward = types.MethodType(forward, cache)
    outputs = []
    with torch.no_grad():
        for i, (batch, t) in enumerate(calls):
            sample, context = _inputs(index, batch, seed=i)
            outputs.append(cache(sample, torch.full((batch,), t), context))
    return (*outputs, cache.full_calls)


def _cache_problem(actual: object, case: Case) -> str | None:
    """What a run's outputs got wrong, by call, in words."""
    (run,) = case.args
    *noise, full_calls = case.expected
    if not isinstance(actual, tuple) or len(actual) != len(case.expected):
        return "the run did not give one output per call"
    for i, (got, want) in enumerate(zip(actual, noise, strict=False)):
        problem = compare_values(got, want, atol=1e-5, rtol=1e-5)
        if problem:
            batch, t = run.calls[i]
            return f"call {i + 1} (batch {batch}, timestep {t}) {problem}"
    if actual[-1] != full_calls:
        return (
            f"self.full_calls is {actual[-1]!r} after the last call, expected "
            f"{full_calls}: count each full call of the image"
        )
    return None


def check_cache_forward(fn: Callable) -> Verdict:
    """Exercise 10.4: `FeatureCache.forward(self, sample, timestep,
    encoder_hidden_states)`."""
    cases = [
        Case((run,), _run_cache(fast.FeatureCache.forward, run)) for run in CACHE_RUNS
    ]
    mistakes = named_slips(_slipped_cache_forward, CACHE_SLIPS, _run_cache)
    return check(
        "Exercise 10.4",
        harnessed(_run_cache, fn),
        cases,
        atol=1e-5,
        rtol=1e-5,
        compare=_cache_problem,
        hints=CACHE_HINTS,
        mistakes=mistakes,
        keep="fast:FeatureCache.forward",
    )
