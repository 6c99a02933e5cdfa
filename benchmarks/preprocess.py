"""Preprocessing and loading throughput, as ratios measured in one run (other processes share the cores).

    python benchmarks/preprocess.py [--megabytes 200] [--repeats 2]

1. FASTA -> token store, MB/s of (uncompressed) input, against Biopython merely iterating the same
   file (`SeqIO.parse`, a SeqRecord per protein; through `gzip.open` for .gz). The input is the
   bundled UniProt sample repeated to the size asked, once as in the sample (one line per sequence)
   and once wrapped at 60 columns as UniProt distributes it, each as a plain file and gzipped (-6,
   as UniProt's .fasta.gz downloads). Rows: the store's own parser and its Biopython reference
   merely iterating, then whole builds with each store compression. Then the CPU seconds of the
   default build by process (a load-independent view of what bounds it on 2 cores).
2. Peak memory (RSS of the process and of its FASTA reader child) for two input sizes: streaming
   means it does not grow with the input.
3. Loading: token store -> masked batches on one core (main process, no workers), tokens/s.
Each timing is the best of --repeats (the least disturbed by other processes).
"""
from __future__ import annotations

import argparse
import gzip
import json
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

from protein_performer.data import ProteinBatches, build_token_store
from protein_performer.data.dataset import BatchSpec
from protein_performer.data.fasta_chunks import read_fasta_chunks, read_fasta_chunks_reference

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "uniprot_sample.fasta"


def make_input(path: Path, megabytes: float, width: int | None) -> Path:
    """The sample's records repeated to `megabytes`, sequences on one line or wrapped at `width`."""
    records = list(SimpleFastaParser(SAMPLE.open()))
    with open(path, "w") as out:
        written = 0
        while written < megabytes * 1e6:
            for title, sequence in records:
                lines = [sequence] if width is None else [sequence[i:i + width] for i in range(0, len(sequence), width)]
                text = ">" + title + "\n" + "\n".join(lines) + "\n"
                out.write(text)
                written += len(text)
    return path


def header(*names: str) -> None:
    """A Markdown table header (rows follow as they are measured)."""
    print("| " + " | ".join(names) + " |")
    print("|" + "|".join("---" for _ in names) + "|")


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def seqio_iterate(path: Path) -> int:
    """The baseline: Biopython's SeqIO.parse over the file (through gzip.open for .gz), a SeqRecord each."""
    handle = gzip.open(path, "rt") if path.suffix == ".gz" else open(path)
    with handle:
        return sum(1 for _ in SeqIO.parse(handle, "fasta"))


def preprocessing_table(directory: Path, megabytes: float, repeats: int) -> None:
    print(f"\n1. preprocessing {megabytes:.0f} MB of FASTA (best of {repeats}; MB/s of uncompressed input; "
          "ratio to SeqIO.parse on the same file)")
    header("input", "method", "MB/s", "vs SeqIO")
    output = directory / "store.h5"
    cpu_rows = []
    for layout, width in (("one-line", None), ("wrapped-60", 60)):
        plain = make_input(directory / f"{layout}.fasta", megabytes, width)
        size = plain.stat().st_size / 1e6
        compressed = directory / f"{layout}.fasta.gz"
        with open(plain, "rb") as source, gzip.open(compressed, "wb", compresslevel=6) as target:
            shutil.copyfileobj(source, target, 1 << 20)  # gzip -6, as UniProt's downloads are made
        for path, kind in ((plain, "plain"), (compressed, "gz")):
            label = f"{layout}, {kind}"
            cases: list[tuple[str, Callable[[], object]]] = [
                ("Bio.SeqIO.parse, iterate only (baseline)", lambda p=path: seqio_iterate(p)),
                ("read_fasta_chunks (the store's parser), iterate only",
                 lambda p=path: sum(1 for _ in read_fasta_chunks(p))),
                ("read_fasta_chunks_reference (SimpleFastaParser), iterate only",
                 lambda p=path: sum(1 for _ in read_fasta_chunks_reference(p))),
            ]
            for name, options in [
                ("store, default (scaleoffset), reader process", {}),
                ("store, gzip (Huffman deflate), reader process", dict(compression="gzip")),
                ("store, no compression, reader process", dict(compression="none")),
                ("store, default, one process", dict(background_reader=False)),
            ]:
                cases.append((name, lambda o=options, p=path: build_token_store(p, output, overwrite=True,
                                                                                   progress=False, **o)))
            baseline = None
            for name, work in cases:
                rate = size / best_seconds(work, repeats)
                baseline = baseline or rate
                row(label, name, f"{rate:.1f}", f"{rate / baseline:.2f}x")
            cpu_rows.append((label, size, cpu_budget(path, output)))
        plain.unlink()
        compressed.unlink()
    output.unlink(missing_ok=True)
    print("\nCPU seconds of the default pipeline by who spends them (the reader process parses, and gunzips in"
          "\na thread of its own; this process encodes and writes): on 2 cores the wall time is at least half the"
          "\nsum; with a core free for each, it is the largest share:")
    header("input", "SeqIO", "reader", "encode+write", "total", "MB/s if cores free", "vs SeqIO")
    for label, size, (seqio, reader, main) in cpu_rows:
        bound = max(reader, main)
        row(label, f"{seqio:.2f}", f"{reader:.2f}", f"{main:.2f}", f"{reader + main:.2f}", f"{size / bound:.1f}",
            f"{seqio / bound:.2f}x")


