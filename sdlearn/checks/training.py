"""Checks for chapter 07's exercises on the loss: the frozen parts run once, the
training timesteps, the loss of one batch, the learning rate (the loop's parts
are in `training_loop`, the loop itself in `training_slips`).

Every reference is the package's own code, which tests/test_training.py holds
to its behaviour (a loss that learns, exact resumes): `stages.encode_shapes`,
`DiffusionLoss.timesteps` and `.forward`, and `training.lr_factor`.

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
from torch.utils.data import default_collate

from sdlearn import shapes
from sdlearn.checks import Case, Verdict, check, randn, tensor_form_problem
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.clip import pretrained_tiny_clip
from sdlearn.diffusion_loss import DiffusionLoss
from sdlearn.schedulers.ddpm import DDPMScheduler
from sdlearn.stages import encode_shapes
from sdlearn.tokenizer import CLIPTokenizer
from sdlearn.training import TrainConfig, lr_factor
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL


class Inputs:
    """The arguments of one case, described in a few words when a case fails
    (their own reprs are pages of numbers)."""

    def __init__(self, description: str, *args: Any) -> None:
        self.description = description
        self.args = args

    def __repr__(self) -> str:
        return self.description


def unpacked(fn: Callable) -> Callable:
    """The learner's function, called with the arguments an `Inputs` holds."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> Any:
        return fn(*inputs.args)

    return call


# --- Exercise 07.1: the frozen parts, run once ------------------------------------

# the captions of the check's images: repeats, so that a caption keeps one row
ENCODE_CAPTIONS = (
    "a red circle",
    "a blue square",
    "a red circle",
    "a small green triangle at the top",
    "a blue square",
    "a red circle",
    "a large yellow circle",
)


@functools.cache
def _frozen_parts() -> tuple[nn.Module, nn.Module, CLIPTokenizer]:
    """The shipped tiny VAE and text encoder, frozen, and the tokenizer."""
    vae = AutoencoderKL.pretrained_tiny().eval().requires_grad_(False)
    text_encoder = pretrained_tiny_clip().text_model.eval().requires_grad_(False)
    return vae, text_encoder, CLIPTokenizer()


def _encode_dataset(size: int) -> list[dict]:
    """`size` images of the shapes dataset under the check's own captions (a
    list is a dataset: `len` and indexing)."""
    images = shapes.ShapesDataset("train", length=size, image_size=64, seed=7)
    return [
        {"pixel_values": images[i]["pixel_values"], "caption": ENCODE_CAPTIONS[i]}
        for i in range(size)
    ]


