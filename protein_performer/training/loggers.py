"""A CSV logger whose metrics.csv survives a resumed run.

Lightning's CSVLogger deletes <run dir>/metrics.csv when a run resumes into its own directory, so a run
killed at step 3,000 and resumed ends with a file that starts at step 3,000. `ResumableCSVLogger` keeps
the file and, when training starts, cuts it back to what the checkpoint saw: the rows logged before the
checkpoint are kept, the rows logged after it (which the resumed run logs again) are dropped. The
checkpoint records that row count (`ProteinLM.on_save_checkpoint`); a checkpoint without it is cut by
step. A fresh (not resumed) run into a directory with an old metrics.csv starts the file afresh.

Every rewrite of the file goes through a temporary file and an atomic rename: a kill never leaves a
half-written metrics.csv.
"""
from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only

CHECKPOINT_KEY = "csv_log_rows"  # rows of metrics.csv logged when a checkpoint was saved


def write_csv_atomically(path: str | os.PathLike, fieldnames: list[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write a CSV file with a header through a temporary file in the same directory and a rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _step(row: Mapping[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but it appends to an existing metrics.csv and counts the rows logged."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.rows_logged = 0
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                reader = csv.DictReader(file)
                self.metrics_keys = list(reader.fieldnames or [])
                self.rows_logged = sum(1 for _ in reader)

    def _check_log_dir_exists(self) -> None:
        pass  # keep metrics.csv: `resume` decides what stays

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        self.rows_logged += 1

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        write_csv_atomically(self.metrics_file_path, fieldnames, rows)

    def resume(self, rows: int | None, step: int) -> int:
        """Cut metrics.csv back to a checkpoint: its first `rows` rows, or (rows None) by `step`.

        Without a row count, a row is kept if it was logged before step `step` or is a validation row
        at `step` (validation runs before the checkpoint of its step is saved). Returns the rows kept.
        """
        self.save()  # nothing should be buffered yet; if it is, it is part of the file being cut
        if not os.path.isfile(self.metrics_file_path):
            self.rows_logged = 0
            return 0
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            fieldnames = list(reader.fieldnames or [])
            existing = list(reader)
        if rows is not None:
            kept = existing[:max(rows, 0)]
        else:
            kept = []
            for row in existing:
                row_step = _step(row)
                if row_step is not None and (row_step < step or (row_step == step and any(
                        key.startswith("val/") and row[key] not in ("", None) for key in row))):
                    kept.append(row)
        if len(kept) != len(existing):
            if kept:
                write_csv_atomically(self.metrics_file_path, fieldnames, kept)
            else:
                os.remove(self.metrics_file_path)
                fieldnames = []
        self.metrics_keys = fieldnames
        self.rows_logged = len(kept)
        return len(kept)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger (same arguments and files) whose metrics.csv carries on across resumed runs."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @property
    def rows_logged(self) -> int:
        """Rows of metrics.csv so far, written or buffered (0 on ranks other than the first)."""
        return self.experiment.rows_logged if rank_zero_only.rank == 0 else 0

    @rank_zero_only
    def resume(self, rows: int | None, step: int) -> None:
        """Cut metrics.csv to a checkpoint's `rows` (None: by `step`); rows=0 starts the file afresh."""
        self.experiment.resume(rows, step)


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, minus the `anonymous=None` it always hands wandb.init.

    wandb (0.19 and later) answers any `anonymous` value, None included, with "The anonymous setting has
    no effect and will be removed"; a run that never asked for it should not see that warning.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
