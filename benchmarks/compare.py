"""FAVOR+ against exact softmax and the seed papers' other attention kinds, trained on real proteins.

    python benchmarks/compare.py --fasta swissprot_2014_01_dev.fasta.gz          # the full comparison
    python benchmarks/compare.py --fasta ... --settings A D --kinds softmax favor  # a part of it
    python benchmarks/compare.py --quick                                         # a few minutes, tiny

The Performer paper's protein comparison at the scale of one CPU machine. Every cell is one real
`python -m protein_performer.train` run (printed, so any cell can be repeated by hand) with the same
model size, data, seed, optimiser and token budget; only the attention kind (or, in D, one setting of
FAVOR+) differs:

    A  single proteins cropped to 1024, masked LM (paper BID): softmax favor favor_relu favor_rpe combiner
    B  single proteins cropped to 1024, causal LM (paper UNI): softmax favor favor_relu
    C  windows of 4096 from the <eos>-joined stream, masked LM (paper concat): softmax favor favor_rpe,
       at equal wall-clock: every kind gets the same seconds of training (below)
    D  ablations of A's favor: no feature redraw, redraws every 100 steps, and m = 64 random features
       (A's favor is the reference)
    L  (on request) A's kinds trained 4x longer (2,000 steps): does a gap of a 500-step run close?
    S  (on request) seed spread: A's softmax and favor again with seed 1, to tell a difference between
       kinds from what another draw of initial weights, batches, masks and features moves
    F, G  (on request, issue 21) FAVOR+'s fidelity variants (OPRF, exact band) at L's steps (F) and at
       C's equal wall-clock (G)
    H, HC (on request, issue 20; --clusters) homolog windows of 4096, whole clusters, positions within
       members: masked LM (softmax favor favor_rpe combiner, F's favor_window64, and favor_member64: the
       band taken over tokens sorted by member position) and causal LM
       (softmax favor favor_rpe combiner favor_member64), equal steps,
       with first-member against later-member perplexity: what each kind reads from earlier homologs
    HW (on request, issue 20; --clusters) H's masked LM on homolog windows of 8192 at equal wall-clock
       (softmax favor favor_member64; 4x C's seconds per kind)

A and B (and D) train every kind for the same number of steps. For C (and G, HW), seconds per step are measured
first for all of C's kinds by short real training runs, alternated and repeated (keeping each kind's
fastest), so that the budget does not depend on what else the machine ran while the long runs did;
each kind then trains for `budget / (seconds per step)` steps. Its curve is plotted against
step x seconds per step. Logged wall-clock (val/elapsed_seconds) and tokens/s are reported as measured.

Results: <out>/<setting>/<cell>/ is each run's Hydra directory (metrics.csv, checkpoints, config);
<out>/<setting>/<cell>/result.json marks a finished cell, which a rerun skips; a cell interrupted
mid-run resumes from its last checkpoint (exactly: see docs/errors.md, Resume). The tables print as Markdown
and are also written to <out>/results.md, with one PNG per setting (validation perplexity against
step and wall-clock) beside it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "data" / "swissprot_subset.fasta.gz"
BUNDLED_CLUSTERS = REPO / "data" / "swissprot_subset.clusters50.tsv.gz"
SAMPLE = REPO / "data" / "uniprot_sample.fasta"  # --quick: 500 proteins, so evaluations take no time


@dataclass(frozen=True)
class Scale:
    """How big every run of one invocation is (model, data, budget)."""

    model: str  # conf/model/<model>.yaml
    single_length: int  # A, B, D: crop length (tokens, <cls>/<eos> included)
    concat_length: int  # C: window length
    homolog_length: int  # H: homolog window length
    tokens_per_batch: int  # tokens per optimizer step (single: padded budget; C: windows x length)
    steps: int  # A, B, D: optimizer steps
    concat_seconds: float  # C: training seconds per kind
    val_every: int  # optimizer steps between validations
    eval_fraction: float  # valid and test fraction of the proteins (hash split on accessions)
    warmup_steps: int
    lr: float
    calibration_steps: int  # C: steps per timing run (the first third are not timed)
    calibration_repeats: int


FULL = Scale(model="small", single_length=1024, concat_length=4096, homolog_length=4096, tokens_per_batch=8192, steps=500,
             concat_seconds=480.0, val_every=100, eval_fraction=0.005, warmup_steps=50, lr=2e-3,
             calibration_steps=15, calibration_repeats=2)
QUICK = Scale(model="tiny", single_length=128, concat_length=256, homolog_length=256, tokens_per_batch=512, steps=6,
              concat_seconds=0.3, val_every=3, eval_fraction=0.05, warmup_steps=2, lr=2e-3,
              calibration_steps=6, calibration_repeats=1)


@dataclass(frozen=True)
class Cell:
    """One training run: a setting's kind (or ablation), as command-line overrides."""

    setting: str
    name: str
    overrides: tuple[str, ...]
    kind: str
    reuse: tuple[str, str] | None = None  # (setting, cell) whose run this cell is (D's reference)