def cpu_budget(path: Path, output: Path) -> tuple[float, float, float]:
    """CPU seconds: SeqIO iterating; then, for one default build, the FASTA reader process and this
    process (all its threads)."""
    start = time.process_time()
    seqio_iterate(path)
    seqio = time.process_time() - start
    process, children = time.process_time(), _children_cpu()
    build_token_store(path, output, overwrite=True, progress=False)
    return seqio, _children_cpu() - children, time.process_time() - process


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# VmHWM is the peak resident set of this program's own address space: unlike ru_maxrss it starts
# afresh at exec, so the benchmark's own (torch-sized) memory does not leak into the number.
MEMORY_PROBE = """
import json, resource, sys
from protein_performer.data import build_token_store
build_token_store(sys.argv[1], sys.argv[2], overwrite=True, progress=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"process": int(status["VmHWM"].split()[0]),
                  "reader": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def memory_table(directory: Path, sizes: list[float]) -> None:
    print("\n2. peak memory of preprocessing (resident set, MB): flat in the input size")
    header("input MB", "process", "reader")
    for megabytes in sizes:
        path = make_input(directory / "memory.fasta", megabytes, 60)
        result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(directory / "memory.h5")],
                                capture_output=True, text=True, check=True)
        peak = json.loads(result.stdout.strip().splitlines()[-1])
        row(f"{path.stat().st_size / 1e6:.0f}", f"{peak['process'] / 1024:.0f}", f"{peak['reader'] / 1024:.0f}")
        path.unlink()
        (directory / "memory.h5").unlink()


def loading_table(directory: Path, megabytes: float, seconds: float) -> None:
    path = make_input(directory / "loading.fasta", megabytes, None)
    store = directory / "loading.h5"
    build_token_store(path, store, overwrite=True, progress=False)
    path.unlink()
    print(f"\n3. loading from the token store on one core (MLM batches, ~{seconds:.0f} s each)")
    header("sampling", "tokens/s", "of which residues", "vs 2M/s")
    for label, spec in [
        ("single, crop 1024, 16k tokens/batch", BatchSpec(sampling="single", max_length=1024, tokens_per_batch=16384)),
        ("concat, windows of 8192, 4/batch", BatchSpec(sampling="concat", max_length=8192, batch_size=4)),
    ]:
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
        row(label, f"{tokens / elapsed:,.0f}", f"{real / elapsed:,.0f}", f"{tokens / elapsed / 2e6:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=200, help="input size for the throughput rows")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5, help="loading time per row")
    args = parser.parse_args()
    print(f"protein_performer preprocessing benchmark: {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory(prefix="pp-bench-") as temporary:
        directory = Path(temporary)
        preprocessing_table(directory, args.megabytes, args.repeats)
        memory_table(directory, [args.megabytes / 4, args.megabytes])
        loading_table(directory, args.megabytes / 4, args.seconds)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
