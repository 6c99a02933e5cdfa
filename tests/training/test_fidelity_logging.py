"""Validation logs the attention's error against exact softmax and u_bar per layer, by default for the
random-feature kinds only."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from protein_performer.train import compose_config, train

from .runs import tiny_overrides


def _validation_rows(tmp_path: Path, store_cache: Path, *extra: str) -> list[dict[str, str]]:
    cfg = compose_config(tiny_overrides(store_cache, "trainer.max_steps=2", "trainer.val_check_interval=2",
                                        "logger=csv", "test=false", "trainer.limit_val_batches=2", *extra), tmp_path)
    result = train(cfg)
    rows = csv.DictReader((Path(result.trainer.default_root_dir) / "metrics.csv").open())
    return [row for row in rows if row.get("val/perplexity")]


@pytest.mark.parametrize("attention", ["favor", "favor_rpe"])
def test_random_feature_kinds_log_fidelity_per_layer(attention, tmp_path, store_cache):
    (row,) = _validation_rows(tmp_path, store_cache, f"attention={attention}")
    for layer in range(2):  # model=tiny: 2 layers
        error, u_bar = float(row[f"val/attn_error/layer_{layer}"]), float(row[f"val/u_bar/layer_{layer}"])
        assert 0 < error < 1 and math.isfinite(error)
        assert u_bar > 0 and math.isfinite(u_bar)


def test_exact_kinds_log_nothing_unless_asked(tmp_path, store_cache):
    (row,) = _validation_rows(tmp_path / "default", store_cache, "attention=softmax")
    assert not any(key.startswith(("val/attn_error", "val/u_bar")) for key in row)
    (row,) = _validation_rows(tmp_path / "asked", store_cache, "attention=softmax", "log_attention_fidelity=true")
    assert float(row["val/attn_error/layer_0"]) < 1e-4  # exact attention measures no error
