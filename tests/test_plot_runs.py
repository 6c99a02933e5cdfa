"""plot_runs reads the runs' metrics.csv (and the group and overrides beside it), never wandb's binary logs."""
from __future__ import annotations

import csv
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl

from protein_performer import plot_runs
from protein_performer.train import compose_config


def _run_dir(root: Path, name: str, group: str, overrides: list[str], curve: list[tuple[int, float, float]]) -> Path:
    """A run dir as a training run with logger=many leaves it (the parts plot_runs reads)."""
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {override}\n" for override in overrides))
    (run_dir / "hparams.yaml").write_text(f"config:\n  name: {group}\n  seed: 0\nparameters: 1234\n")
    (run_dir / "wandb" / "offline-run-20260101_000000-abc").mkdir(parents=True)
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["epoch", "step", "train/loss", plot_runs.METRIC, plot_runs.ELAPSED])
        writer.writeheader()
        for step, value, seconds in curve:
            writer.writerow({"epoch": 0, "step": step - 1, "train/loss": 3.0})  # a training row: skipped
            writer.writerow({"epoch": 0, "step": step, plot_runs.METRIC: value, plot_runs.ELAPSED: seconds})
    return run_dir


def test_a_run_is_read_from_its_metrics_csv_with_group_and_overrides(tmp_path):
    run_dir = _run_dir(tmp_path, "0", "cmp", ["attention=softmax", "name=${objective}-x"],
                       [(50, 16.5, 12.0), (100, 15.25, 24.5)])
    run = plot_runs.read_csv_run(run_dir / "metrics.csv")
    assert run.path == run_dir and run.group == "cmp"
    assert run.overrides == ["attention=softmax", "name=${objective}-x"]  # interpolations left as written
    assert (run.steps, run.values, run.seconds) == ([50, 100], [16.5, 15.25], [12.0, 24.5])


def test_runs_of_a_sweep_are_found_labelled_and_plotted(tmp_path):
    sweep = tmp_path / "sweep"
    _run_dir(sweep, "0", "cmp", ["attention=softmax", "seed=1"], [(50, 16.0, 10.0)])
    _run_dir(sweep, "1", "cmp", ["attention=favor", "seed=1"], [(50, 16.5, 8.0)])
    _run_dir(sweep, "2", "other", ["attention=favor_relu", "seed=1"], [(50, 17.0, 9.0)])
    runs = plot_runs.find_runs([sweep], group="cmp")
    assert [run.path.name for run in runs] == ["0", "1"]
    assert plot_runs.labels(runs) == ["attention=softmax", "attention=favor"]
    output = plot_runs.main([str(sweep), "--group", "cmp", "-o", str(tmp_path / "cmp.png")])
    assert output == tmp_path / "cmp.png" and output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_logged_to_wandb_only_are_named_with_the_fix(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _run_dir(sweep, "0", "cmp", ["attention=softmax"], [(50, 16.0, 10.0)])
    wandb_only = sweep / "1"
    (wandb_only / "wandb" / "offline-run-20260101_000000-def").mkdir(parents=True)
    assert plot_runs.wandb_only_runs([sweep]) == [wandb_only]
    plot_runs.main([str(sweep)])
    assert "1 run(s) logged to wandb only" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"no runs with val/perplexity .* logged to wandb only.*logger=many"):
        plot_runs.main([str(wandb_only)])


def test_a_default_training_run_writes_the_metrics_csv_plot_runs_reads(tmp_path):
    cfg = compose_config([], tmp_path)
    assert issubclass(hydra.utils.get_class(cfg.logger.csv._target_), pl.loggers.CSVLogger)
    assert cfg.logger.csv.save_dir == str(tmp_path) and "wandb" in cfg.logger
