"""Plot validation perplexity against optimizer step and against wall-clock time for a set of runs.

    python -m protein_performer.plot_runs multirun/2025-01-01/12-00-00            # every run below it
    python -m protein_performer.plot_runs outputs multirun --group mlm-small-sample -o cmp.png

Runs are found below each given path by the metrics.csv that Lightning's CSVLogger writes into the run
dir (logger=many, the default, or logger=csv), so nothing is fetched from the network. A run logged to
wandb alone (logger=wandb) has no such file: its binary .wandb log has no public offline reader, so
it is named and skipped (`wandb sync` uploads it to compare there). `--group` keeps the runs of one
group (the config's `name`, read from the logged hparams.yaml). Each run is labelled by the command-line
overrides that tell it apart from the others (e.g. attention=softmax), read from .hydra/overrides.yaml.
The wall-clock axis is `val/elapsed_seconds`: training time since the run began, resumes included.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

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


def read_csv_run(metrics_csv: Path, metric: str = METRIC) -> Run:
    """A Run from a CSVLogger metrics.csv (rows without `metric` are other logging steps)."""
    run_dir = metrics_csv.parent
    run = Run(run_dir, _group(run_dir), _overrides(run_dir))
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get(metric):
                run.steps.append(int(float(row["step"])))
                run.values.append(float(row[metric]))
                run.seconds.append(float(row[ELAPSED]) if row.get(ELAPSED) else math.nan)
    return run


def _group(run_dir: Path) -> str | None:
    """The run's `name` as train.py logged it (resolved) into the CSVLogger's hparams.yaml."""
    hparams = run_dir / "hparams.yaml"
    if not hparams.is_file():
        return None
    config = _load_yaml(hparams)
    config = config.get("config") if isinstance(config, dict) else None
    name = config.get("name") if isinstance(config, dict) else None
    return None if name is None else str(name)


def _overrides(run_dir: Path) -> list[str]:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    values = _load_yaml(overrides) if overrides.is_file() else []
    return [str(value) for value in values] if isinstance(values, list) else []


def _load_yaml(path: Path) -> object:
    """A YAML file as plain containers, interpolations (`${...}` in an override) left as written."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def wandb_only_runs(paths: Sequence[Path]) -> list[Path]:
    """Run dirs below `paths` with an offline wandb run but no metrics.csv (trained with logger=wandb)."""
    found = set()
    for root in paths:
        if root.is_dir():
            for wandb_dir in root.rglob("wandb"):
                run_dir = wandb_dir.parent
                if any(wandb_dir.glob("offline-run-*")) and not (run_dir / "metrics.csv").is_file():
                    found.add(run_dir)
    return sorted(found)


# ---- finding and plotting -------------------------------------------------------------------------------

def find_runs(paths: Sequence[Path], group: str | None = None, metric: str = METRIC) -> list[Run]:
    """Runs below `paths` with a metrics.csv, optionally of one group, that logged `metric`."""
    runs: dict[Path, Run] = {}
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist; pass Hydra run or sweep directories")
        for metrics_csv in sorted(root.rglob("metrics.csv")) if root.is_dir() else [root]:
            run = read_csv_run(metrics_csv, metric)
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
    skipped = wandb_only_runs(args.paths)
    note = (f"{len(skipped)} run(s) logged to wandb only, without metrics.csv, skipped "
            f"(e.g. {skipped[0]}): train with logger=many (the default) or logger=csv to plot them here, "
            "or upload them with `wandb sync <run dir>/wandb/offline-run-*`") if skipped else ""
    if not runs:
        raise SystemExit(f"no runs with {args.metric} below {[str(p) for p in args.paths]}"
                         + (f" in group {args.group!r}" if args.group else "")
                         + (f"; {note}" if note else
                            "; train with logger=many or logger=csv, and let at least one validation finish"))
    if note:
        print(note, file=sys.stderr)
    first = args.paths[0]
    output = args.output or (first if first.is_dir() else first.parent) / "val_perplexity.png"
    plot(runs, output, args.metric)
    print(f"{len(runs)} run(s) -> {output}")
    return output


if __name__ == "__main__":
    main()
