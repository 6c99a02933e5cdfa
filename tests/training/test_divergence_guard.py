"""DivergenceGuard: a non-finite loss or gradient stops training at that step; non-finite weights are never saved.

(The end-to-end case, a diverging run stopped with one line while last.ckpt stays finite, is in
tests/test_errors.py.)
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from protein_performer.training.callbacks import DivergenceGuard, TrainingDiverged


class Logged(nn.Module):
    """A module that records what the guard logs."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: torch.Tensor, **_: object) -> None:
        self.logged[name] = float(value)


def fake_trainer(step: int = 4, scaler: object = None, last: str = "") -> SimpleNamespace:
    return SimpleNamespace(global_step=step, world_size=1, strategy=None,
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


@pytest.mark.parametrize(("grad", "loss"), [(float("nan"), float("nan")), (float("inf"), 3.0), (0.1, float("inf"))],
                         ids=["nan", "inf-gradient", "inf-loss"])
def test_non_finite_step_stops_training_naming_the_step(grad, loss):
    module, guard = Logged(), DivergenceGuard()
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 5: .*last checkpoint \(/run/last\.ckpt\)"):
        step_with(module, guard, fake_trainer(step=4, last="/run/last.ckpt"), grad=grad, loss=loss)
    assert "train/grad_norm" not in module.logged


def test_fp16_gradient_scaler_may_skip_a_few_steps():
    module, guard = Logged(), DivergenceGuard(max_skipped_steps=2)
    trainer = fake_trainer(scaler=object())
    step_with(module, guard, trainer, grad=float("inf"), loss=1.0)
    step_with(module, guard, trainer, grad=float("inf"), loss=1.0)  # the scaler skips these and lowers its scale
    with pytest.raises(TrainingDiverged):
        step_with(module, guard, trainer, grad=float("inf"), loss=1.0)


def test_checkpoint_with_non_finite_weights_is_never_written():
    module, guard = Logged(), DivergenceGuard()
    state = {f"model.{k}": v.clone() for k, v in module.state_dict().items()}
    guard.on_save_checkpoint(fake_trainer(), module, {"state_dict": state})  # finite: allowed
    state["model.layer.bias"][0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"refusing to save a checkpoint with non-finite weights.*layer\.bias"):
        guard.on_save_checkpoint(fake_trainer(), module, {"state_dict": state})
