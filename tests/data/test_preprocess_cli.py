"""`python -m protein_performer.preprocess`: a store and a summary, or one clear line and exit status 2."""
from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import pytest

from protein_performer.data import TokenStore


def preprocess(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protein_performer.preprocess", *overrides,
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_preprocess_writes_a_store_and_prints_its_summary(sample_fasta, tmp_path):
    result = preprocess(tmp_path, f"input={sample_fasta}", "output=sample.h5", "ood_regex='OS=Homo sapiens'")
    assert result.returncode == 0, result.stderr
    assert "records                 500" in result.stdout and "ood                     8 records" in result.stdout
    assert "rec/s" in result.stderr and "B/s" in result.stderr  # the progress bar: records/s and MB/s
    with TokenStore(tmp_path / "sample.h5") as store:
        assert len(store) == 500 and store.split_sizes["ood"] == 8


BAD = {
    "empty": (b"", r"empty\.fasta: empty file"),
    "text-before-header": (b"id\tsequence\nP1\tMKV\n", r"text-before-header\.fasta:1: text before the first '>'"),
    "binary": (bytes(range(256)), r"binary\.fasta:1: binary data"),
    "truncated-gzip": (None, r"truncated-gzip\.fasta:\d+: the gzip stream is truncated"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_no_output(case, sample_fasta, tmp_path):
    content, message = BAD[case]
    if content is None:
        compressed = gzip.compress(sample_fasta.read_bytes() * 3)
        content = compressed[:len(compressed) * 2 // 3]
    (tmp_path / f"{case}.fasta").write_bytes(content)
    result = preprocess(tmp_path, f"input={case}.fasta", "output=out.h5")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("preprocess: error: ")]
    assert len(error_lines) == 1
    assert re.search(message, error_lines[0]), error_lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{case}.fasta", "run"])  # no output, no temporary file


def test_missing_arguments_are_explained_without_a_traceback(tmp_path):
    result = preprocess(tmp_path, "input=proteins.fasta")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "preprocess: error: output must be given: python -m protein_performer.preprocess input=" in result.stderr
