"""last.ckpt follows every validation, also one that did not improve the monitored metric."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.boring_classes import BoringModel

from protein_performer.training import Checkpoint


class Plateau(BoringModel):
    """Validation perplexity improves once, then never again (as after a FAVOR+ redraw, or a plateau)."""

    def validation_step(self, batch, batch_idx):
        self.log("val/perplexity", 10.0 if self.global_step <= 2 else 12.0)


def fit(tmp_path, max_steps: int, ckpt_path=None) -> Checkpoint:
    checkpoint = Checkpoint(dirpath=tmp_path, filename="best-step{step:06d}", auto_insert_metric_name=False,
                            monitor="val/perplexity", mode="min", save_top_k=1, save_last=True)
    trainer = pl.Trainer(max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None,
                         limit_val_batches=1, num_sanity_val_steps=0, callbacks=[checkpoint], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Plateau(), ckpt_path=ckpt_path)
    return checkpoint


def step_of(path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


def test_last_checkpoint_follows_validations_that_do_not_improve(tmp_path):
    checkpoint = fit(tmp_path, max_steps=6)
    # The best stays the step-2 validation; last.ckpt holds step 6 (Lightning's own callback would have
    # left it at step 2, where the last top-k checkpoint was written).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-step000002.ckpt", "last.ckpt"]
    assert step_of(tmp_path / "best-step000002.ckpt") == 2
    assert step_of(tmp_path / "last.ckpt") == 6
    assert checkpoint.last_model_path == str(tmp_path / "last.ckpt")
    assert checkpoint.best_model_path == str(tmp_path / "best-step000002.ckpt")


def test_resumed_run_continues_from_the_latest_validation(tmp_path):
    fit(tmp_path, max_steps=4)
    assert step_of(tmp_path / "last.ckpt") == 4
    resumed = fit(tmp_path, max_steps=8, ckpt_path=tmp_path / "last.ckpt")
    assert step_of(tmp_path / "last.ckpt") == 8
    assert resumed.best_model_path == str(tmp_path / "best-step000002.ckpt")  # the best survives the resume
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-step000002.ckpt", "last.ckpt"]


def test_resumed_into_another_directory_the_best_checkpoint_is_this_runs_own(tmp_path):
    fit(tmp_path / "old", max_steps=4)
    resumed = fit(tmp_path / "new", max_steps=8, ckpt_path=tmp_path / "old" / "last.ckpt")
    # The old run's best (step 2, scored by its own validations) is not this run's: its first validation
    # after the resume (step 6) is.
    assert resumed.best_model_path == str(tmp_path / "new" / "best-step000006.ckpt")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["best-step000006.ckpt", "last.ckpt"]
    nothing_left = fit(tmp_path / "newer", max_steps=8, ckpt_path=tmp_path / "new" / "last.ckpt")
    assert nothing_left.best_model_path == ""  # no validation in this run: no best, rather than another run's


def test_resuming_into_its_own_directory_does_not_warn_that_it_is_not_empty(tmp_path, recwarn):
    fit(tmp_path, max_steps=4)
    recwarn.clear()
    fit(tmp_path, max_steps=6, ckpt_path=tmp_path / "last.ckpt")
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]
    fit(tmp_path, max_steps=2)  # a fresh run into a used directory still hears about it
    assert [w for w in recwarn if "exists and is not empty" in str(w.message)]
