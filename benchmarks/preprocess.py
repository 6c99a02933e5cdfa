"""Preprocessing and loading throughput, as ratios measured in one run (other processes share the cores).

    python benchmarks/preprocess.py [--fasta real.fasta[.gz]] [--megabytes 200] [--repeats 2]

1. FASTA -> token store, MB/s of (uncompressed) input, against Biopython merely iterating the same
   file (`SeqIO.parse`, a SeqRecord per protein; through `gzip.open` for .gz). The input is --fasta
   (real proteins, e.g. a UniProt download) or the bundled UniProt sample, repeated to the size asked
   if it is smaller, once with one line per sequence and once wrapped at 60 columns as UniProt
   distributes it, each as a plain file and gzipped (-6, as UniProt's .fasta.gz downloads); before them
   --fasta itself, as given (its own layout, no repeated records), plain and, if it is one, as its .gz. Rows:
   builds with 1 and 2 worker processes (default compression: none), and 2 with scaleoffset, the former default.
   Each timed build writes a new store, as a first build does: the previous run's store is deleted before
   the clock starts (replacing a store also pays for deleting the old file, 20 ms per 40 MB here).
2. CPU seconds per stage of a build, measured one stage at a time in this process, and of a whole build
   with 2 workers split into the parent (serial: inflating gzip, writing, taking results back) and the
   workers (parallel: reading plain files, parsing, encoding). From those, a load-independent estimate:
   the wall time on N free cores with the default W = min(N, 8) workers is about
   max(parent, workers / W, total / N) (the parent mostly waits, so W workers share the N cores), and its ratio to
   SeqIO's CPU time on one core.
3. Peak memory (VmHWM of the build's process, largest worker's maxrss) at a few input sizes: streaming
   means it does not grow with the input.
4. Loading: token store -> masked batches on one core (main process, no workers), tokens/s, and the
   store's size, for the default (none) and scaleoffset.
Each timing is the best of --repeats (the least disturbed by other processes); the load average is
printed beside each table, since on a shared machine wall-clock ratios move with it.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from Bio import SeqIO
from Bio.SeqIO.FastaIO import SimpleFastaParser

from protein_performer.data import Alphabet, ProteinBatches, SplitSpec, build_token_store
from protein_performer.data.dataset import BatchSpec
from protein_performer.data.fasta_chunks import chunk_of_block, record_blocks
from protein_performer.data.splits import SplitAssigner
from protein_performer.data.store import StoreSummary
from protein_performer.data.store_writer import _ChunkEncoder, _write_store
from protein_performer.data.workers import _MAX_DEFAULT_WORKERS as default_cap

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "uniprot_sample.fasta"
SCALEOFFSET = {"scaleoffset": 0}  # HDF5 options of compression="scaleoffset" (as build_token_store sets them)


def make_input(path: Path, source: Path, megabytes: float, width: int | None) -> Path:
    """`source`'s records (held in memory: a file of up to a few hundred MB), repeated up to `megabytes`
    if needed, sequences on one line or wrapped at `width`."""
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt") as handle:
        records = list(SimpleFastaParser(handle))
    with open(path, "w") as out:
        written = 0
        while written < megabytes * 1e6:
            for title, sequence in records:
                lines = [sequence] if width is None else [sequence[i:i + width] for i in range(0, len(sequence), width)]
                text = ">" + title + "\n" + "\n".join(lines) + "\n"
                out.write(text)
                written += len(text)
                if written >= megabytes * 1e6:
                    break
    return path


def header(*names: str) -> None:
    """A Markdown table header (rows follow as they are measured)."""
    print("| " + " | ".join(names) + " |")
    print("|" + "|".join("---" for _ in names) + "|")


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def best_seconds(work: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> float:
    """The fastest of `repeats` runs of `work`, each after `before` (not timed)."""
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def seqio_iterate(path: Path) -> int:
    """The baseline: Biopython's SeqIO.parse over the file (through gzip.open for .gz), a SeqRecord each."""
    handle = gzip.open(path, "rt") if path.suffix == ".gz" else open(path)
    with handle:
        return sum(1 for _ in SeqIO.parse(handle, "fasta"))


def build(path: Path, output: Path, **options: object) -> None:
    # A repeated input repeats its accessions: allowed here, refused by default (they share one split).
    build_token_store(path, output, overwrite=True, progress=False, allow_duplicates=True, **options)


