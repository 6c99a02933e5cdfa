"""Linear probes: the window probe against an explicit one-hot window, fitting, and the FLIP experiment."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protein_performer.embedding.probe import (
    SPLITS,
    STATES,
    WindowPlusLinear,
    WindowProbe,
    evaluate,
    probe_secondary_structure,
    secondary_structure,
    window_tokens,
)

from .helpers import tiny_model


def test_window_tokens_are_the_neighbourhood_padded_beyond_the_ends():
    windows = window_tokens(np.array([5, 6, 7]), half_window=1, pad=9)
    assert windows.tolist() == [[9, 5, 6], [5, 6, 7], [6, 7, 9]]


@pytest.mark.parametrize("half_window", [0, 2, 7], ids=lambda h: f"h{h}")
def test_window_probe_is_a_linear_map_of_the_explicit_one_hot_window(half_window):
    """The embedding-bag form (fast, never materialises [n, width * vocab]) against its reference."""
    generator = torch.Generator().manual_seed(0)
    width, vocab, n = 2 * half_window + 1, 26, 50
    windows = torch.randint(0, vocab, (n, width), generator=generator)
    features = torch.randn(n, 8, generator=generator)
    probe = WindowPlusLinear(width, vocab, 8)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    one_hot = F.one_hot(windows, vocab).float().reshape(n, width * vocab)  # [n, width * vocab]
    weight = probe.window.weights.weight  # [width * vocab, classes]: row offset * vocab + token
    expected = one_hot @ weight + probe.window.bias + features @ probe.linear.weight.T
    torch.testing.assert_close(probe(windows, features), expected)
    target = torch.randint(0, len(STATES), (n,), generator=generator)
    grad = torch.autograd.grad(F.cross_entropy(probe(windows, features), target), weight)[0]
    reference = torch.autograd.grad(F.cross_entropy(one_hot @ weight + probe.window.bias
                                                    + features @ probe.linear.weight.T, target), weight)[0]
    torch.testing.assert_close(grad, reference)


def test_evaluate_reads_an_informative_feature_and_not_noise():
    generator = torch.Generator().manual_seed(1)
    y = {s: torch.randint(0, 3, (600,), generator=generator) for s in SPLITS}
    informative = {s: F.one_hot(y[s], 3).float() + 0.3 * torch.randn(600, 3, generator=generator) for s in SPLITS}
    noise = {s: torch.randn(600, 3, generator=generator) for s in SPLITS}
    good = evaluate(lambda: torch.nn.Linear(3, 3), informative, y, weight_decays=[1e-4, 1e-2], steps=50)
    bad = evaluate(lambda: torch.nn.Linear(3, 3), noise, y, weight_decays=[1e-4, 1e-2], steps=50)
    assert good.test_accuracy > 0.95 and good.weight_decay in (1e-4, 1e-2)
    assert bad.test_accuracy < 0.45  # chance is 1/3
    # A tuple of inputs (window and features) goes through the same fit, split by split.
    windows = {s: torch.randint(0, 4, (600, 3), generator=generator) for s in SPLITS}
    both = evaluate(lambda: WindowPlusLinear(3, 4, 3), {s: (windows[s], informative[s]) for s in SPLITS}, y,
                    weight_decays=[1e-4], steps=50)
    assert both.test_accuracy > 0.95


def test_bundled_flip_split_reads_whole(data_dir):
    chains = secondary_structure(data_dir)
    assert {s: len(c) for s, c in chains.items()} == {"fit": 1350, "validation": 150, "test": 364}
    for chain in chains["test"][:20]:
        assert len(chain.sequence) == len(chain.labels) == len(chain.scored)
        assert set(np.unique(chain.labels)) <= {0, 1, 2} and chain.scored.any()
    assert not {c.id for c in chains["test"]} & {c.id for c in chains["fit"] + chains["validation"]}
    with pytest.raises(FileNotFoundError, match="flip_ss_sequences"):
        secondary_structure(data_dir / "nowhere")


def test_probe_secondary_structure_runs_every_probe(data_dir, alphabet, capsys):
    model = tiny_model(alphabet)
    limits = {"fit": 10, "validation": 4, "test": 5}
    probes = probe_secondary_structure(model, alphabet, data_dir, limits=limits, weight_decays=[1e-3], steps=5,
                                       progress=True)
    assert list(probes.by_layer) == list(range(model.config.n_layers + 1))
    n_probes = model.config.n_layers + 4  # one-hot, window, every layer (0 = token embeddings), window + best
    bars = capsys.readouterr().err
    assert "embed: 100%" in bars and f"probe: 100%|██████████| {n_probes}/{n_probes}" in bars
    rows = probes.rows()
    assert list(rows)[:2] == ["one-hot residue", "one-hot window ±7"]
    assert list(rows)[-1] == f"one-hot window ±7 + layer {probes.best_layer}"
    best_validation = max(r.validation_accuracy for r in probes.by_layer.values())
    assert probes.by_layer[probes.best_layer].validation_accuracy == best_validation
    assert probes.best_test_features.shape == (probes.residues["test"], model.config.d_model)
    assert len(probes.test_labels) == probes.residues["test"]
    for result in rows.values():
        assert 0.0 <= result.test_accuracy <= 1.0


def test_flip_probe_benchmark_prints_a_table_per_checkpoint(checkpoint, tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "flip_probe.py"
    result = subprocess.run([sys.executable, str(script), str(checkpoint), "--fast", "--threads", "1",
                             "--untrained"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| probe | trained Q3 test | vs window | untrained Q3 test | vs window |"
    assert len(table) == 6 and all(row.count("|") == 6 for row in table)
    assert table[2].startswith("| one-hot window ±7 | ") and table[2].count("| +0.000 |") == 2
    assert table[-1].startswith("| one-hot window ±7 + layer ")
    # The sequence-only baselines do not depend on the model: the same in both columns.
    for row in table[1:3]:
        cells = row.split("|")
        assert cells[2] == cells[4]
    missing = subprocess.run([sys.executable, str(script), str(tmp_path / "none.ckpt")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