def _encoded(fn: Callable) -> Callable:
    """The learner's `fn(vae, text_encoder, tokenizer, dataset, batch_size)`,
    its three results laid out as tensors and lists that compare one by one."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> tuple:
        *parts, dataset, batch_size = inputs.args
        with torch.no_grad():
            result = fn(*parts, dataset, batch_size=batch_size, progress=False)
        if not isinstance(result, tuple) or len(result) != 3:
            return ("return (items, text_tokens, captions)",)
        items, text_tokens, captions = result
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return ("items must be a list of dicts, one per image",)
        if len(items) != len(dataset):
            return (f"{len(items)} items for {len(dataset)} images",)
        if any(set(item) != {"mean", "std", "caption"} for item in items):
            return ('each item is a dict of "mean", "std" and "caption"',)
        rows = torch.tensor([int(item["caption"]) for item in items])
        stacked = [default_collate([i[k] for i in items]) for k in ("mean", "std")]
        return (*stacked, rows, text_tokens, list(captions))

    return call


WHAT_ENCODED = ("posterior means", "posterior stds", "caption rows", "text tokens")


def _encode_problem(actual: tuple, case: Case) -> str | None:
    if len(actual) == 1:
        return actual[0]
    for what, a, e in zip(WHAT_ENCODED, actual, case.expected, strict=False):
        problem = tensor_form_problem(a, e)
        if problem or not torch.allclose(a.double(), e.double(), atol=1e-5):
            return (
                f"the {what} differ from the reference's{': ' if problem else ''}"
                + (problem or "")
            )
    if actual[-1] != case.expected[-1]:
        return f"returned the captions {actual[-1]}, expected {case.expected[-1]}"
    return None


def _encode_slip(slip: str) -> Callable:
    """`encode_shapes` with one of the usual slips."""

    def encode(vae, text_encoder, tokenizer, dataset, batch_size=256, progress=True):
        captions = [] if slip == "no empty prompt" else [""]
        items = []
        stop = len(dataset) // batch_size * batch_size if slip == "last" else None
        for start in range(0, stop or len(dataset), batch_size):
            end = min(start + batch_size, len(dataset))
            batch = default_collate([dataset[i] for i in range(start, end)])
            posterior = vae.encode(batch["pixel_values"])
            spread = posterior.var if slip == "variance" else posterior.std
            for i, caption in enumerate(batch["caption"]):
                if caption not in captions or slip == "a row per image":
                    captions.append(caption)
                row = len(captions) - 1 if slip == "a row per image" else None
                row = captions.index(caption) if row is None else row
                items.append(
                    {"mean": posterior.mean[i], "std": spread[i], "caption": row}
                )
        return items, text_encoder(tokenizer(captions)), captions

    return _encoded(encode)


ENCODE_MISTAKES = {
    "the std is the posterior's variance: keep posterior.std, the square root": (
        _encode_slip("variance")
    ),
    "every image got a row of its own: a caption met before keeps its row, so "
    "the table holds each distinct caption once": _encode_slip("a row per image"),
    'row 0 of the table must be the empty prompt "", which caption dropout '
    "uses: start the captions with it": _encode_slip("no empty prompt"),
    "the last, shorter batch was left out: the batches run to the end of the "
    "dataset": _encode_slip("last"),
}
ENCODE_HINTS = [
    "go through the dataset in batches; the VAE's encode gives each batch's "
    "posterior; a caption gets a new row the first time it is seen, row 0 being "
    "the empty prompt; run the text encoder once, on all the distinct captions.",
    'keep a list captions = [""] and a dict row_of = {"": 0}; for a batch, '
    'posterior = vae.encode(batch["pixel_values"]), then one item per image: '
    '{"mean": posterior.mean[i], "std": posterior.std[i], "caption": row}.',
    "for start in range(0, len(dataset), batch_size): batch = default_collate("
    "[dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]); "
    "at the end text_tokens = text_encoder(tokenizer(captions)).",
]


def check_encode_shapes(fn: Callable) -> Verdict:
    """Exercise 07.1: `encode_shapes(vae, text_encoder, tokenizer, dataset,
    batch_size=256, progress=True)`, the package's `stages.encode_shapes`."""
    cases = []
    for size, batch_size in ((7, 3), (5, 5)):
        dataset = _encode_dataset(size)
        inputs = Inputs(
            f"for {size} images with repeated captions, in batches of {batch_size}",
            *_frozen_parts(),
            dataset,
            batch_size,
        )
        expected = _encoded(encode_shapes)(inputs)
        cases.append(Case((inputs,), expected))
    return check(
        "Exercise 07.1",
        _encoded(fn),
        cases,
        compare=_encode_problem,
        hints=ENCODE_HINTS,
        mistakes=ENCODE_MISTAKES,
        keep="stages:encode_shapes",
    )


# --- Exercise 07.2: the training timesteps ----------------------------------------

# (B, num_train_timesteps, timestep_bias): uniform, the noisier half 3x, 0.5x
TIMESTEP_CASES = ((8, 1000, 1.0), (64, 1000, 3.0), (40, 10, 0.5), (5, 1000, 20.0))


def _drawn(fn: Callable) -> Callable:
    """The learner's `fn(self, B, generator, device)` on a DiffusionLoss with
    the case's schedule and bias, from a fresh generator."""

    @functools.wraps(fn)
    def call(inputs: Inputs) -> Any:
        loss_module, B, seed = inputs.args
        generator = torch.Generator().manual_seed(seed)
        return fn(loss_module, B, generator, torch.device("cpu"))

    return call


