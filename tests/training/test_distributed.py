"""DDP on the CPU (trainer=ddp_cpu: 2 processes over gloo), launched like a user would."""
from __future__ import annotations

import json

import pytest

from .runs import run_cli, tiny_overrides


@pytest.mark.slow
def test_ddp_ranks_train_on_different_batches_and_end_with_identical_weights(tmp_path, store_cache):
    fingerprints = tmp_path / "fingerprints"
    run_cli([*tiny_overrides(store_cache, trainer="ddp_cpu"), "trainer.max_steps=3", "trainer.val_check_interval=3",
             "logger=none", "test=false", f"hydra.run.dir={tmp_path / 'run'}",
             "+callbacks.fingerprints._target_=protein_performer.training.BatchFingerprints",
             f"+callbacks.fingerprints.directory={fingerprints}"], cwd=tmp_path)

    ranks = [json.loads((fingerprints / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [3, 3]
    assert [len(r["batches"]) for r in ranks] == [3, 3]
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"]), "both ranks trained on the same batch"
    # Gradients are all-reduced and the FAVOR+ projections redrawn from (seed, step): every parameter
    # and buffer agrees across replicas after training.
    assert ranks[0]["parameters"] == ranks[1]["parameters"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
