"""benchmarks/fidelity.py on a small checkpoint: every table, variants the config lacks skipped by name."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from protein_performer.data import Alphabet
from protein_performer.model import PerformerConfig, ProteinPerformer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import fidelity  # noqa: E402


def write_checkpoint(path: Path, attention: str) -> Path:
    alphabet = Alphabet()
    config = PerformerConfig(vocab_size=len(alphabet), d_model=32, n_layers=2, n_heads=2, d_ff=64,
                             attention=attention, nb_features=32, pad_idx=alphabet.pad_idx)
    model = ProteinPerformer(config)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_config": config.to_dict(), "alphabet_tokens": alphabet.tokens}}, path)
    return path


@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_report_has_every_table(attention, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", attention)
    output = tmp_path / "report.md"
    fidelity.main([str(checkpoint), str(REPO / "data" / "uniprot_sample.fasta"), "--split", "all", "--proteins", "6",
                   "--max-length", "40", "--features", "16", "32", "--draws", "1", "--output", str(output)])
    report = output.read_text()
    assert report == capsys.readouterr().out
    assert "## By layer and head" in report and "## Unmasked vs MLM-masked" in report
    assert "## Cost of the validation logging" in report
    assert report.count("\n| 1 | 1 |") == 1  # layer 1, head 1 of the per-head table
    if attention == "favor":
        assert "| 16 |" in report and "| 32 | " in report
        assert "plain (the checkpoint's settings)" in report
        for name, _ in fidelity.VARIANTS[1:]:  # measured, or skipped with a note (keys this version lacks)
            assert (f"| {name} |" in report) != (f"skipped {name}:" in report), name
    else:  # exact attention: no features to vary
        assert "## By number of features" not in report
