"""slerp: its ends, its constant length between vectors of one length, its
straight-line fallback, and its shapes."""

from __future__ import annotations

import math

import pytest
import torch

from sdlearn.interpolation import slerp


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_ends_are_a_and_b():
    a, b = randn(4, 8, 8, seed=0), randn(4, 8, 8, seed=1)
    out = slerp(a, b, torch.tensor([0.0, 1.0]))
    assert out.shape == (2, 4, 8, 8)
    torch.testing.assert_close(out[0], a)
    torch.testing.assert_close(out[1], b, atol=1e-5, rtol=1e-5)


def test_between_two_vectors_of_one_length_the_length_stays():
    a, b = randn(256, seed=2), randn(256, seed=3)
    b = b * a.norm() / b.norm()
    out = slerp(a, b, torch.linspace(0, 1, 9))
    torch.testing.assert_close(out.norm(dim=1), a.norm().expand(9))
    # the straight line is shorter in the middle
    assert ((a + b) / 2).norm() < 0.8 * a.norm()


def test_it_walks_at_a_constant_angular_speed():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = slerp(a, b, torch.tensor([1 / 3]))
    torch.testing.assert_close(out[0], torch.tensor([math.cos(math.pi / 6), 0.5]))


def test_nearly_parallel_vectors_take_the_straight_line():
    a = randn(3, 4, seed=4)
    out = slerp(a, 2 * a, torch.tensor([0.5]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], 1.5 * a)


def test_different_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        slerp(torch.zeros(2, 3), torch.zeros(3, 2), torch.tensor([0.5]))


def test_weights_of_another_shape_are_refused():
    a = torch.ones(3)
    with pytest.raises(ValueError, match=r"weights of shape \(N,\), got \(2, 1\)"):
        slerp(a, -a, torch.zeros(2, 1))
