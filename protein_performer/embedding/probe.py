"""Linear probes of per-residue embeddings, and the FLIP secondary-structure benchmark they are read on.

A probe asks how much of a residue's label a linear model can read from some features of it. It is
multinomial logistic regression fitted full-batch with L-BFGS; its L2 strength is the one that scores
best on a validation split, after which it is refitted on fit + validation and scored on test.

Features of one split are a tensor [n, ...] or a tuple of them (for a probe over several inputs); the
probes here are

    linear          torch.nn.Linear on standardised features [n, D] (an embedding layer, a one-hot)
    WindowProbe     the one-hot window of the residue's neighbours, [n, 2h+1] token ids: one learned
                    class-vector per (offset, token), summed; the linear map of the one-hot window
                    without materialising it
    WindowPlusLinear  both at once, logits summed: does a feature add anything to the local window?

`secondary_structure(directory)` reads the bundled FLIP split (data/flip_ss_*.fasta.gz: 3-state labels
H/E/C per residue and a mask of the residues resolved in the structure), and `probe_secondary_structure`
embeds it with a model and runs every probe; the downstream notebook and benchmarks/flip_probe.py are
thin readers of its result.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from protein_performer.data import Alphabet, read_fasta

__all__ = [
    "SPLITS", "STATES", "Chain", "ProbeResult", "SecondaryStructureProbes", "WindowPlusLinear", "WindowProbe",
    "accuracy", "evaluate", "fit", "predict", "probe_secondary_structure", "secondary_structure", "standardised",
    "window_tokens",
]

STATES = "HEC"  # helix, strand, coil: FLIP's 3-state labels, in class-index order
SPLITS = ("fit", "validation", "test")

Features = torch.Tensor | tuple[torch.Tensor, ...]


# ---- probes --------------------------------------------------------------------------------------------

def window_tokens(ids: np.ndarray, half_window: int, pad: int) -> np.ndarray:
    """int64 [L, 2 * half_window + 1]: the token ids around each residue, `pad` beyond the ends."""
    padded = np.concatenate([np.full(half_window, pad), ids, np.full(half_window, pad)])
    return np.stack([padded[i:i + len(ids)] for i in range(2 * half_window + 1)], axis=1).astype(np.int64)


class WindowProbe(torch.nn.Module):
    """Logistic regression on the one-hot window of token ids [n, width] (ids in [0, vocab))."""

    def __init__(self, width: int, vocab: int, n_classes: int = len(STATES)) -> None:
        super().__init__()
        self.weights = torch.nn.Embedding(width * vocab, n_classes)
        torch.nn.init.zeros_(self.weights.weight)
        self.register_buffer("offsets", torch.arange(width) * vocab)
        self.bias = torch.nn.Parameter(torch.zeros(n_classes))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.weights(windows + self.offsets).sum(1) + self.bias


class WindowPlusLinear(torch.nn.Module):
    """A WindowProbe and a linear map of further features [n, D], their logits summed."""

    def __init__(self, width: int, vocab: int, dim: int, n_classes: int = len(STATES)) -> None:
        super().__init__()
        self.window = WindowProbe(width, vocab, n_classes)
        self.linear = torch.nn.Linear(dim, n_classes, bias=False)

    def forward(self, windows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.window(windows) + self.linear(features)


def _call(probe: torch.nn.Module, x: Features) -> torch.Tensor:
    return probe(*x) if isinstance(x, tuple) else probe(x)


def _concat(a: Features, b: Features) -> Features:
    if isinstance(a, tuple):
        return tuple(torch.cat([u, v]) for u, v in zip(a, b, strict=True))
    return torch.cat([a, b])


def fit(probe: torch.nn.Module, x: Features, y: torch.Tensor, weight_decay: float, steps: int = 100) -> torch.nn.Module:
    """Fit `probe` to labels y [n] by L-BFGS on cross-entropy + weight_decay * |weights|^2 (biases free)."""
    weights = [p for name, p in probe.named_parameters() if not name.endswith("bias")]
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(_call(probe, x), y) + weight_decay * sum(w.square().sum() for w in weights)
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


@torch.no_grad()
def predict(probe: torch.nn.Module, x: Features) -> torch.Tensor:
    """Class indices [n]."""
    return _call(probe, x).argmax(-1)


def accuracy(probe: torch.nn.Module, x: Features, y: torch.Tensor) -> float:
    return (predict(probe, x) == y).double().mean().item()


@dataclass
class ProbeResult:
    test_accuracy: float
    validation_accuracy: float  # of the probe fitted on the fit split alone, at the chosen strength
    weight_decay: float
    probe: torch.nn.Module  # refitted on fit + validation


def evaluate(make_probe: Callable[[], torch.nn.Module], x: dict[str, Features], y: dict[str, torch.Tensor],
             weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2), steps: int = 100) -> ProbeResult:
    """Choose the L2 strength on the validation split, refit on fit + validation, score on test.

    x, y: {"fit" | "validation" | "test": features, labels}.
    """
    torch.manual_seed(0)
    scores = {wd: accuracy(fit(make_probe(), x["fit"], y["fit"], wd, steps), x["validation"], y["validation"])
              for wd in weight_decays}
    best = max(scores, key=scores.__getitem__)
    probe = fit(make_probe(), _concat(x["fit"], x["validation"]), torch.cat([y["fit"], y["validation"]]), best, steps)
    return ProbeResult(accuracy(probe, x["test"], y["test"]), scores[best], best, probe)


def standardised(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{split: features} centred and scaled by the fit split's per-column mean and standard deviation."""
    mean, std = features["fit"].mean(0), features["fit"].std(0) + 1e-6
    return {name: (value - mean) / std for name, value in features.items()}


