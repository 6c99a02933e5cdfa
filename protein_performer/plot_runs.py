"""Plot validation perplexity against optimizer step and against wall-clock time for a set of runs.

    python -m protein_performer.plot_runs multirun/2025-01-01/12-00-00            # every run below it
    python -m protein_performer.plot_runs outputs multirun --group mlm-small-sample -o cmp.png

Runs are found below each given path from their CSV logs (<run dir>/metrics.csv, logger=csv or many)
and from offline wandb runs (<run dir>/wandb/offline-run-*/run-*.wandb, logger=wandb), so nothing is
fetched from the network. `--group` keeps the runs of one wandb group (the config's `name`). Each run
is labelled by the command-line overrides that tell it apart from the others (e.g. attention=softmax).
The wall-clock axis is `val/elapsed_seconds`: training time since the run began, resumes included.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METRIC = "val/perplexity"
ELAPSED = "val/elapsed_seconds"


@dataclass
class Run:
    """One training run's validation curve."""

    path: Path  # the Hydra run dir
    group: str | None
    overrides: list[str]
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


# ---- metrics.csv ----------------------------------------------------------------------------------------

def read_csv_run(metrics_csv: Path, metric: str = METRIC) -> Run:
    """A Run from a CSVLogger metrics.csv (rows without `metric` are other logging steps)."""
    run_dir = metrics_csv.parent
    run = Run(run_dir, _csv_group(run_dir), _overrides(run_dir))
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get(metric):
                run.steps.append(int(float(row["step"])))
                run.values.append(float(row[metric]))
                run.seconds.append(float(row[ELAPSED]) if row.get(ELAPSED) else math.nan)
    return run


def _csv_group(run_dir: Path) -> str | None:
    hparams = run_dir / "hparams.yaml"
    if not hparams.is_file():
        return None
    values = yaml.safe_load(hparams.read_text()) or {}
    config = values.get("config") or {}
    return config.get("name") if isinstance(config, dict) else None


def _overrides(run_dir: Path) -> list[str]:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(overrides.read_text()) or []) if overrides.is_file() else []


# ---- offline wandb runs ---------------------------------------------------------------------------------
# A .wandb file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
# chunks, each with a 7-byte header (CRC32, length, type: full | first | middle | last); a block's tail
# shorter than a chunk header is zero padding. Each reassembled record is a wandb protobuf `Record`.

_WANDB_IDENT = b":W&B"
_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[bytes]:
    """The serialized protobuf records of a .wandb file, in order."""
    data = path.read_bytes()
    if not data.startswith(_WANDB_IDENT):
        raise ValueError(f"{path}: not a wandb run file (it does not start with {_WANDB_IDENT!r})")
    position, pending = 7, b""
    while position + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:
            position += left_in_block
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, position)
        position += _CHUNK_HEADER.size
        chunk = data[position:position + length]
        position += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
        else:  # zeros: the writer stopped mid-block (a run still going, or killed)
            return


def read_wandb_run(run_file: Path, metric: str = METRIC) -> Run:
    """A Run from an offline wandb run file (<run dir>/wandb/offline-run-*/run-*.wandb)."""
    from wandb.proto import wandb_internal_pb2

    run = Run(run_file.parent.parent.parent, None, _overrides(run_file.parent.parent.parent))
    for raw in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group = record.run.run_group or None
        elif kind == "history":
            row = {("/".join(item.nested_key) if item.nested_key else item.key): item.value_json
                   for item in record.history.item}
            if metric in row:
                run.values.append(float(json.loads(row[metric])))
                run.steps.append(int(float(json.loads(row.get("trainer/global_step", row.get("_step", "nan"))))))
                run.seconds.append(float(json.loads(row[ELAPSED])) if ELAPSED in row else math.nan)
    return run


# ---- finding and plotting -------------------------------------------------------------------------------

def find_runs(paths: Sequence[Path], group: str | None = None, metric: str = METRIC) -> list[Run]:
    """Runs below `paths` (CSV preferred when a run has both), optionally of one group, with data."""
    runs: dict[Path, Run] = {}
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist; pass Hydra run or sweep directories")
        for metrics_csv in sorted(root.rglob("metrics.csv")) if root.is_dir() else [root]:
            run = read_csv_run(metrics_csv, metric)
            runs.setdefault(run.path.resolve(), run)
        for run_file in sorted(root.rglob("run-*.wandb")) if root.is_dir() else []:
            run = read_wandb_run(run_file, metric)
            runs.setdefault(run.path.resolve(), run)
    selected = [run for run in runs.values() if run.values and (group is None or run.group == group)]
    return sorted(selected, key=lambda run: str(run.path))


def labels(runs: Sequence[Run]) -> list[str]:
    """Each run's overrides minus those all runs share; the directory name if nothing tells them apart."""
    shared = set.intersection(*(set(run.overrides) for run in runs)) if runs else set()
    out = []
    for run in runs:
        distinct = [override for override in run.overrides if override not in shared]
        out.append(" ".join(distinct) or f"{run.path.parent.name}/{run.path.name}")
    return out


def plot(runs: Sequence[Run], output: Path, metric: str = METRIC) -> Path:
    """Write a two-panel PNG: `metric` vs optimizer step, and vs wall-clock minutes."""
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit("plot_runs needs matplotlib: pip install 'protein-performer[dev]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run, label in zip(runs, labels(runs)):
        by_step.plot(run.steps, run.values, marker="o", markersize=3, label=label)
        by_time.plot([s / 60 for s in run.seconds], run.values, marker="o", markersize=3, label=label)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("wall-clock (minutes of training)")
    by_step.set_ylabel(metric)
    groups = sorted({run.group for run in runs if run.group})
    figure.suptitle(f"{metric}" + (f" — {', '.join(groups)}" if groups else ""))
    for axis in (by_step, by_time):
        axis.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m protein_performer.plot_runs", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="Hydra run or sweep directories (searched recursively)")
    parser.add_argument("--group", help="only runs of this wandb group (the training config's `name`)")
    parser.add_argument("--metric", default=METRIC, help=f"metric to plot (default {METRIC})")
    parser.add_argument("-o", "--output", type=Path, help="PNG path (default <first path>/val_perplexity.png)")
    args = parser.parse_args(argv)
    runs = find_runs(args.paths, args.group, args.metric)
    if not runs:
        raise SystemExit(f"no runs with {args.metric} below {[str(p) for p in args.paths]}"
                         + (f" in group {args.group!r}" if args.group else "")
                         + "; train with logger=csv, wandb or many, and let at least one validation finish")
    first = args.paths[0]
    output = args.output or (first if first.is_dir() else first.parent) / "val_perplexity.png"
    plot(runs, output, args.metric)
    print(f"{len(runs)} run(s) -> {output}")
    return output


if __name__ == "__main__":
    main()
