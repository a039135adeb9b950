"""Chapter 07's exercise checks on the loop: right answers pass and are kept,
typical slips fail and are named, none raise; the check's reference loop is the
package's `train`."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from sdlearn import training
from sdlearn.checks import answers
from sdlearn.checks import training_loop as checks
from sdlearn.checks import training_slips as slips
from sdlearn.training import EMA, TrainConfig, bf16_enabled, lr_factor
from tests.helpers import assert_refused, assert_unsolved_never_raise

# --- right answers, written as a learner would ---


def clip_grad_norm(parameters, max_norm):
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.sqrt(sum((g**2).sum() for g in grads))
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return total


def ema_update(self, model):
    self.updates += 1
    decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            self.shadow[name] = decay * self.shadow[name] + (1 - decay) * value
        else:
            self.shadow[name] = value.clone()


def batch_indices(step, batch_size, length, seed, rank=0, world=1):
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, length)
        permutation = np.random.default_rng([seed, epoch]).permutation(length)
        indices.append(int(permutation[offset]))
    return indices[rank::world]


def train_loop(step_module, items, config, ema, callback=None):
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed * 1000)
    autocast = bf16_enabled(config.bf16, torch.device("cpu"))
    log = []
    step_module.train()
    for step in range(config.steps):
        lr = config.lr * lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = batch_indices(step, config.batch_size, len(items), config.seed)
        batch = default_collate([items[i] for i in indices])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = step_module(batch, generator)
        optimizer.zero_grad()
        loss.backward()
        norm = clip_grad_norm(trainable, config.grad_clip)
        optimizer.step()
        ema.update(step_module)
        log.append({"step": step + 1, "loss": loss.item(), "lr": lr})
        log[-1]["grad_norm"] = float(norm)
        if callback is not None:
            callback(step + 1, ema)
    step_module.eval()
    return log


RIGHT = [
    ("check_clip_grad_norm", clip_grad_norm, "training:clip_grad_norm"),
    ("check_ema_update", ema_update, "training:EMA.update"),
    ("check_batch_indices", batch_indices, "training:batch_indices"),
    ("check_train_loop", train_loop, "training:train_loop"),
]


@pytest.mark.parametrize(("check", "right", "part"), RIGHT, ids=[r[0] for r in RIGHT])
def test_right_answers_pass_and_are_kept(check, right, part, answers_home, capsys):
    assert getattr(checks, check)(right)
    out = capsys.readouterr().out
    assert "✅" in out and "Kept in" in out
    module, name = part.split(":")
    assert name in answers.kept(module)
    assert answers.is_learners(answers.use(part, None, getattr(checks, check)))
    # a wrong try later forgets it: the package's stands in again
    assert not getattr(checks, check)(lambda *args, **kwargs: None)
    assert "set aside" in capsys.readouterr().out
    assert name not in answers.kept(module)


def test_the_package_passes_its_own_checks(answers_home, capsys):
    assert checks.check_clip_grad_norm(training.clip_grad_norm)
    assert checks.check_ema_update(EMA.update)
    assert checks.check_batch_indices(training.batch_indices)
    assert checks.check_train_loop(checks.reference_train_loop)


def test_the_reference_loop_is_the_packages_train(tmp_path):
    """The check's reference loop gives the losses and the EMA
    weights of `training.train` for the same config."""
    config = TrainConfig(
        steps=6, batch_size=4, lr=0.05, warmup_steps=2, grad_clip=2.0,
        weight_decay=0.5, ema_decay=0.9, seed=3, bf16="off", log_every=1,
    )  # fmt: skip
    items = slips._toy_items(10, seed=0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(slips.ToyLoss())
    ema = EMA(models[0], config.ema_decay)
    log = checks.reference_train_loop(models[0], items, config, ema)
    training.train(models[1], items, config, tmp_path, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").open()]
    # (the package logs the learning rate its schedule has moved on to)
    losses = [torch.tensor([e["loss"] for e in entries]) for entries in (log, logged)]
    torch.testing.assert_close(*losses)
    for name, value in models[1].state_dict().items():  # train ends on the EMA
        torch.testing.assert_close(ema.shadow[name], value)


def _slip(slip):
    loop = functools.partial(slips._slipped_loop, slip=slip)
    loop.__name__ = slip
    return loop


@pytest.mark.parametrize(
    ("check", "wrong", "says"),
    [("check_clip_grad_norm", f.__wrapped__, says[:40])
     for says, f in checks.CLIP_MISTAKES.items()]
    + [("check_batch_indices", f.__wrapped__, says[:40])
       for says, f in checks.ORDER_MISTAKES.items()]
    + [("check_train_loop", _slip(slip), says[:40])
       for says, slip in slips.LOOP_SLIPS.items()],
)  # fmt: skip
def test_typical_slips_are_named(check, wrong, says, answers_home, capsys):
    out = assert_refused(getattr(checks, check), wrong, capsys)
    assert says in out, out


def ema_swapped(self, model):
    self.updates += 1
    decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            self.shadow[name] = (1 - decay) * self.shadow[name] + decay * value
        else:
            self.shadow[name].copy_(value)


def ema_without_warmup(self, model):
    self.updates += 1
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            self.shadow[name].lerp_(value, 1 - self.decay)
        else:
            self.shadow[name].copy_(value)


def ema_counted_late(self, model):
    decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
    self.updates += 1
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            self.shadow[name].lerp_(value, 1 - decay)
        else:
            self.shadow[name].copy_(value)


def ema_not_counted(self, model):
    decay = min(self.decay, (2 + self.updates) / (11 + self.updates))
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            self.shadow[name].lerp_(value, 1 - decay)


def ema_averages_counters(self, model):
    self.updates += 1
    decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
    for name, value in model.state_dict().items():
        self.shadow[name] = (decay * self.shadow[name] + (1 - decay) * value).to(
            value.dtype
        )


def ema_moves_the_model(self, model):
    self.updates += 1
    decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            value.lerp_(self.shadow[name], decay)  # the model, not the average


@pytest.mark.parametrize(
    ("wrong", "says"),
    [
        (ema_swapped, "swapped"),
        (ema_without_warmup, "warming up"),
        (ema_counted_late, "count of updates before this one"),
        (ema_not_counted, "count this update first"),
        (ema_averages_counters, "integer counter"),
        (ema_moves_the_model, "leaves the model's weights"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_ema_slips_are_named(wrong, says, answers_home, capsys):
    out = assert_refused(checks.check_ema_update, wrong, capsys)
    assert says in out, out


def test_unsolved_exercises_never_raise(answers_home, capsys):
    assert_unsolved_never_raise(
        [
            checks.check_clip_grad_norm,
            checks.check_ema_update,
            checks.check_batch_indices,
            checks.check_train_loop,
        ],
        capsys,
    )


def test_checks_leave_the_global_seed_alone(answers_home):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checks.check_train_loop(train_loop)
    checks.check_ema_update(ema_update)
    torch.testing.assert_close(torch.rand(3), expected)


# --- slips that no reference loop makes: named by what the check sees ---


def clip_without_a_case_for_no_gradients(parameters, max_norm):
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.sqrt(sum((g**2).sum() for g in grads))  # sum([]) is the int 0
    if total > max_norm:
        for g in grads:
            g.mul_(max_norm / (total + 1e-6))
    return total


def clip_returning_none_without_gradients(parameters, max_norm):
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        return clip_grad_norm(parameters, max_norm)


def test_clipping_no_gradients_at_all_is_named(answers_home, capsys):
    for wrong in (
        clip_without_a_case_for_no_gradients,
        clip_returning_none_without_gradients,
    ):
        out = assert_refused(checks.check_clip_grad_norm, wrong, capsys)
        assert "case 4 of 4" in out and "every parameter's .grad is None" in out, out


def _loop_with(**changes):
    """The right loop with one change: `log` edits each entry, `callback` the
    step number the callback gets, `zero_before_step` zeroes after clipping."""

    def loop(step_module, items, config, ema, callback=None):
        def record(step, ema):
            if callback is not None and "callback" in changes:
                changes["callback"](step, ema, callback)
            elif callback is not None:
                callback(step, ema)

        log = train_loop_with_hooks(step_module, items, config, ema, record, changes)
        return [changes.get("log", lambda e: e)(entry) for entry in log]

    return loop


def train_loop_with_hooks(step_module, items, config, ema, callback, changes):
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed * 1000)
    autocast = bf16_enabled(config.bf16, torch.device("cpu"))
    log = []
    step_module.train()
    for step in range(config.steps):
        lr = config.lr * lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = batch_indices(step, config.batch_size, len(items), config.seed)
        batch = default_collate([items[i] for i in indices])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = step_module(batch, generator)
        optimizer.zero_grad()
        loss.backward()
        if changes.get("skip clipping"):
            norm = torch.tensor(0.0)
        elif changes.get("norm only"):  # the norm for the log, and no clipping
            norm = torch.stack([p.grad.norm() for p in trainable]).norm()
        else:
            norm = clip_grad_norm(trainable, config.grad_clip)
        if changes.get("zero before step"):
            optimizer.zero_grad()
        optimizer.step()
        ema.update(step_module)
        log.append({"step": step + 1, "loss": loss.item(), "lr": lr})
        log[-1]["grad_norm"] = norm
        callback(step + 1, ema)
    step_module.eval()
    return log


@pytest.mark.parametrize(
    ("wrong", "says"),
    [
        (_loop_with(), 'the "grad_norm" logged at step 1 is a Tensor'),
        (
            _loop_with(log=lambda e: {**e, "grad_norm": float(e["grad_norm"])}),
            None,
        ),
        (
            _loop_with(log=lambda e: e | {"loss": torch.tensor(e["loss"])}),
            'the "loss" logged at step 1 is a Tensor',
        ),
        (
            _loop_with(
                log=lambda e: {**e, "grad_norm": float(e["grad_norm"])},
                callback=lambda step, ema, callback: callback(step - 1, ema),
            ),
            "the callback got the step numbers [0, 1, 2, 3]",
        ),
        (
            _loop_with(
                log=lambda e: {**e, "grad_norm": float(e["grad_norm"])},
                callback=lambda step, ema, callback: None,
            ),
            "the callback was never called",
        ),
        (
            _loop_with(
                log=lambda e: {**e, "grad_norm": float(e["grad_norm"])},
                **{"zero before step": True},
            ),
            "the weights never changed",
        ),
        (
            _loop_with(
                log=lambda e: {**e, "grad_norm": float(e["grad_norm"])},
                **{"skip clipping": True},
            ),
            "the grad_norm logged at step 1 is 0, but the gradients' norm was",
        ),
        (
            _loop_with(
                log=lambda e: {**e, "grad_norm": float(e["grad_norm"])},
                **{"norm only": True},
            ),
            "stepped with gradients not clipped",
        ),
    ],
)
def test_loop_slips_named_by_what_the_check_sees(
    wrong, says, answers_home, capsys, recwarn
):
    if says is None:  # the loop the others change passes
        assert checks.check_train_loop(wrong)
        return
    out = assert_refused(checks.check_train_loop, wrong, capsys)
    assert says in out, out
    # a tensor in the log is refused before torch could warn from the check's code
    assert not [w for w in recwarn if "sdlearn" in w.filename], list(recwarn)