# ---- FLIP secondary structure --------------------------------------------------------------------------

@dataclass
class Chain:
    id: str
    sequence: str
    labels: np.ndarray  # int64 [L]: index into STATES
    scored: np.ndarray  # bool [L]: resolved in the structure (FLIP mask 1); only these count


def secondary_structure(directory: str | Path, limits: dict[str, int | None] | None = None) -> dict[str, list[Chain]]:
    """The FLIP secondary-structure chains in `directory` (flip_ss_{sequences,labels,mask}.fasta.gz), by split.

    Splits: "fit" (train chains outside FLIP's validation set), "validation" (FLIP's validation chains,
    part of its train split; used to choose a probe's L2 strength), "test". `limits` keeps the first
    n chains of a split (None: all), for smoke runs.
    """
    directory = Path(directory)

    def read(part: str) -> dict[str, str]:
        path = directory / f"flip_ss_{part}.fasta.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the FLIP secondary-structure files live in the "
                                    "repository's data/")
        return {record.accession: record for record in read_fasta(path, residues=False)}

    sequences, labels, masks = read("sequences"), read("labels"), read("mask")
    chains: dict[str, list[Chain]] = {split: [] for split in SPLITS}
    for key, record in labels.items():
        fields = dict(item.split("=", 1) for item in record.description.split()[1:])
        split = "test" if fields["SET"] == "test" else ("validation" if fields["VALIDATION"] == "True" else "fit")
        sequence, label, mask = sequences[key].sequence, record.sequence, masks[key].sequence
        if not len(sequence) == len(label) == len(mask):
            raise ValueError(f"FLIP chain {key}: sequence, labels and mask differ in length "
                             f"({len(sequence)}, {len(label)}, {len(mask)})")
        chains[split].append(Chain(key, sequence, np.array([STATES.index(c) for c in label], dtype=np.int64),
                                   np.frombuffer(mask.encode(), dtype=np.uint8) == ord("1")))
    for split, n in (limits or {}).items():
        chains[split] = chains[split][:n]
    return chains


@dataclass
class SecondaryStructureProbes:
    """Every probe's result on the FLIP split (test accuracy in `.test_accuracy` of each)."""

    half_window: int
    onehot: ProbeResult  # the residue's identity alone
    window: ProbeResult  # its one-hot window of ±half_window residues
    by_layer: dict[int, ProbeResult]  # each layer's embedding (0 = token embeddings)
    best_layer: int  # by validation accuracy
    window_plus_best: ProbeResult  # the window and the best layer's embedding together
    best_test_features: torch.Tensor  # [n_test, D] standardised, of the best layer: for confusion matrices
    test_labels: torch.Tensor  # [n_test]
    residues: dict[str, int]  # scored residues per split

    @property
    def last_layer(self) -> int:
        return max(self.by_layer)

    def rows(self) -> dict[str, ProbeResult]:
        """Display name -> result: baselines, last layer, best layer (if another), window + best layer."""
        rows = {"one-hot residue": self.onehot, f"one-hot window ±{self.half_window}": self.window,
                f"embedding, layer {self.last_layer} (last)": self.by_layer[self.last_layer]}
        if self.best_layer != self.last_layer:
            rows[f"embedding, layer {self.best_layer} (best on validation)"] = self.by_layer[self.best_layer]
        rows[f"one-hot window ±{self.half_window} + layer {self.best_layer}"] = self.window_plus_best
        return rows

    def table(self) -> str:
        rows = self.rows()
        width = max(map(len, rows))
        return "\n".join(f"{name:>{width}}: Q3 test accuracy {result.test_accuracy:.3f}"
                         for name, result in rows.items())


