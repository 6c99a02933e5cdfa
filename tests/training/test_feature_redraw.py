"""FeatureRedraw redraws at the start of a step: never after a run's last step, and every validation and
checkpoint sees the projections the weights trained with."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytorch_lightning as pl
import torch

from protein_performer.model import PerformerConfig, ProteinPerformer
from protein_performer.train import compose_config, train
from protein_performer.training import FeatureRedraw

from .runs import tiny_overrides


def _start_batches(callback: FeatureRedraw, global_steps: list[int]) -> list[int]:
    model = ProteinPerformer(PerformerConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                             attention="favor", nb_features=8, feature_redraw_interval=4))
    module = SimpleNamespace(model=model)
    for batch_idx, step in enumerate(global_steps):
        callback.on_train_batch_start(SimpleNamespace(global_step=step), module, None, batch_idx)
    return callback.redraw_steps


def test_redraws_as_the_step_after_each_interval_starts():
    # a 12-step run starts batches at global_step 0 .. 11: no redraw at 12, which no training would follow
    assert _start_batches(FeatureRedraw(), list(range(12))) == [4, 8]
    assert _start_batches(FeatureRedraw(), list(range(13))) == [4, 8, 12]
    assert _start_batches(FeatureRedraw(interval=3), list(range(12))) == [3, 6, 9]
    assert _start_batches(FeatureRedraw(interval=0), list(range(12))) == []


def test_redraws_once_per_step_under_gradient_accumulation():
    steps = [step for step in range(10) for _ in range(3)]  # three batches per optimizer step
    assert _start_batches(FeatureRedraw(), steps) == [4, 8]


def test_a_resumed_run_redraws_where_an_uninterrupted_one_does():
    straight = _start_batches(FeatureRedraw(), list(range(12)))
    first = _start_batches(FeatureRedraw(), list(range(4)))  # stopped (and saved) after step 4
    resumed = _start_batches(FeatureRedraw(), list(range(4, 12)))  # a new process from that checkpoint
    assert first + resumed == straight


class ProjectionLog(pl.Callback):
    """The first layer's projection as each optimizer step trained with it, and as each validation saw it."""

    def __init__(self) -> None:
        self.trained: dict[int, torch.Tensor] = {}
        self.validated: dict[int, torch.Tensor] = {}

    @staticmethod
    def _projection(pl_module: pl.LightningModule) -> torch.Tensor:
        return pl_module.model.blocks[0].attention.projection.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trained[trainer.global_step] = self._projection(pl_module)  # the step just taken

    def on_validation_start(self, trainer, pl_module) -> None:
        self.validated[trainer.global_step] = self._projection(pl_module)


def test_validations_and_checkpoints_use_the_trained_projections(tmp_path, store_cache):
    """Validation interval = redraw interval: every validation comes right where a redraw is due."""
    log = ProjectionLog()
    cfg = compose_config(tiny_overrides(store_cache, "trainer.max_steps=6", "trainer.val_check_interval=2",
                                        "attention=favor", "attention.feature_redraw_interval=2", "logger=none",
                                        "test=false", "trainer.limit_val_batches=1"), tmp_path)
    result = train(cfg, callbacks=(log,))
    assert sorted(log.validated) == [2, 4, 6]
    for step, seen in log.validated.items():
        torch.testing.assert_close(seen, log.trained[step], rtol=0, atol=0, msg=f"validation at step {step}")
    assert not torch.equal(log.trained[2], log.trained[3])  # the redraw happened, before step 3
    torch.testing.assert_close(log.trained[3], log.trained[4], rtol=0, atol=0)
    checkpoint = torch.load(Path(result.trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=True)
    torch.testing.assert_close(checkpoint["state_dict"]["model.blocks.0.attention.projection"], log.trained[6],
                               rtol=0, atol=0)
