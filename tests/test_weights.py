"""Loading weights: every key and shape is checked, and mismatches are named;
checkpoint files are read without running code from them."""

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sdlearn.unet import UNetConfig
from sdlearn.weights import (
    WeightsMismatchError,
    config_from_json,
    load_checked,
    read_checkpoint_file,
    read_shipped,
    rename,
    weights_digest,
)


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


# --- reading files safely -----------------------------------------------------


class Payload:
    """Unpickling this calls open(marker, "w"): a file appears if code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_pickle_is_refused_without_running(tmp_path, zipped):
    marker = tmp_path / "code_ran"
    path = tmp_path / "model.ckpt"
    weights = {"model.diffusion_model.out.2.bias": torch.zeros(4)}
    contents = {"state_dict": weights, "callback": Payload(str(marker))}
    if zipped:
        torch.save(contents, path)  # torch's format: a zip holding the pickle
    else:
        path.write_bytes(pickle.dumps(contents, protocol=2))  # a bare pickle

    with pytest.raises(ValueError, match=r"model\.ckpt was refused") as error:
        read_checkpoint_file(path)
    assert error.value.__cause__ is None  # one message, no chained traceback
    assert not marker.exists()

    # the payload is live: a careless load does run it
    if zipped:
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file_is_named(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    state = {"first_stage_model.quant_conv.weight": torch.ones(8, 8, 1, 1)}
    if suffix == ".safetensors":
        save_file(state, whole)
    else:
        torch.save(state, whole)
    read = read_checkpoint_file(whole)
    assert list(read) == list(state)
    torch.testing.assert_close(read, state, rtol=0, atol=0)

    path = tmp_path / f"model{suffix}"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"model\{suffix} is not a readable"):
        read_checkpoint_file(path)


def test_unknown_extension_and_non_tensors_are_refused(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"0")
    with pytest.raises(ValueError, match=r"model\.npz: unknown checkpoint extension"):
        read_checkpoint_file(path)
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.ones(1), "step": 3}, path)
    with pytest.raises(
        ValueError, match=r"model\.pt is not a dict of names to tensors"
    ):
        read_checkpoint_file(path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint_file(tmp_path / "absent.safetensors")


def test_records_written_under_old_field_names_still_load():
    old = {"block_out_channels": [32, 64], "norm_groups": 8}
    new = {"block_out_channels": (32, 64), "norm_num_groups": 8}
    assert config_from_json(old) == new
    _, record = read_shipped("unet")
    config = UNetConfig(**config_from_json(record["model_config"]))
    assert config.norm_num_groups == 8 and "norm_groups" not in record["model_config"]
