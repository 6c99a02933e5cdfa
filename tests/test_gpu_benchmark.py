"""benchmarks/gpu.py: refuses cleanly without a GPU; its tables run (on the CPU, to check the script)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_cleanly_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])
    assert _load().main() == 2
    out, err = capsys.readouterr()
    assert out == "" and "no CUDA GPU here" in err and len(err.strip().splitlines()) == 1


def test_tables_run_end_to_end_on_the_cpu(capsys):
    module = _load()
    precision = torch.get_float32_matmul_precision()
    try:
        module.attention_table([64], repeats=1, device="cpu")
        module.training_table([64], repeats=1, model="tiny", device="cpu")
    finally:
        torch.set_float32_matmul_precision(precision)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isalnum()]
    attention = [row for row in rows if row.startswith(("| bf16", "| tf32"))]
    training = [row for row in rows if row.startswith("| 64 ")]
    assert len(attention) == 4 and len(training) == 1  # bf16/tf32 x bidirectional/causal; one length
    assert all(row.count("x |") == 1 for row in attention + training)  # a ratio in every row
