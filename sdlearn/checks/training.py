"""Checks for chapter 07's training exercises: the loss, the learning rate, the EMA.

Every reference is sdlearn.training's own code, which tests/test_training.py
holds to its behaviour (a loss that learns, exact resumes): `DiffusionLoss` for
the loss of one batch, `lr_factor` for the schedule and `EMA` for the average of
the weights.

The loss check watches the UNet: a small wrapper records the noisy latents, the
timesteps and the text tokens the learner's function hands it, so a failure
names the first of them that differs from the reference's, which is where the
mistake is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sdlearn.checks import Case, Verdict, check, randn, tensor_form_problem
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.diffusion_loss import DiffusionLoss
from sdlearn.schedulers.ddpm import DDPMScheduler
from sdlearn.training import EMA, TrainConfig, lr_factor
from sdlearn.unet import UNet, UNetConfig


class Inputs:
    """The arguments of one case, described in a few words when a case fails
    (their own reprs are pages of numbers)."""

    def __init__(self, description: str, *args: Any) -> None:
        self.description = description
        self.args = args

    def __repr__(self) -> str:
        return self.description


def _unpacked(fn: Callable) -> Callable:
    """The learner's function, called with the arguments an `Inputs` holds."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> Any:
        return fn(*inputs.args)

    return call


# --- Exercise 07.1: the loss of one batch ----------------------------------------

B = 8  # images per batch in the cases
LATENT_SHAPE = (B, 4, 8, 8)  # (B, C, h, w): the tiny VAE's latents
CAPTIONS = 6  # rows of the text-token table; row 0 is the empty prompt
TOKEN_SHAPE = (CAPTIONS, 77, 64)  # (N_captions, T, D)

LOSS_HINT = (
    "draw with `generator`, in this order: (1) eps = torch.randn(mean.shape) for "
    "z0 = (mean + std * eps) * scaling_factor; (2) t = torch.randint(0, "
    "num_train_timesteps, (B,)); (3) noise = torch.randn(z0.shape); (4) u = "
    "torch.rand(B). Then z_t = scheduler.add_noise(z0, noise, t); the rows are "
    "the captions, with row 0 (the empty prompt) where u < caption_dropout; and "
    "the loss is F.mse_loss(unet(z_t, t, text_tokens[rows]), noise)."
)


class UNetRecorder(nn.Module):
    """Wraps a UNet and keeps what every call gave it: (sample, timestep, context)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.calls: list[tuple[Any, Any, Any]] = []

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        self.calls.append(
            tuple(
                v.detach().clone() if isinstance(v, torch.Tensor) else v
                for v in (sample, timestep, encoder_hidden_states)
            )
        )
        return self.unet(sample, timestep, encoder_hidden_states)

    def __repr__(self) -> str:
        return "(a tiny UNet that records its inputs)"


@functools.cache
def _check_unet() -> UNet:
    """A tiny UNet with random weights, its output layer included, so that its
    prediction depends on every input."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's seed alone
        torch.manual_seed(0)
        unet = UNet(UNetConfig.tiny(cross_attention_dim=TOKEN_SHAPE[-1])).eval()
        with torch.no_grad():
            nn.init.normal_(unet.conv_out.weight, std=0.05)
    return unet


def _loss_cases() -> list[Case]:
    cases = []
    # (seed, caption_dropout, scaling_factor): none, some and all captions dropped
    for seed, dropout, scale in ((0, 0.5, 0.33718), (1, 0.0, 0.18215), (2, 1.0, 1.0)):
        batch = {
            "mean": 3 * randn(*LATENT_SHAPE, seed=seed),
            "std": 0.1 * randn(*LATENT_SHAPE, seed=seed + 10).abs(),
            "caption": torch.randint(
                1, CAPTIONS, (B,), generator=torch.Generator().manual_seed(seed)
            ),
        }
        text_tokens = randn(*TOKEN_SHAPE, seed=seed + 20)
        scheduler = DDPMScheduler()
        reference = UNetRecorder(_check_unet())
        with torch.no_grad():
            loss, _ = DiffusionLoss(reference, scheduler, text_tokens, scale, dropout)(
                batch, torch.Generator().manual_seed(seed + 30)
            )
        sample, timestep, context = reference.calls[0]
        # the learner's UNet: a fresh recorder around the same weights
        inputs = Inputs(
            f"for a batch of {B} latents {LATENT_SHAPE[1:]}, scaling_factor "
            f"{scale}, caption_dropout {dropout}",
            UNetRecorder(_check_unet()),
            scheduler,
            batch,
            text_tokens,
            scale,
            dropout,
            torch.Generator().manual_seed(seed + 30),
        )
        expected = {
            "loss": loss,
            "sample": sample,
            "timestep": timestep,
            "context": context,
        }
        cases.append(Case((inputs,), expected))
    return cases


