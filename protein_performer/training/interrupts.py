"""Signals during training: SIGTERM and Ctrl-C at safe points, and deliberate SLURM preemption.

`SafePoints` raises a recorded SIGTERM or SIGINT (protein_performer.errors: the handler only records
it) between batches of every loop, so a signal that arrives anywhere in a step ends the run with
the command's one line and status 143 or 130.

`SlurmRequeue` makes preemption a tested path. SLURM sends a warning signal before a job's end
(`#SBATCH --signal=USR1@90`; the signal is `slurm_requeue`, SIGUSR1 by default). Its handler only
records it; before the next step the run saves `preempted-step<step>.ckpt` in its run directory, calls
`scontrol requeue <job id>` and ends with one line (status 128 + the signal). SLURM starts the job
again with the same command and the same SLURM_JOB_ID, so the run directory (outputs/slurm-<job id>,
see `run_dir`) is the same, and train resumes from the newest such checkpoint there by itself, exactly:
it is taken between steps, with the data position, schedule, redraw and guard state of the last step.
Lightning's own SLURM handler, which saves from inside the signal handler (mid-step), is switched off.
With several ranks, the flag is combined across ranks at logging steps only (every rank must save
at the same step; a collective on every step would make every step wait on the host).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import SLURMEnvironment

from protein_performer.errors import Interrupted, UserError, raise_if_interrupted, record_signal

__all__ = ["SafePoints", "SlurmRequeue", "disable_lightning_requeue", "slurm_job_id", "run_dir", "latest_preemption_checkpoint", "preemption_checkpoint", "requeue_signal"]

_INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # as Lightning's SLURMEnvironment.detect: srun --pty shells


class SafePoints(pl.Callback):
    """Raises a SIGTERM or Ctrl-C recorded by protein_performer.errors between batches of every loop."""

    def on_train_batch_start(self, *args: Any) -> None:
        raise_if_interrupted()

    def on_train_batch_end(self, *args: Any) -> None:
        raise_if_interrupted()

    def on_validation_batch_end(self, *args: Any) -> None:
        raise_if_interrupted()

    def on_test_batch_end(self, *args: Any) -> None:
        raise_if_interrupted()

    def on_sanity_check_end(self, *args: Any) -> None:
        raise_if_interrupted()


def slurm_job_id() -> str | None:
    """This SLURM batch job's id (`<array job>_<task>` for an array task); None outside one or in an
    interactive shell allocation (two runs there must not share a run directory)."""
    if "SLURM_JOB_ID" not in os.environ or os.environ.get("SLURM_JOB_NAME") in _INTERACTIVE_JOB_NAMES:
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


_STARTED = time.localtime()  # one time for every run_dir of this process, as Hydra's ${now:}


def run_dir(pattern: str) -> str:
    """The run directory's name under outputs/: slurm-<job id> in a SLURM batch job (the same when the
    job is requeued, so it resumes there), else the process's start time formatted by `pattern`."""
    job = slurm_job_id()
    return f"slurm-{job}" if job is not None else time.strftime(pattern, _STARTED)


def preemption_checkpoint(directory: str | os.PathLike, step: int) -> Path:
    """Where a preempted run saves at optimizer step `step`. Not Lightning's hpc_ckpt_<n>.ckpt: Lightning
    loads those by itself (under SLURM) into every later validate/test call, over the final weights."""
    return Path(directory) / f"preempted-step{step:07d}.ckpt"


def latest_preemption_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest `preemption_checkpoint` in `directory`, or None."""
    found = [(int(m.group(1)), path) for path in Path(directory).glob("preempted-step*.ckpt")
             if (m := re.fullmatch(r"preempted-step(\d+)\.ckpt", path.name))]
    return max(found)[1] if found else None


def requeue_signal(name: object) -> int | None:
    """The `slurm_requeue` setting as a signal number (None: off); UserError naming the key when unknown."""
    if name is None or name is False or str(name).lower() in ("none", "false", "off"):
        return None
    text = str(name).upper()
    text = text if text.startswith("SIG") else f"SIG{text}"
    try:
        signum = signal.Signals[text]
    except KeyError:
        raise UserError(f"slurm_requeue={name}: not a signal name; use SIGUSR1 (the default), SIGUSR2 or null") from None
    if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL, signal.SIGSTOP):
        raise UserError(f"slurm_requeue={name}: reserved for stopping; use SIGUSR1 (the default) or SIGUSR2")
    return int(signum)


def disable_lightning_requeue(trainer: pl.Trainer) -> None:
    """Switch off Lightning's SLURM requeue handler, which saves from inside the signal handler (mid-step)."""
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False


class SlurmRequeue(pl.Callback):
    """On `signum` in a SLURM job: save a checkpoint before the next step, requeue, stop."""

    def __init__(self, signum: int, job_id: str) -> None:
        self.signum = signum
        self.job_id = job_id
        self.requested = False
        self._previous: Any = None

    def _record(self, signum: int, frame: object) -> None:
        self.requested = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is None:
            try:
                self._previous = signal.signal(self.signum, self._record)
            except ValueError:  # not the main thread: signals cannot be handled here
                self._previous = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _agreed(self, trainer: pl.Trainer) -> bool:
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return self.requested
        if (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) != 0:
            return False  # only at logging steps, which synchronise anyway
        flag = torch.tensor([float(self.requested)], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        # Before the next step rather than after the last: by now every callback, the LR scheduler and
        # the loop's counters have finished that step, so the checkpoint holds exactly its end.
        if not self._agreed(trainer):
            return
        path = preemption_checkpoint(trainer.default_root_dir, trainer.global_step)
        trainer.save_checkpoint(path)
        name = signal.Signals(self.signum).name
        if trainer.is_global_zero:
            try:
                result = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True, text=True,
                                        timeout=60)
                failure = result.stderr.strip() if result.returncode != 0 else None
            except (OSError, subprocess.TimeoutExpired) as error:
                failure = str(error)
            if failure is not None:
                record_signal(self.signum)
                raise Interrupted(self.signum, f"saved {path}, but `scontrol requeue {self.job_id}` failed "
                                               f"({failure}); resubmit the same command to resume from it")
        record_signal(self.signum)
        raise Interrupted(self.signum, f"saved {path} and requeued SLURM job {self.job_id} ({name} is the "
                                       "preemption warning); it resumes from that checkpoint when it restarts")
