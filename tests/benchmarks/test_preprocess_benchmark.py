"""benchmarks/preprocess.py at a tiny size: every input's rows, the stage table and the memory table print."""
from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import preprocess  # noqa: E402


def test_every_input_gets_its_rows_and_stages(tmp_path):
    source = tmp_path / "sample.fasta.gz"
    with open(REPO / "data" / "uniprot_sample.fasta", "rb") as read, gzip.open(source, "wb") as write:
        shutil.copyfileobj(read, write)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "preprocess.py"), "--fasta", str(source),
                             "--megabytes", "0.5", "--repeats", "1", "--memory-sizes", "0.3", "--seconds", "0"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for label in ("one-line, plain", "one-line, gz", "wrapped-60, plain", "wrapped-60, gz", "as given, plain",
                  "as given, gz"):
        rows = [line for line in lines if line.startswith(f"| {label} |")]
        methods = [row.split(" | ")[1] for row in rows]
        # four throughput rows (the baseline at 1.00x first) and one stage row per input
        assert methods[:4] == ["Bio.SeqIO.parse, iterate only (baseline)", "store, 1 worker", "store, 2 workers",
                               "store, 2 workers, scaleoffset"], (label, methods)
        assert rows[0].endswith("| 1.00x |") and all(float(row.split(" | ")[3].rstrip("x |")) > 0 for row in rows[:4])
        assert len(rows) == 5
    assert any(line.startswith("| 0 |") or line.startswith("| 0.3 |") for line in lines)  # the memory row


def test_each_timed_run_starts_after_its_untimed_preparation():
    calls = []
    preprocess.best_seconds(lambda: calls.append("work"), 3, before=lambda: calls.append("before"))
    assert calls == ["before", "work"] * 3