def inputs(directory: Path, source: Path, megabytes: float):
    """(label, path, uncompressed MB) of each benchmark input, made on the way and removed after use:
    `source` as given (real records, no repeats; first, while this process is as small as a fresh
    `preprocess` command: a worker forked from a large process pays for copying its pages), plain and
    gzipped, then the repeated layouts."""
    given = directory / "as-given.fasta"
    with (gzip.open(source, "rb") if source.suffix == ".gz" else open(source, "rb")) as read, open(given, "wb") as write:
        shutil.copyfileobj(read, write, 1 << 20)
    size = given.stat().st_size / 1e6
    yield "as given, plain", given, size
    given.unlink()
    if source.suffix == ".gz":
        yield "as given, gz", source, size
    for layout, width in (("one-line", None), ("wrapped-60", 60)):
        plain = make_input(directory / f"{layout}.fasta", source, megabytes, width)
        size = plain.stat().st_size / 1e6
        compressed = directory / f"{layout}.fasta.gz"
        with open(plain, "rb") as read, gzip.open(compressed, "wb", compresslevel=6) as write:
            shutil.copyfileobj(read, write, 1 << 20)  # gzip -6, as UniProt's downloads are made
        yield f"{layout}, plain", plain, size
        yield f"{layout}, gz", compressed, size
        plain.unlink()
        compressed.unlink()


def preprocessing_table(directory: Path, source: Path, megabytes: float, repeats: int) -> list[tuple]:
    print(f"\n1. preprocessing {megabytes:.0f} MB of FASTA from {source.name} (best of {repeats}; MB/s of "
          f"uncompressed input; ratio to SeqIO.parse on the same file; {load()} at the start)")
    header("input", "method", "MB/s", "vs SeqIO")
    output = directory / "store.h5"
    fresh = lambda: output.unlink(missing_ok=True)  # noqa: E731; each timed build writes a new store
    stages = []
    for label, path, size in inputs(directory, source, megabytes):
        cases: list[tuple[str, Callable[[], object]]] = [
            ("Bio.SeqIO.parse, iterate only (baseline)", lambda p=path: seqio_iterate(p)),
            ("store, 1 worker", lambda p=path: build(p, output, workers=1)),
            ("store, 2 workers", lambda p=path: build(p, output, workers=2)),
            ("store, 2 workers, scaleoffset", lambda p=path: build(p, output, workers=2, compression="scaleoffset")),
        ]
        baseline = None
        for name, work in cases:
            rate = size / best_seconds(work, repeats, before=fresh)
            baseline = baseline or rate
            row(label, name, f"{rate:.1f}", f"{rate / baseline:.2f}x")
        stages.append((label, size, stage_seconds(path, directory / "stages.h5")))
    output.unlink(missing_ok=True)
    print(f"({load()} at the end)")
    return stages


def stage_seconds(path: Path, output: Path) -> dict[str, float]:
    """CPU seconds of SeqIO, and of each stage of a default build, one stage at a time in this process."""
    clock = time.process_time
    start = clock()
    seqio_iterate(path)
    seconds = {"SeqIO": clock() - start}
    start = clock()
    blocks = [(block, offset, position) for block, offset, position, _ in record_blocks(path)]
    seconds["read+inflate"] = clock() - start
    start = clock()
    chunks = [chunk_of_block(path, *block) for block in blocks]
    seconds["parse"] = clock() - start
    encode = _ChunkEncoder(Alphabet(), SplitAssigner(SplitSpec()))
    start = clock()
    encoded = [encode(chunk) for chunk in chunks]
    seconds["encode"] = clock() - start
    del chunks, encoded
    # What a worker does with a block: both at once, the sequences translated as they are cut out
    # (the general path above is what a block with stops, gaps or whitespace in its sequences takes).
    start = clock()
    encoded = [encode((path, *block)) for block in blocks]
    seconds["parse+encode"] = clock() - start
    del blocks
    start = clock()
    _write_store(output, iter(encoded), len(Alphabet()), StoreSummary(), {}, 0, False)
    seconds["write"] = clock() - start
    start = clock()
    _write_store(output, iter(encoded), len(Alphabet()), StoreSummary(), SCALEOFFSET, 0, False)
    seconds["write, scaleoffset"] = clock() - start
    del encoded
    # A whole build with 2 workers: what the parent and the workers spend, hand-over between them included.
    start, children = clock(), _children_cpu()
    build(path, output, workers=2)
    seconds["parent"], seconds["workers"] = clock() - start, _children_cpu() - children
    output.unlink()
    return seconds


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage_table(stages: list[tuple], cores: tuple[int, ...] = (2, 16)) -> None:
    print("\n2. CPU seconds per 100 MB of uncompressed input: SeqIO; each stage of a build alone; then a whole build\n"
          "   with 2 workers, split into the parent (inflating gzip, writing) and the workers (reading plain files,\n"
          "   parsing, encoding). On N free cores a build (default: W = min(N, 8) workers) takes about\n"
          "   max(parent, workers / W, total / N).\n"
          "   parse, encode: one after the other (the general path); parse+encode: both at once, as a worker does\n"
          "   with a block whose sequences hold no stops, gaps or whitespace.\n"
          "   write: the default (no compression); the scaleoffset column is not part of the build")
    names = ["SeqIO", "read+inflate", "parse", "encode", "parse+encode", "write", "write, scaleoffset", "parent",
             "workers"]
    header("input", *names, *(f"{n} cores: MB/s, vs SeqIO" for n in cores))
    for label, size, seconds in stages:
        per = {name: seconds[name] * 100 / size for name in names}
        estimates = []
        for n in cores:
            wall = max(per["parent"], per["workers"] / min(n, default_cap), (per["parent"] + per["workers"]) / n)
            estimates.append(f"{100 / wall:.0f}, {per['SeqIO'] / wall:.2f}x")
        row(label, *(f"{per[name]:.2f}" for name in names), *estimates)


