"""benchmarks/gpu.py: refuses cleanly without a GPU; its helpers and tables run (on the CPU, to check the
script: its figures mean something only on a GPU)."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and line[2].isalnum()]


def test_refuses_cleanly_without_a_gpu(gpu, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])
    assert gpu.main() == 2
    out, err = capsys.readouterr()
    assert out == "" and "no CUDA GPU here" in err and len(err.strip().splitlines()) == 1


def test_sdpa_backend_is_the_first_that_takes_the_call(gpu):
    q = k = v = torch.randn(1, 2, 8, 4)
    run = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    assert gpu.sdpa_backend(run, ("EFFICIENT_ATTENTION", "MATH")) == "MATH"  # no memory-efficient kernel on a CPU
    assert gpu.sdpa_backend(run) in gpu.SDPA_BACKENDS

    def refused():
        raise RuntimeError("No available kernel")

    assert gpu.sdpa_backend(refused) is None
    with pytest.raises(RuntimeError):  # forced means forced: no silent fallback to another kernel
        gpu.forced(run, "EFFICIENT_ATTENTION")()


def test_padded_batches_are_right_padded_token_budget_batches(gpu):
    assert gpu.batch_rows(32768, 1024) == 32 and gpu.batch_rows(32768, 65536) == 1
    mask = gpu.right_padding(16, 100)
    lengths = (~mask).sum(1)
    assert not mask[0].any() and lengths.min() >= 50 and mask.any()
    assert torch.equal(mask, torch.arange(100)[None, :] >= lengths[:, None])  # padding only after the tokens


def test_subprocesses_are_killed_at_their_timeout(gpu, tmp_path):
    status, line, seconds = gpu.run_with_timeout([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, 1)
    assert status is None and "killed" in line and seconds < 30
    status, _, _ = gpu.run_with_timeout([sys.executable, "-c", "print('perplexity 3')"], tmp_path, 60)
    assert status == 0


def test_tables_run_end_to_end_on_the_cpu(gpu, capsys):
    precision = torch.get_float32_matmul_precision()
    try:
        gpu.attention_table([64], repeats=1, tokens=128, device="cpu")
        gpu.training_table([64], repeats=1, model="tiny", tokens=128, device="cpu", kinds=("softmax", "favor_rpe"))
    finally:
        torch.set_float32_matmul_precision(precision)
    rows = _rows(capsys.readouterr().out)
    attention = [row for row in rows if row.startswith(("| bf16", "| tf32"))]
    training = [row for row in rows if row.startswith(("| mlm", "| clm"))]
    assert len(attention) == 8  # bf16/tf32 x bidirectional/causal x unpadded/padded; one length
    assert len(training) == 8  # mlm/clm x unpadded/padded x two kinds
    ratios = re.compile(r"\d\.\d\dx \|")
    assert all(len(ratios.findall(row)) == 2 for row in attention)  # FAVOR+ and favor_rpe against SDPA
    assert all(len(ratios.findall(row)) == 2 for row in training)  # Lightning against bare, kind against softmax
    assert all("OOM" not in row and "nan" not in row for row in attention + training)
    assert all(row.split(" | ")[4] in {name.lower() for name in gpu.SDPA_BACKENDS} for row in attention)
