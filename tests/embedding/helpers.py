"""A tiny model, references computed one protein at a time, and FASTA writing, for the embedding tests."""
from __future__ import annotations

import gzip
from pathlib import Path

import torch

from protein_performer.data import Alphabet
from protein_performer.maps import tokenize
from protein_performer.model import PerformerConfig, ProteinPerformer


def tiny_model(alphabet: Alphabet, attention: str = "favor", *, position: str | None = None,
               max_length: int = 1024, n_layers: int = 2) -> ProteinPerformer:
    torch.manual_seed(0)
    config = PerformerConfig(vocab_size=len(alphabet), d_model=32, n_layers=n_layers, n_heads=2, d_ff=64,
                             dropout=0.0, attention=attention, nb_features=32, position=position,
                             max_length=max_length, pad_idx=alphabet.pad_idx)
    return ProteinPerformer(config).eval()


def reference(model: ProteinPerformer, alphabet: Alphabet, sequence: str, layer: int = -1) -> torch.Tensor:
    """Hidden states [L + 2, D] of one protein fed alone (no batch, no padding): <cls> residues <eos>."""
    return references(model, alphabet, sequence, [layer])[layer % (model.config.n_layers + 1)]


def references(model: ProteinPerformer, alphabet: Alphabet, sequence: str,
               layers: list[int]) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        out = model(tokenize(alphabet, sequence)[None], repr_layers=layers)
    return {layer: states[0] for layer, states in out.hidden_states.items()}


def write_fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as handle:
        for protein_id, sequence in records:
            handle.write(f">{protein_id} some description\n")
            for start in range(0, len(sequence), 60):
                handle.write(sequence[start:start + 60] + "\n")
    return path