def _close(actual: Any, expected: torch.Tensor) -> bool:
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    return torch.allclose(actual.double(), expected.double(), atol=1e-5, rtol=1e-5)


def _loss_problem(actual: Any, case: Case) -> str | None:
    recorder, _, _, text_tokens, _, dropout, _ = case.args[0].args
    expected = case.expected
    if len(recorder.calls) != 1:
        return (
            f"called the UNet {len(recorder.calls)} times; call it once, on the "
            "whole noisy batch"
        )
    sample, timestep, context = recorder.calls[0]
    if not isinstance(timestep, torch.Tensor) or not torch.equal(
        timestep.long().flatten(), expected["timestep"]
    ):
        return (
            "the timesteps differ from the reference's: draw them second, after "
            "the posterior's noise, as torch.randint(0, num_train_timesteps, (B,), "
            "generator=generator)"
        )
    if not _close(context, expected["context"]):
        dropped = (expected["context"] == text_tokens[0]).all(dim=(1, 2))  # (B,)
        if (
            isinstance(context, torch.Tensor)
            and context.shape == expected["context"].shape
            and dropped.any()
            and (context[dropped] == 0).all()
        ):
            return (
                "the dropped captions became zeros; they must become the empty "
                "prompt's tokens, row 0 of text_tokens (the text encoder's output "
                "for '' is not zero)"
            )
        return (
            "the text tokens differ from the reference's (caption_dropout "
            f"{dropout:g}): a caption is dropped where torch.rand(B) < "
            "caption_dropout, drawn last, and its row becomes 0"
        )
    if not _close(sample, expected["sample"]):
        return (
            "the noisy latents given to the UNet differ from the reference's: "
            "z0 = (mean + std * eps) * scaling_factor, then "
            "scheduler.add_noise(z0, noise, t)"
        )
    problem = tensor_form_problem(actual, expected["loss"], " (a 0-dim tensor)")
    if problem:
        return problem
    if not _close(actual, expected["loss"]):
        return (
            f"the UNet got the right inputs, but the loss is {actual.item():.5f}, "
            f"expected {expected['loss'].item():.5f}: the target is the noise, "
            "and the loss the mean of the squared errors"
        )
    return None


def check_diffusion_loss(fn: Callable) -> Verdict:
    """Exercise 07.1: the loss of one batch, as `DiffusionLoss.forward`."""
    return check(
        "Exercise 07.1",
        _unpacked(fn),
        _loss_cases(),
        hint=LOSS_HINT,
        compare=_loss_problem,
    )


# --- Exercise 07.2: warm-up, then cosine ------------------------------------------

# (steps, warmup_steps, min_lr_ratio); every case also asks beyond the last step
LR_CONFIGS = ((100, 10, 0.1), (1000, 0, 0.0), (60, 20, 0.5), (6000, 200, 0.1))
EXTRA_STEPS = 10


def _all_factors(fn: Callable) -> Callable:
    """The learner's `fn(step, config)` at every step of a run, and a few after."""

    @functools.wraps(fn)
    def factors(inputs: Inputs) -> list[Any]:
        (config,) = inputs.args
        return [fn(step, config) for step in range(config.steps + EXTRA_STEPS)]

    return factors


def _lr_problem(actual: Any, case: Case) -> str | None:
    (config,) = case.args[0].args
    values = []
    for step, value in enumerate(actual):
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            return f"at step {step} returned {value!r}, expected a number"
    errors = [abs(a - e) for a, e in zip(values, case.expected, strict=True)]
    # the first step where the error is (about) the largest
    worst = next(i for i, err in enumerate(errors) if err >= max(errors) - 1e-9)
    a, e = values[worst], case.expected[worst]
    if math.isclose(a, e, rel_tol=1e-6, abs_tol=1e-7):
        return None
    after = " (after the last step: it stays at its end value)"
    return (
        f"at step {worst}{after if worst >= config.steps else ''} the factor is "
        f"{a:.6f}, expected {e:.6f}"
    )


def check_lr_factor(fn: Callable) -> Verdict:
    """Exercise 07.2: linear warm-up from (1 / warmup) to 1, cosine down to
    min_lr_ratio, as `sdlearn.training.lr_factor`."""
    cases = []
    for steps, warmup, min_ratio in LR_CONFIGS:
        config = TrainConfig(steps=steps, warmup_steps=warmup, min_lr_ratio=min_ratio)
        expected = [lr_factor(s, config) for s in range(steps + EXTRA_STEPS)]
        inputs = Inputs(
            f"for a run of {steps} steps, warmup_steps {warmup}, min_lr_ratio "
            f"{min_ratio}",
            config,
        )
        cases.append(Case((inputs,), expected))
    return check(
        "Exercise 07.2",
        _all_factors(fn),
        cases,
        hint="warm-up: (step + 1) / warmup_steps while step < warmup_steps, so the "
        "first step already moves; then progress = (step - warmup_steps) / "
        "(steps - warmup_steps), capped at 1, and the factor is min_lr_ratio + "
        "(1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2.",
        compare=_lr_problem,
    )


