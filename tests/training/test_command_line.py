"""The command line end to end: a comparison multirun, offline wandb runs, metrics.csv, plot_runs."""
from __future__ import annotations

import pytest

from protein_performer import plot_runs

from .runs import run_cli, tiny_overrides
from .wandb_file import read_run


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
        wandb_run = read_run(run_files[0])
        csv_run = plot_runs.read_csv_run(job / "metrics.csv")
        assert wandb_run.group == "cmp" and csv_run.group == "cmp"
        validations = [row for row in wandb_run.history if plot_runs.METRIC in row]
        assert [row["trainer/global_step"] for row in validations] == csv_run.steps == [2, 4]
        assert [row[plot_runs.METRIC] for row in validations] == pytest.approx(csv_run.values)
        assert all(s > 0 for s in csv_run.seconds)
        assert [row[plot_runs.ELAPSED] for row in validations] == pytest.approx(csv_run.seconds)
        # The resolved config was logged: the job's own attention kind, interpolations filled in.
        config = wandb_run.config["config"]
        assert config["attention"]["kind"] == kind and config["name"] == "cmp"
        assert config["output_dir"] == str(job)

    runs = plot_runs.find_runs([sweep], group="cmp")
    assert plot_runs.labels(runs) == ["attention=softmax", "attention=favor"]
    output = plot_runs.main([str(sweep), "--group", "cmp"])
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
