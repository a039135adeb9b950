"""Loading weights: every key and shape is checked, and mismatches are named."""

import pytest
import torch
from torch import nn

from sdlearn.weights import WeightsMismatchError, load_checked, rename


def model():
    return nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))


def test_exact_state_dict_loads():
    source, target = model(), model()
    load_checked(target, source.state_dict(), "a test")
    for a, b in zip(source.parameters(), target.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mismatches_name_the_source_and_every_key():
    state = model().state_dict()
    state.pop("1.bias")
    state["2.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(4, 2)
    with pytest.raises(WeightsMismatchError) as error:
        load_checked(model(), state, "weights.safetensors")
    message = str(error.value)
    assert "weights from weights.safetensors do not fit Sequential" in message
    assert "missing keys (1):\n    1.bias" in message
    assert "unexpected keys (1):\n    2.weight" in message
    assert "0.weight: got (4, 2), expected (3, 2)" in message
    assert isinstance(error.value, ValueError)


def test_rename_applies_the_table_in_order():
    state = {"a.q_proj.weight": torch.ones(1), "a.out_proj.bias": torch.ones(1)}
    table = {"q_proj": "to_q", "out_proj": "to_out.0"}
    assert set(rename(state, table)) == {"a.to_q.weight", "a.to_out.0.bias"}


def test_weights_digest_tells_weights_apart():
    from sdlearn.weights import weights_digest

    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    assert weights_digest(a) != weights_digest(b)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b) and len(weights_digest(a)) == 16
    with torch.no_grad():
        b.bias[0] += 1e-7  # one value, barely moved
    assert weights_digest(a) != weights_digest(b)
    # the same numbers in another shape are other weights
    flat, square = nn.Module(), nn.Module()
    flat.w = nn.Parameter(torch.arange(4.0))
    square.w = nn.Parameter(torch.arange(4.0).reshape(2, 2))
    assert weights_digest(flat) != weights_digest(square)
    # a scalar weight (CLIP's logit scale is one) counts too
    scalar = nn.Module()
    scalar.w = nn.Parameter(torch.tensor(2.0))
    before = weights_digest(scalar)
    with torch.no_grad():
        scalar.w += 1
    assert weights_digest(scalar) != before