# --- Exercise 07.3: the EMA update with warm-up -------------------------------------


def _ema_module() -> nn.Module:
    # a Linear and a BatchNorm: float weights, float buffers and an integer counter
    with torch.random.fork_rng(devices=[]):  # leave the caller's seed alone
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    state = _ema_module().state_dict()
    out = {}
    for i, (name, value) in enumerate(state.items()):
        if value.dtype.is_floating_point:
            out[name] = randn(*value.shape, seed=seed * 100 + i)
        else:
            out[name] = torch.tensor(seed * 7 + i, dtype=value.dtype)
    return out


def reference_ema_update(
    shadow: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    max_decay: float,
    updates: int,
) -> dict[str, torch.Tensor]:
    """`EMA.update` as a function: the shadow after update number `updates`."""
    module = _ema_module()
    ema = EMA(module, max_decay)
    ema.load_state_dict({"shadow": shadow, "updates": updates - 1})
    module.load_state_dict(weights)
    ema.update(module)
    return {name: value.clone() for name, value in ema.shadow.items()}


def _ema_problem(actual: Any, case: Case) -> str | None:
    _, _, max_decay, updates = case.args[0].args
    expected = case.expected["shadow"]
    if not isinstance(actual, dict):
        return (
            f"returned {type(actual).__name__}, expected a dict of tensors "
            "(the new shadow)"
        )
    if set(actual) != set(expected):
        return f"returned the keys {sorted(actual)}, expected {sorted(expected)}"
    for name, value in expected.items():
        if value.dtype.is_floating_point:
            continue
        if not isinstance(actual[name], torch.Tensor) or not torch.equal(
            actual[name].to(value.dtype), value
        ):
            return (
                f"{name!r} is an integer counter (BatchNorm's batches seen), not "
                "a weight: copy it from the model rather than average it"
            )
    for name, value in expected.items():
        if not value.dtype.is_floating_point:
            continue
        problem = tensor_form_problem(actual[name], value)
        if problem:
            return f"{name!r} {problem}"
        if torch.allclose(actual[name], value, atol=1e-6, rtol=1e-5):
            continue
        decay = min(max_decay, (1 + updates) / (10 + updates))
        old, new = case.expected["old"][name], case.expected["new"][name]
        if torch.allclose(actual[name], max_decay * old + (1 - max_decay) * new):
            return (
                f"after {updates} update(s) the decay must still be warming up: "
                f"min({max_decay:g}, (1 + {updates}) / (10 + {updates})) = "
                f"{decay:.4f}, not {max_decay:g}"
            )
        if torch.allclose(actual[name], (1 - decay) * old + decay * new):
            return (
                "the weights and the average are swapped: the average keeps "
                "`decay` of itself and takes (1 - decay) of the new weights"
            )
        error = (actual[name] - value).abs().max().item()
        return (
            f"{name!r} differs from the reference by up to {error:.3g} after update "
            f"number {updates} (max_decay {max_decay:g}, so decay {decay:.5f})"
        )
    return None


def check_ema_update(fn: Callable) -> Verdict:
    """Exercise 07.3: one EMA update with the warm-up of `sdlearn.training.EMA`."""
    cases = []
    # the first update, a few early ones, one mid-run (warm-up still below 0.999)
    # and one late (capped at max_decay), and a lower max_decay
    runs = [(0.999, 1), (0.999, 5), (0.999, 5000), (0.999, 20_000), (0.9, 3)]
    runs += [(0.9, 100)]
    for seed, (max_decay, updates) in enumerate(runs):
        shadow, weights = _random_state(seed), _random_state(seed + 50)
        expected = {
            "shadow": reference_ema_update(shadow, weights, max_decay, updates),
            # untouched copies, for telling mistakes apart even when the learner
            # updates `shadow` in place
            "old": {k: v.clone() for k, v in shadow.items()},
            "new": {k: v.clone() for k, v in weights.items()},
        }
        inputs = Inputs(
            f"for update number {updates} with max_decay {max_decay}, of the "
            "weights of a Linear(3, 4) and a BatchNorm1d(4)",
            shadow,
            weights,
            max_decay,
            updates,
        )
        cases.append(Case((inputs,), expected))
    return check(
        "Exercise 07.3",
        _unpacked(fn),
        cases,
        hint="decay = min(max_decay, (1 + updates) / (10 + updates)); every "
        "floating-point tensor becomes decay * shadow + (1 - decay) * weights; "
        "integer tensors are copied from the weights.",
        compare=_ema_problem,
    )
