"""DivergenceGuard: a non-finite loss or gradient is never applied, training stops at the next logging step
(or before any checkpoint) naming the step, and non-finite weights are never saved.

(The end-to-end case, a diverging run stopped with one line while last.ckpt stays finite, is in
tests/test_errors.py; that the guard reads nothing from the device per step is in test_host_syncs.py.)
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from protein_performer.training import callbacks
from protein_performer.training.callbacks import DivergenceGuard, TrainingDiverged


class Logged(nn.Module):
    """A module that records what the guard logs."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: torch.Tensor, **_: object) -> None:
        self.logged[name] = float(value)


def fake_trainer(step: int = 4, scaler: object = None, last: str = "", every: int = 50) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, world_size=1, strategy=None, log_every_n_steps=every,
                           precision_plugin=SimpleNamespace(scaler=scaler),
                           checkpoint_callback=SimpleNamespace(last_model_path=last))


def step_with(module: Logged, guard: DivergenceGuard, trainer: SimpleNamespace, grad: float, loss: float) -> None:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for parameter in module.parameters():
        parameter.grad = torch.full_like(parameter, grad)
    guard.on_before_backward(trainer, module, torch.tensor(loss))
    guard.on_before_optimizer_step(trainer, module, optimizer)


def test_finite_steps_log_the_gradient_norm():
    module, guard = Logged(), DivergenceGuard()
    step_with(module, guard, fake_trainer(), grad=0.5, loss=2.0)
    parameters = sum(p.numel() for p in module.parameters())
    assert module.logged["train/grad_norm"] == pytest.approx(0.5 * parameters ** 0.5)
    assert guard.grad_norm == pytest.approx(0.5 * parameters ** 0.5)
    guard.check(fake_trainer())  # nothing to report
    assert all(p.grad.eq(0.5).all() for p in module.parameters())  # finite gradients are left alone


@pytest.mark.parametrize(("grad", "loss"), [(float("nan"), float("nan")), (float("inf"), 3.0), (0.1, float("inf"))],
                         ids=["nan", "inf-gradient", "inf-loss"])
def test_non_finite_step_is_not_applied_and_stops_training_naming_the_step(grad, loss):
    module, guard = Logged(), DivergenceGuard()
    step_with(module, guard, fake_trainer(step=4), grad=grad, loss=loss)  # no host read here: no raise yet
    assert all(p.grad.eq(0).all() for p in module.parameters())  # the update is made from zero gradients
    step_with(module, guard, fake_trainer(step=5), grad=0.1, loss=1.0)  # a later finite step does not hide it
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 5: .*stopped at step 6 .*"
                                               r"last checkpoint \(/run/last\.ckpt\)"):
        guard.check(fake_trainer(step=6, last="/run/last.ckpt"))


def test_divergence_is_reported_at_the_next_logging_step():
    module, guard = Logged(), DivergenceGuard()
    step_with(module, guard, fake_trainer(step=11), grad=float("nan"), loss=1.0)
    guard.on_train_batch_end(fake_trainer(step=12, every=5), module, None, None, 0)  # not a logging step
    with pytest.raises(TrainingDiverged, match="at step 12"):
        guard.on_train_batch_end(fake_trainer(step=15, every=5), module, None, None, 0)


def test_fp16_gradient_scaler_may_skip_a_few_steps():
    module, guard = Logged(), DivergenceGuard(max_skipped_steps=2)
    trainer = fake_trainer(scaler=object())
    step_with(module, guard, trainer, grad=float("inf"), loss=1.0)
    step_with(module, guard, trainer, grad=float("inf"), loss=1.0)  # the scaler skips these and lowers its scale
    guard.check(trainer)
    step_with(module, guard, trainer, grad=float("inf"), loss=1.0)
    with pytest.raises(TrainingDiverged):
        guard.check(trainer)


def test_checkpoint_with_non_finite_weights_is_never_written():
    module, guard = Logged(), DivergenceGuard()
    state = {f"model.{k}": v.clone() for k, v in module.state_dict().items()}
    guard.on_save_checkpoint(fake_trainer(), module, {"state_dict": state})  # finite: allowed
    state["model.layer.bias"][0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"refusing to save a checkpoint with non-finite weights.*layer\.bias"):
        guard.on_save_checkpoint(fake_trainer(), module, {"state_dict": state})


def test_no_checkpoint_is_written_after_a_diverged_step():
    module, guard = Logged(), DivergenceGuard()
    step_with(module, guard, fake_trainer(step=2), grad=float("nan"), loss=1.0)
    state = {f"model.{k}": v.clone() for k, v in module.state_dict().items()}  # finite weights, yet refused
    with pytest.raises(TrainingDiverged, match="training diverged at step 3"):
        guard.on_save_checkpoint(fake_trainer(step=3), module, {"state_dict": state})


def test_hybrid_shard_norm_sums_over_the_shard_group_only(monkeypatch):
    """Under HYBRID_SHARD the root FSDP module's process_group is the node's shard group; nodes hold
    replicas, so summing the squared norms over the world would inflate the norm by sqrt(nodes)."""
    reduced = []

    def all_reduce(tensor, op=None, group=None):
        reduced.append(group)
        tensor.mul_(2)  # as if two ranks of that group held the same value
        return None

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    shard_group = object()
    strategy = SimpleNamespace(model=SimpleNamespace(process_group=shard_group))
    assert float(callbacks._sum_over_shards(torch.tensor(9.0), strategy)) == 18.0
    assert reduced == [shard_group]  # the shard group, never the default (world) group


def test_a_diverging_run_stops_at_a_logging_step_with_finite_weights(store_cache, tmp_path):
    import re

    import pytorch_lightning as pl

    from protein_performer.train import compose_config, train

    from .runs import tiny_overrides

    class Keep(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.module = pl_module

    keep = Keep()
    cfg = compose_config(tiny_overrides(store_cache, "optim.lr=1e3", "optim.warmup_steps=0", "trainer.max_steps=40",
                                        "trainer.val_check_interval=40", "trainer.log_every_n_steps=5",
                                        "logger=csv", "test=false"), tmp_path)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+") as raised:
        train(cfg, [keep])
    diverged, stopped = map(int, re.search(r"at step (\d+): .* stopped at step (\d+)", str(raised.value)).groups())
    assert diverged <= stopped < diverged + 5 and stopped % 5 == 0
    # the steps after the divergence ran on zeroed gradients: the weights stayed finite
    assert all(torch.isfinite(tensor).all() for tensor in keep.module.state_dict().values())
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing saved from the diverged step on


def test_a_fused_optimizer_skips_a_non_finite_step_entirely():
    module, guard = Logged(), DivergenceGuard()
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.1, fused=True)  # as on CUDA
    for grad in (0.5, float("nan")):
        for parameter in module.parameters():
            parameter.grad = torch.full_like(parameter, grad)
        guard.on_before_backward(fake_trainer(), module, torch.tensor(1.0))
        guard.on_before_optimizer_step(fake_trainer(), module, optimizer)
        if grad == 0.5:
            optimizer.step()
            weights = {k: v.clone() for k, v in module.state_dict().items()}
            state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in module.parameters()]
    optimizer.step()
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())  # no weight decay, no momentum
    assert all(torch.equal(v, optimizer.state[p][k]) for p, s in zip(module.parameters(), state) for k, v in s.items())
