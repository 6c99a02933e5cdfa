"""Signals during training (in-process): SLURM preemption saves, requeues and resumes exactly; safe points."""
from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from protein_performer.checkpoint import CheckpointError, check_resume
from protein_performer.errors import run_command
from protein_performer.train import compose_config, train
from protein_performer.training.interrupts import latest_preemption_checkpoint, requeue_signal, run_dir, slurm_job_id

from .runs import tiny_overrides

STEPS = 12
JOB = "4242"


class SignalAt(pl.Callback):
    """Sends this process `signum` at the end of training step `step` (SLURM's warning, mid-run)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def slurm(monkeypatch, tmp_path) -> Path:
    """A SLURM batch job's environment, with a stub `scontrol` on PATH; the file its calls are recorded in."""
    calls = tmp_path / "scontrol-calls"
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": JOB, "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    return calls


def _config(output_dir: Path, cache: Path, *extra: str):
    return compose_config(tiny_overrides(cache, f"trainer.max_steps={STEPS}", "trainer.val_check_interval=5",
                                         "logger=none", "attention=favor", "attention.feature_redraw_interval=3",
                                         "test=false", *extra), output_dir)


def test_slurm_preemption_saves_requeues_and_resumes_exactly(slurm, tmp_path, store_cache, capsys):
    reference = train(_config(tmp_path / "straight", store_cache)).module.state_dict()

    run = tmp_path / f"slurm-{JOB}"
    cfg = _config(run, store_cache)
    with pytest.raises(SystemExit) as stopped:  # the warning signal at step 7: mid-epoch, between redraws
        run_command("train", lambda: train(cfg, [SignalAt(7, signal.SIGUSR1)]))
    assert stopped.value.code == 128 + signal.SIGUSR1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("train: error: interrupted by SIGUSR1; saved ") and f"requeued SLURM job {JOB}" in last_line
    checkpoint = latest_preemption_checkpoint(run)
    assert checkpoint is not None and checkpoint.name == "preempted-step0000007.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 7  # saved before the step after the signal
    assert slurm.read_text().split() == ["requeue", JOB]

    # SLURM restarts the same command: same job id, same run directory, no ckpt_path.
    resumed = train(_config(run, store_cache))
    assert resumed.trainer.global_step == STEPS
    actual = resumed.module.state_dict()
    assert actual.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(actual[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


def test_outside_slurm_the_requeue_signal_is_not_handled(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm_job_id() is None
    assert not run_dir("%Y-%m-%d/%H-%M-%S").startswith("slurm-")


def test_slurm_run_directory_is_the_job_s(slurm, monkeypatch):
    assert run_dir("%Y") == f"slurm-{JOB}"
    assert compose_config(["model=tiny"]).output_dir == f"outputs/slurm-{JOB}"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_dir("%Y") == "slurm-7_3"
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: runs must not share a directory
    assert slurm_job_id() is None


@pytest.mark.parametrize("name, expected", [("SIGUSR1", signal.SIGUSR1), ("USR2", signal.SIGUSR2), (None, None)])
def test_requeue_signal_setting(name, expected):
    assert requeue_signal(name) == expected


@pytest.mark.parametrize("name", ["SIGTERM", "SIGNOPE"])
def test_requeue_signal_refuses_bad_names(name):
    with pytest.raises(Exception, match="slurm_requeue"):
        requeue_signal(name)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_step_ends_the_run_at_the_next_safe_point(signum, tmp_path, store_cache, capsys):
    cfg = _config(tmp_path / "run", store_cache)
    seen: list[int] = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            seen.append(trainer.global_step)

    with pytest.raises(SystemExit) as stopped:
        run_command("train", lambda: train(cfg, [SignalAt(3, signum), Steps()]))
    assert stopped.value.code == 128 + signum
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"train: error: interrupted by {signal.Signals(signum).name}"
    assert seen == [0, 1, 2]  # the signal came after the third step: no step began after it


def test_resume_under_another_layout_is_refused_naming_both(tmp_path, store_cache):
    first = train(_config(tmp_path / "first", store_cache, "trainer.max_steps=4", "trainer.val_check_interval=2"))
    saved = torch.load(first.checkpoint, weights_only=True)
    assert saved["run_settings"]["layout"] == {"world_size": 1, "workers": 0}

    with pytest.raises(CheckpointError) as refused:
        train(_config(tmp_path / "second", store_cache, "trainer.max_steps=6", f"ckpt_path={first.checkpoint}",
                      "data.num_workers=1"))
    message = str(refused.value)
    assert "\n" not in message
    assert "1 rank(s) x 0 data loader worker(s)" in message and "1 rank(s) x 1 data loader worker(s)" in message
    assert "resume_check=false" in message

    # Another world size (a checkpoint from 2 ranks, as DDP would save it) is refused the same way.
    two_ranks = {**saved, "run_settings": {**saved["run_settings"], "layout": {"world_size": 2, "workers": 0}}}
    with pytest.raises(CheckpointError, match=r"2 rank\(s\) x 0 .* this run has 1 rank\(s\) x 0"):
        check_resume(Path(first.checkpoint), two_ranks, {**saved["run_settings"]})
    differences = check_resume(Path(first.checkpoint), two_ranks, {**saved["run_settings"]}, strict=False)
    assert differences == ["layout.world_size: 2 -> 1"]

    # resume_check=false continues (approximately: the batch plan differs).
    resumed = train(_config(tmp_path / "third", store_cache, "trainer.max_steps=6", f"ckpt_path={first.checkpoint}",
                            "data.num_workers=1", "resume_check=false"))
    assert resumed.trainer.global_step == 6


def test_the_token_store_is_built_before_fit_starts_its_collectives(tmp_path, monkeypatch):
    """Inside fit, a long build runs between the ranks' collectives and their timeout kills every rank."""
    import inspect

    from protein_performer.data import datamodule as datamodule_module

    building_inside: list[bool] = []
    build = datamodule_module.build_token_store

    def recording_build(*args, **kwargs):
        building_inside.append(any(frame.function == "fit" for frame in inspect.stack()))
        return build(*args, **kwargs)

    monkeypatch.setattr(datamodule_module, "build_token_store", recording_build)
    train(_config(tmp_path / "run", tmp_path / "fresh-cache", "trainer.max_steps=1"))
    assert building_inside == [False]
