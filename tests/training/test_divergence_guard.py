"""DivergenceGuard: a non-finite loss or gradient is never applied, training stops at the next logging step
(or before any checkpoint) naming the step, and non-finite weights are never saved.

(The end-to-end case, a diverging run stopped with one line while last.ckpt stays finite, is in
tests/test_errors.py; that the guard reads nothing from the device per step is in test_host_syncs.py.)
"""
from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _hybrid_shard_rank(rank: int, port: int, results) -> None:
    """Two nodes of one rank each under HYBRID_SHARD: each rank's shard group is itself."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        shard_groups = [dist.new_group([0]), dist.new_group([1])]
        strategy = SimpleNamespace(model=SimpleNamespace(process_group=shard_groups[rank]))
        results[rank] = float(callbacks._sum_over_shards(torch.tensor(9.0), strategy))
        world = SimpleNamespace(model=SimpleNamespace(process_group=None))  # FULL_SHARD: the world
        results[2 + rank] = float(callbacks._sum_over_shards(torch.tensor(9.0), world))
    finally:
        dist.destroy_process_group()


def test_hybrid_shard_norm_sums_over_the_shard_group_only():
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_hybrid_shard_rank, args=(_free_port(), results), nprocs=2, start_method="spawn")
    # a replica's squared norm is not added again (no sqrt(nodes) inflation); full sharding sums the world
    assert [results[i] for i in range(4)] == [9.0, 9.0, 18.0, 18.0]