# VmHWM is the peak resident set of this program's own address space: unlike ru_maxrss it starts
# afresh at exec, so the benchmark's own (torch-sized) memory does not leak into the number.
MEMORY_PROBE = """
import json, resource, sys
from protein_performer.data import build_token_store
import logging; logging.getLogger("protein_performer").setLevel(logging.ERROR)
build_token_store(sys.argv[1], sys.argv[2], overwrite=True, progress=False, allow_duplicates=True, workers=2)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"process": int(status["VmHWM"].split()[0]),
                  "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def memory_table(directory: Path, source: Path, sizes: list[float]) -> None:
    print(f"\n3. peak memory of preprocessing with 2 workers (resident set, MB): flat in the input size ({load()})")
    header("input MB", "process", "largest worker")
    for megabytes in sizes:
        path = make_input(directory / "memory.fasta", source, megabytes, 60)
        result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(directory / "memory.h5")],
                                capture_output=True, text=True, check=True)
        peak = json.loads(result.stdout.strip().splitlines()[-1])
        row(f"{path.stat().st_size / 1e6:.0f}", f"{peak['process'] / 1024:.0f}", f"{peak['workers'] / 1024:.0f}")
        path.unlink()
        (directory / "memory.h5").unlink()


def loading_table(directory: Path, source: Path, megabytes: float, seconds: float) -> None:
    path = make_input(directory / "loading.fasta", source, megabytes, None)
    stores = {}
    for compression in ("none", "scaleoffset"):
        stores[compression] = directory / f"loading-{compression}.h5"
        build(path, stores[compression], compression=compression)
    size = path.stat().st_size
    path.unlink()
    print(f"\n4. loading from the token store on one core (MLM batches, ~{seconds:.0f} s each; store size as a share "
          "of the one-line FASTA)")
    header("compression", "store size", "sampling", "tokens/s", "of which residues", "vs 2M/s")
    for (compression, store), (label, spec) in itertools.product(stores.items(), [
        ("single, crop 1024, 16k tokens/batch", BatchSpec(sampling="single", max_length=1024, tokens_per_batch=16384)),
        ("concat, windows of 8192, 4/batch", BatchSpec(sampling="concat", max_length=8192, batch_size=4)),
    ]):
        dataset = ProteinBatches(store, "train", spec, train=True)
        tokens = real = 0
        start = time.perf_counter()
        for batch in dataset:
            tokens += batch["input_ids"].numel()
            padding = batch["padding_mask"]
            real += batch["input_ids"].numel() if padding is None else int((~padding).sum())
            if time.perf_counter() - start > seconds:
                break
        elapsed = time.perf_counter() - start
        row(compression, f"{store.stat().st_size / size:.2f}", label, f"{tokens / elapsed:,.0f}",
            f"{real / elapsed:,.0f}", f"{tokens / elapsed / 2e6:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fasta", type=Path, default=SAMPLE, help="real FASTA (.gz too) to build the inputs from")
    parser.add_argument("--megabytes", type=float, default=200, help="input size for the throughput rows")
    parser.add_argument("--memory-sizes", type=float, nargs="+", default=None,
                        help="input sizes (MB) of the memory table (default: a quarter of --megabytes and all of it)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5, help="loading time per row")
    args = parser.parse_args()
    logging.getLogger("protein_performer").setLevel(logging.ERROR)  # repeated inputs repeat accessions: kept
    print(f"protein_performer preprocessing benchmark: {os.cpu_count()} cores, {load()} at the start")
    with tempfile.TemporaryDirectory(prefix="pp-bench-") as temporary:
        directory = Path(temporary)
        stage_table(preprocessing_table(directory, args.fasta, args.megabytes, args.repeats))
        memory_table(directory, args.fasta, args.memory_sizes or [args.megabytes / 4, args.megabytes])
        if args.seconds > 0:
            loading_table(directory, args.fasta, args.megabytes / 4, args.seconds)
    print(f"\n{load()} at the end")


if __name__ == "__main__":
    main()
