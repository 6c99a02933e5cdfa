"""The command line end to end: a comparison multirun, offline wandb runs, metrics.csv, plot_runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from protein_performer import plot_runs

from .runs import run_cli, tiny_overrides


@pytest.mark.slow
def test_attention_comparison_multirun_writes_offline_wandb_runs_of_one_group(tmp_path, store_cache):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "attention=softmax,favor", *tiny_overrides(store_cache), "trainer.max_steps=4",
                      "trainer.val_check_interval=2", "logger=many", "test=false", "name=cmp",
                      f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.stdout.count("final validation perplexity") == 2

    jobs = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert [job.name for job in jobs] == ["0", "1"]
    for job, kind in zip(jobs, ["softmax", "favor"]):
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / "metrics.csv").is_file()
        run_files = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(run_files) == 1, "one offline wandb run per job, inside the job's run dir"
        wandb_run = plot_runs.read_wandb_run(run_files[0])
        csv_run = plot_runs.read_csv_run(job / "metrics.csv")
        assert wandb_run.group == "cmp" and csv_run.group == "cmp"
        assert wandb_run.steps == csv_run.steps == [2, 4]
        assert wandb_run.values == pytest.approx(csv_run.values)
        assert all(s > 0 for s in wandb_run.seconds)
        # The resolved config was logged: the job's own attention kind, interpolations filled in.
        config = _logged_config(run_files[0])
        assert config["attention"]["kind"] == kind and config["name"] == "cmp"
        assert config["output_dir"] == str(job)

    runs = plot_runs.find_runs([sweep], group="cmp")
    assert plot_runs.labels(runs) == ["attention=softmax", "attention=favor"]
    output = plot_runs.main([str(sweep), "--group", "cmp"])
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _logged_config(run_file: Path) -> dict:
    """The `config` entry train.py logged, read back from an offline .wandb file."""
    for raw in plot_runs.wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                if item.key == "config":
                    return json.loads(item.value_json)
    raise AssertionError(f"{run_file} holds no logged config")