def probe_secondary_structure(model: torch.nn.Module, alphabet: Alphabet, directory: str | Path, *,
                              half_window: int = 7, limits: dict[str, int | None] | None = None,
                              weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2), steps: int = 100,
                              workdir: str | Path | None = None, progress: bool = False) -> SecondaryStructureProbes:
    """Embed the FLIP chains with `model` (every layer) and probe them: the notebook's whole experiment.

    Probes, in order: the one-hot residue; the one-hot window of ±`half_window` residues (what local
    sequence alone gives a linear model); each layer's embedding (0 = token embeddings ... n_layers =
    the final LayerNorm's output); and the window plus the best layer's embedding (best on validation),
    which asks whether the embedding adds anything the window lacks. Embeddings go through the file
    path (embed_fasta -> HDF5 -> load_embeddings) in `workdir` (default: a temporary folder, removed).
    `progress`: tqdm bars on stderr for the embedding and for the probes' fits.
    """
    from protein_performer.embedding.store import embed_fasta, load_embeddings

    chains = secondary_structure(directory, limits)
    n_layers = model.config.n_layers
    layers = list(range(n_layers + 1))
    pad = len(alphabet)  # the window's "beyond the ends" token
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(workdir) if workdir is not None else Path(scratch)
        fasta = folder / "flip_chains.fasta"
        fasta.write_text("".join(f">{c.id}\n{c.sequence}\n" for split in SPLITS for c in chains[split]))
        path = embed_fasta(model, alphabet, fasta, folder / "flip.h5", layers=layers, include=["per_residue"],
                           dtype="float16", progress=progress, overwrite=True)
        with load_embeddings(path, lazy=True) as embeddings:
            rows, y, windows = {}, {}, {}
            for split in SPLITS:
                parts = chains[split]
                rows[split] = np.concatenate([embeddings.offsets[embeddings.index(c.id)] + np.flatnonzero(c.scored)
                                              for c in parts])
                y[split] = torch.from_numpy(np.concatenate([c.labels[c.scored] for c in parts]))
                windows[split] = torch.from_numpy(np.concatenate(
                    [window_tokens(alphabet.encode(c.sequence), half_window, pad)[c.scored] for c in parts]))
            width, vocab, dim = 2 * half_window + 1, len(alphabet) + 1, model.config.d_model
            bar = tqdm(total=len(layers) + 3, unit="probe", desc="probe", disable=not progress)

            def run(make_probe: Callable[[], torch.nn.Module], x: dict[str, Features]) -> ProbeResult:
                result = evaluate(make_probe, x, y, weight_decays, steps)
                bar.update()
                return result

            onehot = standardised({s: F.one_hot(windows[s][:, half_window], vocab).float() for s in SPLITS})
            onehot_result = run(lambda: torch.nn.Linear(vocab, len(STATES)), onehot)
            window_result = run(lambda: WindowProbe(width, vocab), windows)
            by_layer: dict[int, ProbeResult] = {}
            best_layer, best = layers[0], None  # only the best layer's features are kept for the last probe
            for layer in layers:
                table = embeddings.per_residue[layer][()]  # one layer in memory: [sum(lengths), D], float16
                x = standardised({s: torch.from_numpy(table[rows[s]].astype(np.float32)) for s in SPLITS})
                del table
                by_layer[layer] = run(lambda: torch.nn.Linear(dim, len(STATES)), x)
                if best is None or by_layer[layer].validation_accuracy > by_layer[best_layer].validation_accuracy:
                    best_layer, best = layer, x
            both = run(lambda: WindowPlusLinear(width, vocab, dim), {s: (windows[s], best[s]) for s in SPLITS})
            bar.close()
    return SecondaryStructureProbes(half_window, onehot_result, window_result, by_layer, best_layer, both,
                                    best["test"], y["test"], {s: len(rows[s]) for s in SPLITS})