def _timesteps_slip(slip: str) -> Callable:
    """`DiffusionLoss.timesteps` with one of the usual slips."""

    def timesteps(self, B, generator, device):
        T = self.scheduler.config.num_train_timesteps
        uniform = self.timestep_bias == 1 or slip == "no bias"
        if uniform and slip != "always multinomial":
            high = T - 1 if slip == "T - 1" else T
            return torch.randint(0, high, (B,), generator=generator, device=device)
        weights = torch.ones(T, device=device)
        noisier = slice(None, T // 2) if slip == "cleaner half" else slice(T // 2, None)
        weights[noisier] = self.timestep_bias
        replace = slip != "no replacement"
        return torch.multinomial(weights, B, replacement=replace, generator=generator)

    return _drawn(timesteps)


TIMESTEP_MISTAKES = {
    "randint's upper bound is excluded: use T, torch.randint(0, T, (B,)) draws "
    "0 to T - 1, the last timestep included": _timesteps_slip("T - 1"),
    "the bias was ignored: the timesteps are uniform although timestep_bias is "
    "not 1; draw the noisier half timestep_bias times as often": _timesteps_slip(
        "no bias"
    ),
    "the bias went to the first half, the timesteps with the least noise: the "
    "noisier half is t >= T // 2": _timesteps_slip("cleaner half"),
    "the timesteps were drawn without replacement: two images may share a "
    "timestep, torch.multinomial(..., replacement=True)": _timesteps_slip(
        "no replacement"
    ),
    "with timestep_bias 1 the timesteps are uniform, drawn as Stable Diffusion "
    "draws them: torch.randint(0, T, (B,)), which draws other numbers than "
    "torch.multinomial": _timesteps_slip("always multinomial"),
}
TIMESTEP_HINTS = [
    "two cases: no bias, a uniform integer in [0, T) per image; a bias, a "
    "weighted draw where each timestep of the noisier half weighs timestep_bias "
    "and each of the other half 1.",
    "T = self.scheduler.config.num_train_timesteps; uniform: torch.randint(0, T, "
    "(B,), generator=generator, device=device); biased: weights = torch.ones(T) "
    "with weights[T // 2 :] = self.timestep_bias, then torch.multinomial.",
    "return torch.multinomial(weights, B, replacement=True, generator=generator)",
]


def check_timesteps(fn: Callable) -> Verdict:
    """Exercise 07.2: `diffusion_loss_timesteps(self, B, generator, device)`,
    `DiffusionLoss.timesteps`."""
    cases = []
    for seed, (B, T, bias) in enumerate(TIMESTEP_CASES):
        scheduler = DDPMScheduler(num_train_timesteps=T)
        loss_module = DiffusionLoss(
            nn.Identity(), scheduler, torch.zeros(1), 1.0, 0.1, bias
        )
        inputs = Inputs(
            f"for B = {B} of T = {T} timesteps, timestep_bias {bias}",
            loss_module,
            B,
            700 + seed,
        )
        cases.append(Case((inputs,), _drawn(DiffusionLoss.timesteps)(inputs)))
    return check(
        "Exercise 07.2",
        _drawn(fn),
        cases,
        hints=TIMESTEP_HINTS,
        mistakes=TIMESTEP_MISTAKES,
        keep="diffusion_loss:DiffusionLoss.timesteps",
    )


# --- Exercise 07.3: the loss of one batch ----------------------------------------

B = 8  # images per batch in the cases
LATENT_SHAPE = (B, 4, 8, 8)  # (B, C, h, w): the tiny VAE's latents
CAPTIONS = 6  # rows of the text-token table; row 0 is the empty prompt
TOKEN_SHAPE = (CAPTIONS, 77, 64)  # (N_captions, T, D)

LOSS_HINTS = [
    "four steps, each random draw from `generator`: sample the posterior and "
    "scale it; draw a timestep per image and the noise, and noise the latents; "
    "drop some captions to the empty prompt; predict the noise and score it.",
    "the draws, in this order: eps = torch.randn(mean.shape) for z0 = (mean + std "
    "* eps) * self.scaling_factor; t = self.timesteps(B, generator, device); "
    "noise = torch.randn(z0.shape); torch.rand(B) < self.caption_dropout drops a "
    "caption (its row becomes 0).",
    "z_t = self.scheduler.add_noise(z0, noise, t); context = self.context(rows); "
    "return F.mse_loss(self.unet(z_t, t, context).float(), noise), {}",
]


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
    # (seed, caption_dropout, scaling_factor, timestep_bias): none, some and all
    # captions dropped; the last draws the noisier half of the timesteps 3x as often
    settings = ((0, 0.5, 0.33718, 1.0), (1, 0.0, 0.18215, 1.0), (2, 1.0, 1.0, 1.0))
    for seed, dropout, scale, bias in (*settings, (3, 0.3, 0.18215, 3.0)):
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
            loss, _ = DiffusionLoss(
                reference, scheduler, text_tokens, scale, dropout, bias
            )(batch, torch.Generator().manual_seed(seed + 30))
        sample, timestep, context = reference.calls[0]
        # the learner's: a fresh recorder around the same UNet
        inputs = Inputs(
            f"for a batch of {B} latents {LATENT_SHAPE[1:]}, scaling_factor "
            f"{scale}, caption_dropout {dropout}, timestep_bias {bias}",
            DiffusionLoss(
                UNetRecorder(_check_unet()),
                scheduler,
                text_tokens,
                scale,
                dropout,
                bias,
            ),
            batch,
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
    loss_module = case.args[0].args[0]
    recorder, text_tokens = loss_module.unet, loss_module.text_tokens
    dropout, expected = loss_module.caption_dropout, case.expected
    if len(recorder.calls) != 1:
        return (
            f"called the UNet {len(recorder.calls)} times; call it once, on the "
            "whole noisy batch"
        )
    sample, timestep, context = recorder.calls[0]
    if not isinstance(timestep, torch.Tensor) or not torch.equal(
        timestep.long().flatten(), expected["timestep"]
    ):
        if loss_module.timestep_bias != 1:
            return (
                "the timesteps ignore timestep_bias: draw them with "
                "self.timesteps(B, generator, device), which draws the noisier half "
                "more often when the bias asks for it"
            )
        return (
            "the timesteps differ from the reference's: draw them second, after "
            "the posterior's noise, with self.timesteps(B, generator, device)"
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
    if not isinstance(actual, tuple) or len(actual) != 2:
        return (
            f"returned {type(actual).__name__}, expected a pair (loss, metrics): "
            "return the loss and an empty dict, as the training loop unpacks them"
        )
    actual = actual[0]
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
    """Exercise 07.3: `diffusion_loss_forward(self, batch, generator)`,
    `DiffusionLoss.forward`: the loss of one batch."""
    return check(
        "Exercise 07.3",
        unpacked(fn),
        _loss_cases(),
        hints=LOSS_HINTS,
        compare=_loss_problem,
        keep="diffusion_loss:DiffusionLoss.forward",
    )


# --- Exercise 07.4: warm-up, then cosine ------------------------------------------

# (steps, warmup_steps, min_lr_ratio); every case also asks beyond the last step
LR_CONFIGS = ((100, 10, 0.1), (1000, 0, 0.0), (60, 20, 0.5), (6000, 200, 0.1))
EXTRA_STEPS = 10


def _all_factors(fn: Callable) -> Callable:
    """The learner's `fn(step, config)` at every step of a run, and a few after."""

    @functools.wraps(fn)
    def factors(inputs: Inputs) -> Any:
        (config,) = inputs.args
        values = [fn(step, config) for step in range(config.steps + EXTRA_STEPS)]
        try:  # numbers compare within a tolerance, as tensors
            return torch.tensor([float(v) for v in values], dtype=torch.float64)
        except (TypeError, ValueError):
            return values

    return factors


def _lr_slip(slip: str) -> Callable:
    """`lr_factor` with one of the usual slips."""

    def factor(step: int, config: TrainConfig) -> float:
        warmup, steps, floor = config.warmup_steps, config.steps, config.min_lr_ratio
        if step < warmup:
            return (step + (slip != "from zero")) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        progress = step / steps if slip == "whole run" else progress
        progress = progress if slip == "not capped" else min(1.0, progress)
        if slip == "linear":
            return floor + (1 - floor) * (1 - progress)
        cosine = (1 + math.cos(math.pi * progress)) / 2
        return cosine if slip == "to zero" else floor + (1 - floor) * cosine

    return _all_factors(factor)


LR_MISTAKES = {
    "the warm-up starts at 0, so the first step does not move: (step + 1) / "
    "warmup_steps": _lr_slip("from zero"),
    "the cosine ends at 0: it should end at min_lr_ratio, r + (1 - r) * cosine": (
        _lr_slip("to zero")
    ),
    "the cosine's progress counts from step 0: count it from the end of the "
    "warm-up, (step - warmup_steps) / (steps - warmup_steps)": _lr_slip("whole run"),
    "after the last step the cosine rises again: cap the progress at 1": (
        _lr_slip("not capped")
    ),
    "the decay is a straight line: use the cosine, (1 + cos(pi * progress)) / 2": (
        _lr_slip("linear")
    ),
}


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
    """Exercise 07.4: linear warm-up from (1 / warmup) to 1, cosine down to
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
        "Exercise 07.4",
        _all_factors(fn),
        cases,
        hints=[
            "two pieces: a straight line up during the warm-up, then half a cosine "
            "period from 1 down to min_lr_ratio, held there after the last step.",
            "warm-up: (step + 1) / warmup_steps while step < warmup_steps, so the "
            "first step already moves; then progress = (step - warmup_steps) / "
            "(steps - warmup_steps), capped at 1, and the factor is min_lr_ratio + "
            "(1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2.",
        ],
        compare=_lr_problem,
        mistakes=LR_MISTAKES,
        keep="training:lr_factor",
    )
