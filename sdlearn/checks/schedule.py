"""Checks for chapter 05's schedule exercises: the betas, alpha_bar, and which
timesteps a sampler visits.

Every reference is sdlearn's own code in `sdlearn.schedulers.common`, which
tests/test_ddpm.py holds to diffusers' `DDPMScheduler` number for number. A
passing answer is kept under the part it stands for ("schedule:make_betas"...;
`answers.PACKAGE_MODULES` maps "schedule" to `sdlearn.schedulers.common`), and
the chapter's scheduler runs it (`sdlearn.checks.ddpm.install_scheduler_parts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from sdlearn.checks import Case, Verdict, check
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.schedulers import common

COSINE_PART = "schedule:cosine_betas"
BETAS_PART = "schedule:make_betas"
ALPHAS_CUMPROD_PART = "schedule:make_alphas_cumprod"
SPACING_PART = "schedule:spaced_timesteps"

# --- Exercise 05.1: the cosine schedule ------------------------------------------

COSINE_HINTS = (
    "Write alpha_bar(time) for time from 0 to 1 (eq. 17, with s = 0.008), then "
    "one beta per timestep i: 1 minus the ratio of alpha_bar at the end of step "
    "i to alpha_bar at its start, capped at max_beta.",
    "Step i runs from time i / T to (i + 1) / T, T = num_train_timesteps. "
    "alpha_bar(time) = cos((time + s) / (1 + s) * pi / 2) ** 2. Return a float32 "
    "tensor of the T betas.",
    "betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i "
    "in range(T)]; return torch.tensor(betas, dtype=torch.float32).",
)


def _cosine(T: int, max_beta: float, s: float = 0.008, square: bool = True,
            shift: int = 0, cap: bool = True) -> torch.Tensor:  # fmt: skip
    def alpha_bar(time: float) -> float:
        value = math.cos((time + s) / (1 + s) * math.pi / 2)
        return value**2 if square else value

    betas = []
    for i in range(T):
        i = i - shift
        beta = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T)
        betas.append(min(beta, max_beta) if cap else beta)
    return torch.tensor(betas, dtype=torch.float32)


COSINE_MISTAKES: dict[str, Callable] = {
    "the betas are not capped at max_beta: the last ratio alpha_bar(1) / "
    "alpha_bar(1 - 1/T) is about 0, so the last beta is about 1 and the "
    "sampler's first step would divide by almost 0": lambda T, max_beta=0.999: _cosine(
        T, max_beta, cap=False
    ),
    "off by one in time: step i runs from i / T to (i + 1) / T, not from "
    "(i - 1) / T to i / T": lambda T, max_beta=0.999: _cosine(T, max_beta, shift=1),
    "alpha_bar is cos(...), not its square cos(...) ** 2 (eq. 17)": (
        lambda T, max_beta=0.999: _cosine(T, max_beta, square=False)
    ),
    "no offset s: eq. 17 adds s = 0.008 to the time, (time + s) / (1 + s), so "
    "that the first betas are not vanishingly small": lambda T, max_beta=0.999: _cosine(
        T, max_beta, s=0.0
    ),
}


def check_cosine_betas(fn: Callable) -> Verdict:
    """Exercise 05.1: `cosine_betas(num_train_timesteps, max_beta=0.999)`, a
    drop-in for `sdlearn.schedulers.common.cosine_betas`."""
    runs = [(1000, 0.999), (50, 0.999), (20, 0.3), (7, 0.999)]
    cases = [Case((T, b), common.cosine_betas(T, b)) for T, b in runs]
    return check(
        "Exercise 05.1",
        fn,
        cases,
        hints=COSINE_HINTS,
        mistakes=COSINE_MISTAKES,
        atol=1e-6,
        rtol=1e-5,
        keep=COSINE_PART,
    )


# --- Exercise 05.2: the betas of each schedule -------------------------------------

BETAS_HINTS = (
    "Three branches: 'linear' spaces beta itself evenly from beta_start to "
    "beta_end; 'scaled_linear' spaces sqrt(beta) evenly, then squares; "
    "'squaredcos_cap_v2' is your cosine_betas.",
    "torch.linspace(start, end, num_train_timesteps, dtype=torch.float32) "
    "spaces values evenly, both ends included. For scaled_linear the ends are "
    "beta_start ** 0.5 and beta_end ** 0.5.",
    "linear: return torch.linspace(beta_start, beta_end, T, dtype=torch.float32); "
    "scaled_linear: return torch.linspace(beta_start**0.5, beta_end**0.5, T, "
    "dtype=torch.float32) ** 2; else: return cosine_betas(T).",
)


def _betas(T, beta_start, beta_end, beta_schedule, trained_betas=None, *, how=""):
    if beta_schedule == "squaredcos_cap_v2":
        return common.cosine_betas(T)
    if beta_schedule == "linear" or how == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    sqrt_betas = torch.linspace(beta_start**0.5, beta_end**0.5, T)
    return sqrt_betas if how == "unsquared" else sqrt_betas**2


def _swapped_ends(T, beta_start, beta_end, beta_schedule, trained_betas=None):
    return common.make_betas(T, beta_end, beta_start, beta_schedule)


BETAS_MISTAKES: dict[str, Callable] = {
    "scaled_linear spaces beta itself evenly; it spaces sqrt(beta) evenly, "
    "from sqrt(beta_start) to sqrt(beta_end), then squares": lambda *a: _betas(
        *a, how="linear"
    ),
    "scaled_linear returns sqrt(beta): square the evenly spaced values": (
        lambda *a: _betas(*a, how="unsquared")
    ),
    "the betas run from beta_end down to beta_start: noise grows with t, so "
    "beta_start comes first": _swapped_ends,
}


def check_make_betas(fn: Callable) -> Verdict:
    """Exercise 05.2: `make_betas(num_train_timesteps, beta_start, beta_end,
    beta_schedule, trained_betas=None)`, a drop-in for
    `sdlearn.schedulers.common.make_betas`."""
    runs = [
        (1000, 0.00085, 0.012, "scaled_linear"),
        (1000, 1e-4, 0.02, "linear"),
        (10, 0.001, 0.2, "scaled_linear"),
        (7, 0.001, 0.2, "linear"),
        (1000, 0.00085, 0.012, "squaredcos_cap_v2"),
    ]
    cases = [Case(args, common.make_betas(*args)) for args in runs]
    return check(
        "Exercise 05.2",
        fn,
        cases,
        hints=BETAS_HINTS,
        mistakes=BETAS_MISTAKES,
        atol=1e-7,
        rtol=1e-5,
        keep=BETAS_PART,
    )


# --- Exercise 05.3: alpha_bar ------------------------------------------------------

ALPHAS_CUMPROD_HINTS = (
    "alpha_t = 1 - beta_t is the share of the variance that one step keeps; "
    "alpha_bar_t is what t + 1 steps keep, so it multiplies them all.",
    "A running product along the timesteps: torch.cumprod(..., dim=0), of the "
    "alphas, not of the betas.",
    "return torch.cumprod(1 - betas, dim=0)",
)

ALPHAS_CUMPROD_MISTAKES: dict[str, Callable] = {
    "a running sum (cumsum): alpha_bar is a running *product* of the alphas, "
    "one factor per step": lambda betas: torch.cumsum(1 - betas, dim=0),
    "the running product of the betas; of the alphas, 1 - beta": (
        lambda betas: torch.cumprod(betas, dim=0)
    ),
    "1 - the running product of the betas: alpha_bar is the product of the "
    "alphas, 1 - beta, one per step": lambda betas: 1 - torch.cumprod(betas, 0),
    "off by one: alpha_bar at code's timestep 0 already holds alpha_0, one step "
    "of noise (it is not 1)": lambda betas: torch.cat(
        [torch.ones(1), torch.cumprod(1 - betas, dim=0)[:-1]]
    ),
}


def check_make_alphas_cumprod(fn: Callable) -> Verdict:
    """Exercise 05.3: `make_alphas_cumprod(betas)`, a drop-in for
    `sdlearn.schedulers.common.make_alphas_cumprod`."""
    runs = [
        common.make_betas(1000, 1e-4, 0.02, "linear"),
        common.make_betas(1000, 0.00085, 0.012, "scaled_linear"),
        common.make_betas(30, 0.0, 0.0, "squaredcos_cap_v2"),
    ]
    cases = [Case((b.clone(),), common.make_alphas_cumprod(b)) for b in runs]
    return check(
        "Exercise 05.3",
        fn,
        cases,
        hints=ALPHAS_CUMPROD_HINTS,
        mistakes=ALPHAS_CUMPROD_MISTAKES,
        atol=1e-6,
        rtol=1e-5,
        keep=ALPHAS_CUMPROD_PART,
    )


# --- Exercise 05.6: timestep spacing -----------------------------------------------

SPACING_HINTS = (
    "Each spacing is one line of numpy, then the order: from the noisiest "
    "timestep down. 'linspace': evenly from T - 1 down to 0, rounded. "
    "'leading': every (T // n)-th timestep counted up from 0, plus steps_offset. "
    "'trailing': every (T / n)-th counted down from T, minus 1.",
    "linspace: np.linspace(0, T - 1, n).round(), reversed. leading: "
    "np.arange(n) * (T // n) + steps_offset, reversed. trailing: "
    "np.round(np.arange(T, 0, -T / n)) - 1 (already descending). Return "
    "torch.from_numpy(timesteps.astype(np.int64)).",
    "if timestep_spacing == 'linspace': timesteps = np.linspace(0, T - 1, n)"
    ".round()[::-1]; elif 'leading': timesteps = np.arange(n)[::-1] * (T // n) + "
    "steps_offset; else: timesteps = np.round(np.arange(T, 0, -T / n)) - 1.",
)


def _spacing(n, T, spacing, steps_offset=0, *, slip=""):
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n)
        timesteps = (timesteps if slip == "truncated" else timesteps.round())[::-1]
    elif spacing == "leading":
        offset = 0 if slip == "no offset" else steps_offset
        timesteps = np.arange(n)[::-1] * (T // n) + offset
    else:
        timesteps = np.round(np.arange(T, 0, -T / n)) - (slip != "from T")
    timesteps = timesteps[::-1] if slip == "ascending" else timesteps
    return torch.from_numpy(np.ascontiguousarray(timesteps).astype(np.int64))


SPACING_MISTAKES: dict[str, Callable] = {
    "the timesteps go up; a sampler starts at the noisiest one, so they must "
    "go down": lambda *a: _spacing(*a, slip="ascending"),
    "trailing starts at T: timesteps run from 0 to T - 1, so count down from T "
    "and subtract 1": lambda *a: _spacing(*a, slip="from T"),
    "linspace's timesteps are cut to integers (astype) instead of rounded: "
    "round first": lambda *a: _spacing(*a, slip="truncated"),
    "leading leaves out steps_offset: add it to every timestep": (
        lambda *a: _spacing(*a, slip="no offset")
    ),
}


def check_spaced_timesteps(fn: Callable) -> Verdict:
    """Exercise 05.6: `spaced_timesteps(num_inference_steps, num_train_timesteps,
    timestep_spacing, steps_offset=0)`, a drop-in for
    `sdlearn.schedulers.common.spaced_timesteps`."""
    runs = [
        (10, 1000, "leading", 1),
        (10, 1000, "trailing", 0),
        (10, 1000, "linspace", 0),
        (7, 1000, "trailing", 0),
        (7, 1000, "linspace", 0),
        (50, 1000, "leading", 1),
        (3, 20, "leading", 0),
        (1000, 1000, "trailing", 0),
        (6, 25, "linspace", 0),
    ]
    cases = [Case(args, common.spaced_timesteps(*args)) for args in runs]
    return check(
        "Exercise 05.6",
        fn,
        cases,
        hints=SPACING_HINTS,
        mistakes=SPACING_MISTAKES,
        keep=SPACING_PART,
    )
