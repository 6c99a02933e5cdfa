"""metrics.csv across a kill and a resume into the same run directory: what an uninterrupted run writes."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl

from protein_performer.train import compose_config, train
from protein_performer.training.loggers import ResumableCSVLogger

from .runs import tiny_overrides

STEPS, CHECKPOINT, KILL = 24, 12, 17  # validation and checkpoint every 12 steps; killed 5 steps past one
TIMING = ("train/tokens_per_sec", "val/elapsed_seconds")  # wall-clock values differ between any two runs


class Killed(Exception):
    pass


class KillAt(pl.Callback):
    """Raises after optimizer step `step`: the run dies between checkpoints, with rows logged past the last."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def _run(run_dir: Path, cache: Path, *extra: str, callbacks=()):
    cfg = compose_config(tiny_overrides(cache, f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={CHECKPOINT}",
                                        "logger=csv", "trainer.log_every_n_steps=2", "attention=softmax",
                                        "model.d_model=32", "model.d_ff=64", "test=false", *extra), run_dir)
    return train(cfg, callbacks)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return [{key: value for key, value in row.items() if value and key not in TIMING} for row in csv.DictReader(file)]


def _assert_same_rows(actual: list[dict[str, str]], expected: list[dict[str, str]]) -> None:
    assert [sorted(row) for row in actual] == [sorted(row) for row in expected]
    for got, want in zip(actual, expected):
        for key in want:
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-6), (key, got, want)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, store_cache) -> list[dict[str, str]]:
    run_dir = tmp_path_factory.mktemp("straight")
    _run(run_dir, store_cache)
    return _rows(run_dir)


def test_killed_run_resumed_in_its_directory_keeps_one_complete_metrics_csv(straight, tmp_path, store_cache):
    with pytest.raises(Killed):
        _run(tmp_path, store_cache, callbacks=(KillAt(KILL),))
    steps = [int(row["step"]) for row in _rows(tmp_path)]
    assert max(steps) > CHECKPOINT  # the dead run left rows past its last checkpoint, which are redone
    _run(tmp_path, store_cache, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")
    rows = _rows(tmp_path)
    assert min(int(row["step"]) for row in rows) < CHECKPOINT  # Lightning's CSVLogger would have lost these
    _assert_same_rows(rows, straight)


def test_fresh_run_into_an_old_directory_starts_metrics_csv_afresh(straight, tmp_path, store_cache):
    stale = tmp_path / "metrics.csv"
    stale.write_text("step,train/loss\n1000,9.0\n")
    _run(tmp_path, store_cache)
    _assert_same_rows(_rows(tmp_path), straight)


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["step", "train/loss", "val/perplexity"])
        writer.writeheader()
        writer.writerows(rows)


ROWS = [{"step": "9", "train/loss": "3.0"}, {"step": "10", "val/perplexity": "20"},
        {"step": "10", "train/loss": "2.9"}, {"step": "11", "train/loss": "2.8"}]


@pytest.mark.parametrize(("rows", "step", "kept"), [(3, 10, 3), (0, 10, 0), (None, 10, 2), (None, 11, 3), (None, 0, 0)])
def test_resume_cuts_to_the_checkpoint_row_count_or_by_step(tmp_path, rows, step, kept):
    _write(tmp_path / "metrics.csv", ROWS)
    logger = ResumableCSVLogger(tmp_path, name="", version="")
    assert logger.rows_logged == len(ROWS)
    logger.resume(rows, step)
    assert logger.rows_logged == kept
    # Without a row count, a validation row at the resumed step was logged before its checkpoint; a
    # training row there came after it (and is logged again).
    if kept:
        with open(tmp_path / "metrics.csv", newline="") as file:
            assert list(csv.DictReader(file)) == [{"val/perplexity": "", "train/loss": "", **row} for row in ROWS[:kept]]
    else:
        assert not (tmp_path / "metrics.csv").exists()
    assert not list(tmp_path.glob(".metrics.csv.*"))  # no temporary left behind
    logger.log_metrics({"train/loss": 1.0}, step=99)
    logger.save()
    with open(tmp_path / "metrics.csv", newline="") as file:
        last = list(csv.DictReader(file))[-1]
    assert (last["step"], last["train/loss"]) == ("99", "1.0")