@dataclass(frozen=True)
class Setting:
    name: str
    title: str
    objective: str
    sampling: str
    cells: tuple[Cell, ...]
    equal_wall_clock: bool = False
    steps_factor: int = 1  # optimizer steps: the scale's times this (validations: every steps_factor / 2 x)
    length_factor: int = 1  # window (or crop) length: the scale's times this
    seconds_factor: float = 1.0  # equal wall-clock: training seconds per kind, the scale's times this

    def steps(self, scale: Scale) -> int:
        return scale.steps * self.steps_factor

    def length(self, scale: Scale) -> int:
        """Tokens per window (concat, homologs) or the crop length (single proteins)."""
        base = {"concat": scale.concat_length, "homologs": scale.homolog_length}.get(self.sampling,
                                                                                    scale.single_length)
        return base * self.length_factor

    def seconds(self, scale: Scale) -> float:
        """Equal wall-clock settings: the training seconds every kind gets."""
        return scale.concat_seconds * self.seconds_factor

    def val_every(self, scale: Scale) -> int:
        return scale.val_every * max(1, self.steps_factor // 2)


def homolog_cells(setting: str, names: Sequence[str]) -> tuple[Cell, ...]:
    """One cell per kind, positions within members where the kind has rotary positions to restart."""
    def scope(name: str) -> tuple[str, ...]:
        return () if name == "favor_rpe" else ("model.position_scope=member",)

    return tuple(Cell(setting, name, (f"attention={name}", *scope(name)), name) for name in names)


def member_band_cell(setting: str) -> Cell:
    """FAVOR+ with its exact band of 64 over tokens sorted by member position (attention.band_order=member):
    aligned residues of homologs fall in it (87% of aligned pairs of H's held-out clusters share their
    member position: benchmarks/member_offsets.py)."""
    return Cell(setting, "favor_member64", ("attention=favor", "attention.exact_window=64", "attention.band_order=member",
                                            "model.position_scope=member"), "favor")


def settings() -> dict[str, Setting]:
    def kinds(setting: str, names: Sequence[str]) -> tuple[Cell, ...]:
        return tuple(Cell(setting, name, (f"attention={name}",), name) for name in names)

    return {setting.name: setting for setting in (
        Setting("A", "single proteins cropped to 1024, masked LM (paper BID)", "mlm", "single",
                kinds("A", ("softmax", "favor", "favor_relu", "favor_rpe", "combiner"))),
        Setting("B", "single proteins cropped to 1024, causal LM (paper UNI)", "clm", "single",
                kinds("B", ("softmax", "favor", "favor_relu"))),
        Setting("C", "windows of 4096 from the <eos>-joined stream, masked LM (paper concat), equal wall-clock",
                "mlm", "concat", kinds("C", ("softmax", "favor", "favor_rpe")), equal_wall_clock=True),
        Setting("D", "ablations of A's favor", "mlm", "single", (
            Cell("D", "favor", ("attention=favor",), "favor", reuse=("A", "favor")),
            Cell("D", "no_redraw", ("attention=favor", "attention.feature_redraw_interval=0"), "favor"),
            # The default interval (1,000 steps) never fires in a 500-step run, so the default run is
            # itself one without redraws: this cell redraws five times.
            Cell("D", "redraw100", ("attention=favor", "attention.feature_redraw_interval=100"), "favor"),
            Cell("D", "m64", ("attention=favor", "attention.nb_features=64"), "favor"),
        )),
        Setting("L", "A's kinds trained 4x as many steps", "mlm", "single", (
            *kinds("L", ("softmax", "favor", "favor_rpe", "combiner")),
            # D's no_redraw at a length where the default interval (1,000) fires: favor redraws once.
            Cell("L", "no_redraw", ("attention=favor", "attention.feature_redraw_interval=0"), "favor"),
        ), steps_factor=4),
        # Issue 21: FAVOR+'s variance-reduced variants against L's softmax and favor, rerun so that every
        # cell has masked-only perplexity. exact_window=64 had the lowest attention error of the fidelity
        # table (0.62x plain FAVOR+ at m=256 on the demo model); it covers whole blocks of 64 around i.
        Setting("F", "L with FAVOR+'s fidelity variants (OPRF, exact local band), masked-only", "mlm", "single", (
            *kinds("F", ("softmax", "favor")),
            Cell("F", "favor_oprf", ("attention=favor", "attention.features=oprf"), "favor"),
            Cell("F", "favor_window64", ("attention=favor", "attention.exact_window=64"), "favor"),
            Cell("F", "favor_oprf_window64",
                 ("attention=favor", "attention.features=oprf", "attention.exact_window=64"), "favor"),
        ), steps_factor=4),
        # Issue 21: F's best variant where FAVOR+ has beaten softmax, C's equal wall-clock at 4096, with every
        # kind recalibrated in one run (so the exact band pays its extra time per step) and masked-only.
        Setting("G", "C's windows of 4096 at equal wall-clock with F's best variant (exact band), masked-only",
                "mlm", "concat", (
                    *kinds("G", ("softmax", "favor")),
                    Cell("G", "favor_window64", ("attention=favor", "attention.exact_window=64"), "favor"),
                ), equal_wall_clock=True),
        # Issue 20: homolog windows, where a later member can read the aligned residue of an earlier one.
        # Positions count within each member (model.position_scope=member), which is what let softmax learn
        # to read homologs in the exploration runs; favor_rpe's relative bias spans the window (its kind
        # has no rotary position to restart), so it keeps window positions.
        Setting("H", "homolog windows of 4096 (whole clusters), masked LM, positions within members", "mlm",
                "homologs", (*homolog_cells("H", ("softmax", "favor", "favor_rpe", "combiner")),
                             Cell("H", "favor_window64", ("attention=favor", "attention.exact_window=64",
                                                          "model.position_scope=member"), "favor"),
                             member_band_cell("H"))),
        Setting("HC", "homolog windows of 4096 (whole clusters), causal LM, positions within members", "clm",
                "homologs", (*homolog_cells("HC", ("softmax", "favor", "favor_rpe", "combiner")),
                             member_band_cell("HC"))),
        # Issue 20: H's kinds at equal wall-clock on windows of 8192, where softmax's quadratic cost bites; each
        # kind gets 4x C's seconds, so that softmax trains about as many steps as in H.
        Setting("HW", "homolog windows of 8192 (whole clusters), masked LM, positions within members, equal "
                "wall-clock", "mlm", "homologs",
                (*homolog_cells("HW", ("softmax", "favor")), member_band_cell("HW"),
                 *homolog_cells("HW", ("favor_rpe", "combiner"))),
                equal_wall_clock=True, length_factor=2, seconds_factor=4.0),
        Setting("S", "seed spread of A's softmax and favor", "mlm", "single", (
            Cell("S", "softmax", ("attention=softmax",), "softmax", reuse=("A", "softmax")),
            Cell("S", "favor", ("attention=favor",), "favor", reuse=("A", "favor")),
            Cell("S", "softmax_seed1", ("attention=softmax", "seed=1"), "softmax"),
            Cell("S", "favor_seed1", ("attention=favor", "seed=1"), "favor"),
        )),
    )}


def base_overrides(setting: Setting, scale: Scale, fasta: Path, cache_dir: Path,
                   clusters: Path | None = None) -> list[str]:
    """What every cell of `setting` shares: data, model, objective, optimiser, evaluation, logging.
    Homolog windows need `clusters` (an MMseqs2 TSV of the FASTA's records)."""
    length = setting.length(scale)
    overrides = [
        "data=swissprot", f"data.fasta={fasta}", f"data.cache_dir={cache_dir}", f"data.sampling={setting.sampling}",
        f"data.max_length={length}", f"data.valid_fraction={scale.eval_fraction}",
        f"data.test_fraction={scale.eval_fraction}", f"model={scale.model}", f"model.max_length={length}",
        f"objective={setting.objective}", "trainer=cpu", f"trainer.val_check_interval={setting.val_every(scale)}",
        f"trainer.log_every_n_steps={max(1, setting.val_every(scale) // 10)}",
        f"optim.lr={scale.lr}", f"optim.warmup_steps={scale.warmup_steps}", "logger=csv", "seed=0",
        f"name=compare-{setting.name}",
    ]
    if setting.sampling == "homologs":
        if clusters is None:
            raise SystemExit(f"setting {setting.name} reads homolog windows: give --clusters (an MMseqs2 TSV of "
                             f"{fasta.name}'s records)")
        overrides += [f"data.clusters={clusters}", "data.min_cluster_members=2"]
    if setting.sampling in ("concat", "homologs"):
        overrides.append(f"data.batch_size={max(1, scale.tokens_per_batch // length)}")
    else:
        overrides.append(f"data.tokens_per_batch={scale.tokens_per_batch}")
    return overrides


# ---- running one cell -------------------------------------------------------------------------------

def train_command(overrides: Sequence[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "protein_performer.train", *overrides, f"hydra.run.dir={run_dir}"]


def portable_path(value: str) -> str:
    """A path as a reader of a committed result can use it: relative to the repository, or <data>/<name>.

    Paths under any checkout's benchmarks/results/ (this repository's or another worktree's) keep their
    part from benchmarks/results/ on; other files outside the repository (the FASTA) become <data>/<name>.
    """
    path = Path(value)
    if not path.is_absolute():
        return value
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    parts = path.parts
    for i in range(len(parts) - 1):
        if parts[i:i + 2] == ("benchmarks", "results"):
            return str(Path(*parts[i:]))
    return f"<data>/{path.name}"


def portable_command(command: Sequence[str]) -> str:
    """A training command line for result.json: `python -m ...` with every absolute path made portable."""
    def argument(arg: str) -> str:
        key, sep, value = arg.partition("=")
        return f"{key}={portable_path(value)}" if sep else arg

    return shlex.join(["python", *(argument(arg) for arg in command[1:])])


def run_training(command: list[str], log: Path) -> tuple[int, float, float]:
    """Run one training subprocess (output to `log`): (exit code, wall seconds, peak RSS in MB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("ab") as handle:
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")})
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.terminate()
            process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.monotonic() - started, usage.ru_maxrss / 1024


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """A run's CSVLogger rows (empty cells dropped), one merged row per step, in step order.

    A resumed run's logger starts a fresh metrics.csv, so `run_cell` keeps the earlier file as
    metrics-part<N>.csv; the parts are read in order and a later part's values win for the same
    step (what an interrupted process logged after its last checkpoint is logged again).
    """
    parts = sorted(run_dir.glob("metrics-part*.csv"), key=lambda p: int(p.stem.removeprefix("metrics-part")))
    merged: dict[float, dict[str, float]] = {}
    for path in [*parts, run_dir / "metrics.csv"]:
        if not path.is_file():
            continue
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                values = {key: float(value) for key, value in row.items() if value not in ("", None)}
                merged.setdefault(values.get("step", -1.0), {}).update(values)
    return [merged[step] for step in sorted(merged)]


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    """Final validation and test metrics, median train throughput, training wall-clock, steps.

    Masked LM: `*_masked` score only the positions shown as <mask> (what the model must infer from
    context); the plain figures score all targets of the 80/10/10 recipe. `val_baseline_frequency*`:
    the training split's amino-acid frequencies on the same targets (logged at the end of the run).
    """
    def last(key: str) -> float:
        values = [row[key] for row in rows if key in row]
        return values[-1] if values else math.nan

    rates = sorted(row["train/tokens_per_sec"] for row in rows if "train/tokens_per_sec" in row)
    summary = {
        "val_perplexity": last("val/perplexity"), "val_accuracy": last("val/accuracy"),
        "test_perplexity": last("test/perplexity"), "test_accuracy": last("test/accuracy"),
        "tokens_per_sec": rates[len(rates) // 2] if rates else math.nan,
        "train_seconds": last("val/elapsed_seconds"), "steps": last("step"),
    }
    for key in ("val/perplexity_masked", "val/accuracy_masked", "test/perplexity_masked", "test/accuracy_masked",
                "val/perplexity_masked_first", "val/perplexity_masked_later", "val/perplexity_first",
                "val/perplexity_later", "val/baseline_frequency_perplexity", "val/baseline_frequency_perplexity_masked",
                "val/baseline_frequency_perplexity_masked_first", "val/baseline_frequency_perplexity_masked_later",
                "val/baseline_frequency_perplexity_first", "val/baseline_frequency_perplexity_later"):
        value = last(key)
        if not math.isnan(value):  # absent from runs before masked-only metrics: no key in result.json
            summary[key.replace("/", "_")] = value
    return summary


def curve(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    """Each validation's step, seconds and perplexity; masked LM runs that log it also the masked-only one."""
    points = [row for row in rows if "val/perplexity" in row and "step" in row]
    result = {"step": [row["step"] for row in points],
              "seconds": [row.get("val/elapsed_seconds", math.nan) for row in points],
              "val_perplexity": [row["val/perplexity"] for row in points]}
    for key in ("val/perplexity_masked", "val/perplexity_masked_first", "val/perplexity_masked_later",
                "val/perplexity_first", "val/perplexity_later"):
        if any(key in row for row in points):
            result[key.replace("/", "_")] = [row.get(key, math.nan) for row in points]
    return result


def run_cell(cell: Cell, overrides: list[str], cell_dir: Path, extra: dict[str, float] | None = None) -> dict:
    """Train one cell (resuming an interrupted one) unless its result.json exists; return the result."""
    result_file = cell_dir / "result.json"
    if result_file.is_file():
        print(f"  {cell.setting}/{cell.name}: done before, skipped ({result_file})", flush=True)
        return json.loads(result_file.read_text())
    last = cell_dir / "checkpoints" / "last.ckpt"
    resume = [f"ckpt_path={last}"] if last.is_file() else []
    if resume and (cell_dir / "metrics.csv").is_file():
        part = len(list(cell_dir.glob("metrics-part*.csv")))
        os.replace(cell_dir / "metrics.csv", cell_dir / f"metrics-part{part}.csv")
    command = train_command([*overrides, *resume], cell_dir)
    print(f"  {cell.setting}/{cell.name}: {'resuming ' if resume else ''}"
          f"{shlex.join(['python', *command[1:]])}", flush=True)
    code, seconds, peak_mb = run_training(command, cell_dir / "train.log")
    if code != 0:
        raise SystemExit(f"{cell.setting}/{cell.name} failed (exit {code}); see {cell_dir / 'train.log'}")
    rows = read_metrics(cell_dir)
    result = {"setting": cell.setting, "cell": cell.name, "kind": cell.kind,
              "command": portable_command(train_command(overrides, cell_dir)),
              **summarize(rows), "peak_rss_mb": peak_mb, "process_seconds": seconds,
              "resumed": bool(resume), "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "curve": curve(rows), **(extra or {})}
    tmp = result_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_file)
    return result


# ---- C: equal wall-clock ------------------------------------------------------------------------------

def calibrate(setting: Setting, scale: Scale, overrides: list[str], out: Path) -> dict[str, float]:
    """Seconds per optimizer step of each of C's kinds, from short real training runs (cached).

    Kinds alternate, `calibration_repeats` times; each run's rate is its median over the steps after
    the first third (throughput window: 1 step), and each kind keeps its fastest run, the one least
    disturbed by other work on the machine.

    A cache that lacks some of the setting's kinds (kinds added after it was written) is extended: the
    missing kinds are timed beside the cheapest cached kind, whose new figure is printed against its
    cached one (a drift check of the machine), and only the missing kinds are added.
    """
    cache = out / "seconds_per_step.json"
    cached: dict[str, float] = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [cell for cell in setting.cells if cell.name not in cached]
    if not missing:
        return cached
    timed_cells = missing
    reference = None
    if cached:
        names = {cell.name for cell in setting.cells}
        reference = min((name for name in cached if name in names), key=cached.__getitem__, default=None)
        timed_cells = [cell for cell in setting.cells if cell.name == reference] + missing
    length = setting.length(scale)
    tokens_per_step = max(1, scale.tokens_per_batch // length) * length
    best: dict[str, float] = {}
    for repeat in range(scale.calibration_repeats):
        for cell in timed_cells:
            run_dir = out / "calibration" / f"{cell.name}-{repeat}"
            command = train_command([*overrides, *cell.overrides, f"trainer.max_steps={scale.calibration_steps}",
                                     "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "test=false",
                                     "+callbacks.throughput.window=1", "~callbacks.model_checkpoint",
                                     "trainer.log_every_n_steps=1"], run_dir)
            code, _, _ = run_training(command, run_dir / "train.log")
            if code != 0:
                raise SystemExit(f"calibration of C/{cell.name} failed; see {run_dir / 'train.log'}")
            rates = [row["train/tokens_per_sec"] for row in read_metrics(run_dir)
                     if "train/tokens_per_sec" in row]
            timed = sorted(rates[len(rates) // 3:])
            seconds = tokens_per_step / timed[len(timed) // 2]
            best[cell.name] = min(best.get(cell.name, math.inf), seconds)
            print(f"  calibration {cell.name} #{repeat}: {seconds:.3f} s/step", flush=True)
    if reference is not None and reference in best:
        print(f"  calibration drift check: {reference} {best[reference]:.3f} s/step now, {cached[reference]:.3f} "
              f"cached ({best[reference] / cached[reference]:.3f}x)", flush=True)
    merged = {**cached, **{cell.name: best[cell.name] for cell in missing}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(merged, indent=1))
    return merged


# ---- tables and figures -------------------------------------------------------------------------------

NOT_MEASURED = "all targets (80/10/10); masked-only not measured"


def table(setting: Setting, results: list[dict]) -> str:
    """One row per cell. Masked LM: the headline is the validation perplexity on the positions shown as
    <mask>, beside the frequency baseline on the same targets and the reference cell's figure; cells
    that finished before masked-only metrics existed say so. Then the all-target figures."""
    reference = next((r for r in results if r["kind"] == "softmax"), None)
    if setting.name == "D":
        reference = next((r for r in results if r["cell"] == "favor"), reference)
    masked = setting.objective == "mlm"
    nan = math.nan
    head = ("| cell | steps | "
            + ("val ppl masked-only | vs frequencies | vs ref (masked-only) | val acc masked-only | " if masked else
               "val ppl | vs frequencies | ")
            + ("val ppl all targets | vs ref (all targets) | val acc all targets | test ppl all targets | "
               if masked else "vs ref | val acc | test ppl | ")
            + "test acc | tokens/s | peak RSS MB | train min |"
            + (" s/step (calibrated) |" if setting.equal_wall_clock else ""))
    lines = [f"### {setting.name}: {setting.title}", "", head,
             "|" + "|".join(["---"] + ["---:"] * (head.count("|") - 2)) + "|"]

    def ratio(value: float, base: float) -> str:
        return f"{value / base:.3f}" if math.isfinite(value) and math.isfinite(base) else ""

    def number(value: float) -> str:
        return f"{value:.3f}" if math.isfinite(value) else ""

    for r in results:
        all_ratio = ratio(r["val_perplexity"], reference["val_perplexity"] if reference else nan)
        if masked:
            value = r.get("val_perplexity_masked", nan)
            measured = f"{value:.3f}" if math.isfinite(value) else NOT_MEASURED
            headline = (f"{measured} | {ratio(value, r.get('val_baseline_frequency_perplexity_masked', nan))} | "
                        f"{ratio(value, reference.get('val_perplexity_masked', nan) if reference else nan)} | "
                        f"{number(r.get('val_accuracy_masked', nan))} | {r['val_perplexity']:.3f} | {all_ratio} | ")
        else:
            headline = (f"{r['val_perplexity']:.3f} | "
                        f"{ratio(r['val_perplexity'], r.get('val_baseline_frequency_perplexity', nan))} | "
                        f"{all_ratio} | ")
        row = (f"| {r['cell']} | {r['steps']:.0f} | {headline}{r['val_accuracy']:.3f} | "
               f"{r['test_perplexity']:.3f} | {r['test_accuracy']:.3f} | {r['tokens_per_sec']:,.0f} | "
               f"{r['peak_rss_mb']:,.0f} | {r['train_seconds'] / 60:.1f} |")
        if setting.equal_wall_clock:
            row += f" {number(r.get('seconds_per_step', nan))} |"
        lines.append(row)
    return "\n".join(lines)


def member_keys(setting: Setting) -> tuple[str, str]:
    """The first- and later-member perplexity keys of a homolog setting: masked-only (MLM) or all (CLM)."""
    return ("val_perplexity_masked_first", "val_perplexity_masked_later") if setting.objective == "mlm" else (
        "val_perplexity_first", "val_perplexity_later")


def member_table(setting: Setting, results: list[dict]) -> str:
    """What each kind reads from earlier homologs: first against later members of each window.

    later / first is the raw ratio (the issue's measure); the frequency baseline scores the same targets, so
    (later / frequencies) / (first / frequencies) removes the difference in which residues the two sets
    hold. "gain vs softmax" is ln(first / later) of the cell over softmax's: the share of softmax's gain."""
    first_key, later_key = member_keys(setting)
    targets = "masked-only" if setting.objective == "mlm" else "all targets"
    nan = math.nan

    def gain(r: dict) -> float:
        first, later = r.get(first_key, nan), r.get(later_key, nan)
        return math.log(first / later) if math.isfinite(first) and math.isfinite(later) else nan

    reference = next((r for r in results if r["kind"] == "softmax"), None)
    head = (f"| cell | first member ({targets}) | later members | later / first | frequencies: first | "
            "frequencies: later | later / frequencies | later / first over frequencies' | gain vs softmax |")
    lines = [f"First against later members ({setting.name}, validation windows of held-out clusters):", "", head,
             "|---|" + "---:|" * (head.count("|") - 2)]
    for r in results:
        first, later = r.get(first_key, nan), r.get(later_key, nan)
        base_first = r.get(first_key.replace("val_perplexity", "val_baseline_frequency_perplexity"), nan)
        base_later = r.get(later_key.replace("val_perplexity", "val_baseline_frequency_perplexity"), nan)
        share = gain(r) / gain(reference) if reference is not None and gain(reference) > 0 else nan
        cells = [first, later, later / first, base_first, base_later, later / base_later,
                 (later / first) / (base_later / base_first), share]
        lines.append(f"| {r['cell']} | " + " | ".join(f"{v:.3f}" if math.isfinite(v) else "" for v in cells) + " |")
    return "\n".join(lines)


def member_curve_table(setting: Setting, results: list[dict], running: dict[str, dict[str, list[float]]]) -> str:
    """later / first at every validation, a column per cell: when each kind starts to read homologs."""
    first_key, later_key = member_keys(setting)
    by_cell = {name: {int(step): later / first
                      for step, first, later in zip(c["step"], c.get(first_key, []), c.get(later_key, []))}
               for name, c in curve_columns(results, running).items()}
    return step_table(f"Later / first member perplexity at each validation ({setting.name}):", by_cell)


def curve_columns(results: list[dict], running: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """Each cell's curve by column name; cells still training are marked "(running)"."""
    columns = {r["cell"]: r["curve"] for r in results}
    columns.update({f"{name} (running)": c for name, c in running.items()})
    return columns


def step_table(title: str, by_cell: dict[str, dict[int, float]]) -> str:
    """A Markdown table of values by validation step (rows) and cell (columns)."""
    steps = sorted({step for points in by_cell.values() for step in points})
    lines = [title, "", "| step | " + " | ".join(by_cell) + " |", "|---:|" + "---:|" * len(by_cell)]
    for step in steps:
        cells = [f"{points[step]:.3f}" if step in points else "" for points in by_cell.values()]
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(setting: Setting, results: list[dict], running: dict[str, dict[str, list[float]]]) -> str:
    """Validation perplexity at every validation step, a column per cell: the comparison at equal steps.
    `running` holds the curves so far of cells still training (their columns say so)."""
    columns = curve_columns(results, running)
    # Masked-only when every cell logged it (the headline); otherwise all targets, for every cell alike.
    masked = bool(columns) and all("val_perplexity_masked" in c for c in columns.values())
    key = "val_perplexity_masked" if masked else "val_perplexity"
    by_cell = {name: dict(zip((int(step) for step in c["step"]), c[key], strict=True))
               for name, c in columns.items()}
    title = "Validation perplexity, masked-only targets," if masked else "Validation perplexity"
    return step_table(f"{title} at each validation ({setting.name}):", by_cell)


def figure(setting: Setting, results: list[dict], output: Path) -> Path:
    from protein_performer.plot_runs import Run, plot

    masked = bool(results) and all("val_perplexity_masked" in r["curve"] for r in results)  # as curve_table
    targets = "masked-only" if masked else "all targets"
    runs = []
    for r in results:
        c = r["curve"]
        seconds = ([s * r["seconds_per_step"] for s in c["step"]] if setting.equal_wall_clock else c["seconds"])
        runs.append(Run(Path(r["cell"]), f"{setting.name}: {setting.title} (val perplexity, {targets})",
                        [f"{r['cell']}"], [int(s) for s in c["step"]], seconds,
                        c["val_perplexity_masked" if masked else "val_perplexity"]))
    return plot(runs, output)


# ---- main ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    scale: Scale
    fasta: Path
    out: Path
    settings: list[Setting] = field(default_factory=list)
    clusters: Path | None = None  # H, HC: MMseqs2 clusters of the FASTA's records
    report_only: bool = False  # tables and figures from finished cells; train nothing


def run(plan: Plan) -> str:
    cache_dir = plan.out / "cache"
    sections: dict[str, str] = {}  # setting name: its tables and figure
    report = [f"Data: {plan.fasta.name}; model={plan.scale.model}; {plan.scale.tokens_per_batch} tokens per step; "
              f"lr {plan.scale.lr}, warmup {plan.scale.warmup_steps}; seed 0 (S: also seed 1)."]
    finished: dict[tuple[str, str], dict] = {}
    for setting in plan.settings:
        print(f"{setting.name}: {setting.title}", flush=True)
        overrides = base_overrides(setting, plan.scale, plan.fasta, cache_dir, plan.clusters)
        setting_dir = plan.out / setting.name
        # every kind of the setting, not only those asked for: equal wall-clock means timed together
        calibration = (calibrate(settings()[setting.name], plan.scale, overrides, setting_dir)
                       if setting.equal_wall_clock and setting.cells and not plan.report_only else {})
        results = []
        running: dict[str, dict[str, list[float]]] = {}  # report only: curves of cells still training
        for cell in setting.cells:
            if cell.reuse is not None:
                source = plan.out / cell.reuse[0] / cell.reuse[1] / "result.json"
                if source.is_file():
                    results.append({**json.loads(source.read_text()), "setting": cell.setting, "cell": cell.name})
                else:
                    print(f"  {setting.name}/{cell.name}: reference {cell.reuse[0]}/{cell.reuse[1]} not run yet",
                          flush=True)
                continue
            if plan.report_only:
                result_file = setting_dir / cell.name / "result.json"
                if result_file.is_file():
                    results.append(json.loads(result_file.read_text()))
                else:
                    print(f"  {setting.name}/{cell.name}: not finished yet", flush=True)
                    partial = curve(read_metrics(setting_dir / cell.name))
                    if partial["step"]:
                        running[cell.name] = partial
                continue
            extra: dict[str, float] = {}
            steps = setting.steps(plan.scale)
            if setting.equal_wall_clock:
                extra["seconds_per_step"] = calibration[cell.name]
                steps = max(plan.scale.val_every, round(setting.seconds(plan.scale) / calibration[cell.name]))
            cell_overrides = [*overrides, *cell.overrides, f"trainer.max_steps={steps}"]
            results.append(run_cell(cell, cell_overrides, setting_dir / cell.name, extra))
            finished[(setting.name, cell.name)] = results[-1]
        planned = {cell.name for cell in setting.cells}
        for cell in settings()[setting.name].cells:  # cells left out by --kinds that finished before
            result_file = setting_dir / cell.name / "result.json"
            if cell.name not in planned and cell.reuse is None and result_file.is_file():
                results.append(json.loads(result_file.read_text()))
        position = {cell.name: i for i, cell in enumerate(settings()[setting.name].cells)}
        results.sort(key=lambda result: position.get(result["cell"], len(position)))
        if results:
            part = [table(setting, results)]
            if not setting.equal_wall_clock:  # C's cells validate at different steps
                part.append(curve_table(setting, results, running))
            if setting.sampling == "homologs":
                part += [member_table(setting, results), member_curve_table(setting, results, running)]
            png = figure(setting, results, plan.out / f"compare_{setting.name}.png")
            part.append(f"![{setting.name}]({png.name})")
            sections[setting.name] = "\n\n".join(part)
            report.extend(part)
    text = "\n\n".join(report) + "\n"
    results_md = plan.out / "results.md"
    previous = results_md.read_text() if results_md.is_file() else ""
    results_md.write_text(merge_report(previous, report[0], sections))
    return text


def merge_report(previous: str, header: str, sections: dict[str, str]) -> str:
    """results.md with `sections` (setting name: text starting "### <name>:") replacing those settings'
    sections of `previous` and the other settings' sections kept, so a run of some settings (or cells)
    does not drop the rest; sections in the order of `settings()`."""
    kept: dict[str, str] = {}
    for chunk in re.split(r"^(?=### [A-Z]+: )", previous, flags=re.MULTILINE)[1:]:
        kept[chunk.split(":", 1)[0].removeprefix("### ")] = chunk.strip()
    kept.update(sections)
    order = [name for name in settings() if name in kept] + sorted(set(kept) - set(settings()))
    return "\n\n".join([header, *(kept[name] for name in order)]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fasta", type=Path, default=None,
                        help="proteins to train and evaluate on (default: the bundled Swiss-Prot subset; "
                             "with --quick the bundled 500-protein sample)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compare")
    parser.add_argument("--settings", nargs="+", default=["A", "B", "C", "D"], choices=list(settings()))
    parser.add_argument("--clusters", type=Path, default=None,
                        help="H, HC, HW: MMseqs2 cluster TSV of the FASTA's records (default with the bundled subset: "
                             "its bundled 50%% clusters)")
    parser.add_argument("--kinds", nargs="+", default=None,
                        help="keep only these cells (kind or ablation names, e.g. softmax favor no_redraw)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, a few steps, short crops: checks the whole pipeline in minutes")
    parser.add_argument("--steps", type=int, default=None,
                        help="A/B/D/S optimizer steps (L, F: 4x this; default: the scale's)")
    parser.add_argument("--concat-seconds", type=float, default=None, help="C, G: training seconds per kind (HW: 4x this)")
    parser.add_argument("--report", action="store_true",
                        help="only print the tables and draw the figures of the cells finished so far")
    args = parser.parse_args(argv)

    scale = QUICK if args.quick else FULL
    if args.steps is not None:
        scale = dataclasses.replace(scale, steps=args.steps)
    if args.concat_seconds is not None:
        scale = dataclasses.replace(scale, concat_seconds=args.concat_seconds)
    args.fasta = args.fasta or (SAMPLE if args.quick else BUNDLED)
    if not args.fasta.is_file():
        parser.error(f"--fasta {args.fasta}: no such file")
    chosen = []
    for name in args.settings:
        setting = settings()[name]
        cells = tuple(c for c in setting.cells if args.kinds is None or c.name in args.kinds)
        chosen.append(dataclasses.replace(setting, cells=cells))
    if args.clusters is None and args.fasta.resolve() == BUNDLED.resolve():
        args.clusters = BUNDLED_CLUSTERS
    if args.clusters is not None and not args.clusters.is_file():
        parser.error(f"--clusters {args.clusters}: no such file")
    plan = Plan(scale, args.fasta.resolve(), args.out.resolve(), chosen, report_only=args.report,
                clusters=args.clusters.resolve() if args.clusters else None)
    plan.out.mkdir(parents=True, exist_ok=True)
    print(run(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
