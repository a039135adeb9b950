"""The training loop: it learns, it resumes exactly, it never loses a checkpoint."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from sdlearn import stages, training
from sdlearn.training import TrainConfig, batch_indices, lr_factor, train


class Points(Dataset):
    """y = 3x - 1 with noise, deterministic by index."""

    def __len__(self):
        return 37

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=g)
        return {"x": x, "y": 3 * x.sum(0, keepdim=True) - 1}


class Regression(nn.Module):
    """A step module: forward computes the loss of a batch, with dropout and noise."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.1), nn.Linear(16, 1))

    def forward(self, batch, generator):
        noise = torch.randn(batch["x"].shape, generator=generator) * 0.01
        loss = (self.net(batch["x"] + noise) - batch["y"]).pow(2).mean()
        return loss, {"mse": loss.detach()}


CONFIG = TrainConfig(
    steps=12,
    batch_size=8,
    lr=3e-2,
    warmup_steps=3,
    ema_decay=0.9,
    checkpoint_every=4,
    log_every=2,
    bf16="off",
    seed=1,
)


def fresh():
    torch.manual_seed(0)
    return Regression()


def test_loss_goes_down_and_files_are_written(tmp_path):
    model = fresh()
    result = train(model, Points(), CONFIG.updated(steps=60), tmp_path, progress=False)
    log = [
        json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()
    ]
    assert log[-1]["loss"] < log[0]["loss"] / 5, log
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["seed"] == 1 and run["seconds"] >= 0
    assert run["metrics"]["loss"] == result.metrics["loss"]
    assert (tmp_path / "checkpoint.pt").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = fresh()
    train(straight, Points(), CONFIG, tmp_path / "a", progress=False)

    interrupted = fresh()
    train(interrupted, Points(), CONFIG, tmp_path / "b", progress=False, stop_at=6)
    resumed = fresh()  # a new process would start from fresh weights
    train(resumed, Points(), CONFIG, tmp_path / "b", resume=True, progress=False)

    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # the interrupted run really did stop early
    assert not torch.equal(interrupted.net[0].weight, straight.net[0].weight)


def test_resume_refuses_other_settings(tmp_path):
    train(fresh(), Points(), CONFIG, tmp_path, progress=False, stop_at=4)
    with pytest.raises(ValueError, match="lr: 0.03 now 0.1"):
        train(fresh(), Points(), CONFIG.updated(lr=0.1), tmp_path, resume=True)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    training.save_atomic({"step": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkp")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        training.save_atomic({"step": 2}, path)
    assert training.load_checkpoint(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


class RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["SDLEARN_PWNED"]),))


def test_checkpoints_are_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SDLEARN_PWNED", str(marker))
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"model": RunsCode()}))
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        training.load_checkpoint(path)
    assert not marker.exists()


def test_data_order_depends_only_on_seed_and_step():
    a = [batch_indices(s, 8, 37, seed=0) for s in range(10)]
    assert a == [batch_indices(s, 8, 37, seed=0) for s in range(10)]
    assert a != [batch_indices(s, 8, 37, seed=1) for s in range(10)]
    first_epoch = sum(a, [])[:37]
    assert sorted(first_epoch) == list(range(37))  # every item once per epoch
    shares = [batch_indices(3, 8, 37, seed=0, rank=r, world=2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(a[3])


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"unknown training settings \['lr_max'\]"):
        TrainConfig.from_dict({"lr_max": 1})
    with pytest.raises(ValueError, match="bf16 must be"):
        TrainConfig(bf16="yes")
    with pytest.raises(ValueError, match=r"min_lr_ratio must be in \[0, 1\], got 2"):
        TrainConfig(min_lr_ratio=2)


WORKER = Path(__file__).resolve().parent / "fixtures" / "ddp_worker.py"


def test_two_processes_keep_identical_weights(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(WORKER),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    weights = [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)
    ]
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)
    start = torch.load(tmp_path / "start.pt", weights_only=True)
    assert not torch.equal(start["net.0.weight"], weights[0]["net.0.weight"])
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["world_size"] == 2


