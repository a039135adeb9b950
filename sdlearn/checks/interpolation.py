"""Checks for chapter 02's latent walk: slerp between two latents.

The reference is sdlearn's own `interpolation.slerp`. The cases are latents at a
wide angle, a batch of weights that includes both ends, and two nearly parallel
latents, where the straight line stands in for the arc. A passing answer is kept
as "interpolation:slerp", so that the rest of chapter 02 walks with it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from sdlearn import interpolation
from sdlearn.checks import Case, Verdict, check, randn
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter

SLERP_PART = "interpolation:slerp"


def _slerp(a, b, weights, swap=False, straight=False, per_value=False, divide=True):
    """slerp, or one of its typical mistakes."""
    w = weights.reshape(-1, *([1] * a.ndim))
    if per_value:  # an angle for every value, not one between the two tensors
        cos = a * b / (a.norm() * b.norm())
    else:
        cos = (a * b).sum() / (a.norm() * b.norm())
    if straight or (not per_value and cos.abs() > 0.9995):
        return (1 - w) * a + w * b
    theta = torch.acos(cos.clamp(-1, 1))
    along_a, along_b = torch.sin((1 - w) * theta), torch.sin(w * theta)
    if divide:
        along_a, along_b = along_a / torch.sin(theta), along_b / torch.sin(theta)
    if swap:
        along_a, along_b = along_b, along_a
    return along_a * a + along_b * b


SLERP_MISTAKES = {
    "a straight line, (1 - w) a + w b: slerp walks along the arc between them": (
        functools.partial(_slerp, straight=True)
    ),
    "the ends are swapped: weight 0 gives a, weight 1 gives b, so a is scaled by "
    "sin((1 - w) θ)": functools.partial(_slerp, swap=True),
    "an angle for every value: θ is one angle, between a and b seen as two long "
    "vectors, so sum the products before dividing by the norms": functools.partial(
        _slerp, per_value=True
    ),
    "not divided by sin θ: without it the middle of the arc is too long": (
        functools.partial(_slerp, divide=False)
    ),
}
SLERP_HINTS = [
    "see a and b as two long vectors. Find the angle between them, then walk "
    "along the arc from one to the other: the weights say how far, as a share "
    "of the angle. Nearly parallel vectors have no arc to speak of: a straight "
    "line is as good there.",
    "cos θ = (a · b) / (|a| |b|), summed over all values; θ = arccos; each "
    "weight w gives (sin((1 − w) θ) a + sin(w θ) b) / sin θ. Reshape the "
    "weights to (N, 1, ..., 1) so that they broadcast; when |cos θ| > threshold "
    "return (1 − w) a + w b.",
    "w = weights.reshape(-1, *([1] * a.ndim)); cos = (a * b).sum() / (a.norm() * "
    "b.norm()); if cos.abs() > threshold: return (1 - w) * a + w * b; theta = "
    "torch.acos(cos); return (torch.sin((1 - w) * theta) * a + torch.sin(w * "
    "theta) * b) / torch.sin(theta)",
]


def check_slerp(fn: Callable) -> Verdict:
    """Exercise 02.15: `slerp(a, b, weights, threshold=0.9995)`."""
    cases = []
    a, b = randn(4, 3, 5, seed=220), randn(4, 3, 5, seed=221)
    cases.append(Case((a, b, torch.linspace(0, 1, 5)), None))
    a, b = randn(2, 4, 4, seed=222), 3 * randn(2, 4, 4, seed=223)
    cases.append(Case((a, b, torch.tensor([0.25, 0.5, 0.9])), None))
    a = randn(3, 2, 2, seed=224)  # b nearly parallel to a: the straight line
    b = 2 * a + 1e-3 * randn(3, 2, 2, seed=225)
    cases.append(Case((a, b, torch.tensor([0.3, 0.7])), None))
    a = randn(2, 3, 3, seed=226)  # exactly parallel: sin θ is 0, no arc at all
    cases.append(Case((a, 2 * a, torch.tensor([0.0, 0.4, 1.0])), None))
    for case in cases:
        case.expected = interpolation.slerp(*case.args)
    return check(
        "Exercise 02.15",
        fn,
        cases,
        atol=1e-5,
        rtol=1e-5,
        hints=SLERP_HINTS,
        mistakes=SLERP_MISTAKES,
        keep=SLERP_PART,
    )