def test_loss_history_averages_windows(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 11))
    )
    history = stages.loss_history(log, points=4)
    # 10 rows in windows of 3: (1,2,3), (4,5,6), (7,8,9), (10,)
    assert history == {"step": [3, 6, 9, 10], "loss": [2.0, 5.0, 8.0, 10.0]}


def test_ema_warms_up_instead_of_keeping_the_initial_weights():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = training.EMA(model, decay=0.999)
    nn.init.ones_(model.weight)  # training moved the weight from 0 to 1
    for _ in range(100):
        ema.update(model)
    # with a fixed 0.999 the average would still be 1 - 0.999**100 = 0.095
    assert ema.shadow["weight"].item() > 0.9
    restored = training.EMA(model, decay=0.999)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 100
    torch.testing.assert_close(restored.shadow["weight"], ema.shadow["weight"])


# the UNet stage: the frozen shipped VAE and CLIP, a few steps of the tiny UNet

UNET_STEPS = TrainConfig(
    steps=16,
    batch_size=8,
    lr=2e-3,
    warmup_steps=2,
    ema_decay=0.0,
    seed=3,
    checkpoint_every=4,
    log_every=1,
    bf16="off",
)


def unet_run(out_dir, **kwargs):
    return stages.train_unet(
        UNET_STEPS, out_dir, progress=False, eval_images=0, images=64, **kwargs
    )


def test_unet_stage_learns_and_writes_loadable_weights(tmp_path):
    from sdlearn.unet import UNet, UNetConfig
    from sdlearn.weights import config_from_json, load_checked, read_shipped

    record = unet_run(tmp_path)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 16
    # the first steps of a random UNet predict noise badly (loss about 1)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    state, saved = read_shipped("unet", folder=tmp_path)
    assert saved == json.loads(json.dumps(record))
    assert saved["scheduler_config"]["_class_name"] == "DDPMScheduler"
    # the record keeps the whole curve, averaged down, for plotting the run
    history = saved["loss_history"]
    assert history["step"][-1] == 16 * UNET_STEPS.log_every
    assert len(history["loss"]) == len(history["step"]) == 16
    unet = UNet(UNetConfig(**config_from_json(saved["model_config"])))
    load_checked(unet, state, "unet.safetensors")


def test_unet_stage_resumes_exactly(tmp_path):
    unet_run(tmp_path / "straight")
    unet_run(tmp_path / "stopped", stop_at=7)
    unet_run(tmp_path / "stopped", resume=True)
    from safetensors.torch import load_file

    straight = load_file(tmp_path / "straight" / "unet.safetensors")
    resumed = load_file(tmp_path / "stopped" / "unet.safetensors")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


def test_timestep_bias_draws_the_noisier_half_more_often():
    from sdlearn.diffusion_loss import DiffusionLoss
    from sdlearn.schedulers.ddpm import DDPMScheduler

    scheduler = DDPMScheduler()
    T = scheduler.config.num_train_timesteps
    tokens = torch.zeros(1, 77, 8)

    def drawn(bias: float) -> torch.Tensor:
        loss = DiffusionLoss(nn.Identity(), scheduler, tokens, 1.0, 0.0, bias)
        return loss.timesteps(20000, torch.Generator().manual_seed(0), "cpu")

    # no bias: the uniform draw SD trains with, the same numbers as before
    uniform = drawn(1.0)
    expected = torch.randint(0, T, (20000,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(uniform, expected, rtol=0, atol=0)
    for bias in (3.0, 9.0):
        t = drawn(bias)
        assert t.min() >= 0 and t.max() < T
        noisier = (t >= T // 2).float().mean().item()
        assert noisier == pytest.approx(bias / (bias + 1), abs=0.01)
    with pytest.raises(ValueError, match="positive timestep_bias, got 0"):
        DiffusionLoss(nn.Identity(), scheduler, tokens, 1.0, 0.0, 0.0)
