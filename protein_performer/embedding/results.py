"""Embeddings of N proteins, columnar, whether computed in memory or read from a file.

`Embeddings` holds ids, lengths, offsets and {layer: array} per kind; `emb["P69905"]` gives one
protein's `ProteinEmbedding`. Layers are stored under their non-negative index; `LayerArrays` also
accepts negative ones (-1 = after the final LayerNorm).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from protein_performer.embedding.settings import INCLUDE_KINDS

__all__ = ["Embeddings", "LayerArrays", "ProteinEmbedding", "offsets_of"]


class LayerArrays(Mapping[int, Any]):
    """{layer: array} that also takes negative layers (-1 = n_layers, the final LayerNorm's output).

    Values are numpy arrays, or h5py datasets for ``load_embeddings(..., lazy=True)`` (slice them).
    """

    def __init__(self, arrays: dict[int, Any], n_layers: int) -> None:
        self._arrays = arrays
        self._n_layers = n_layers

    def __getitem__(self, layer: int) -> Any:
        key = layer % (self._n_layers + 1) if -(self._n_layers + 1) <= layer < 0 else layer
        if key not in self._arrays:
            raise KeyError(f"layer {layer} was not embedded; available layers: {sorted(self._arrays)}")
        return self._arrays[key]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._arrays))

    def __len__(self) -> int:
        return len(self._arrays)


@dataclass
class ProteinEmbedding:
    """One protein's embeddings: {layer: [D]} means and cls vectors, {layer: [length, D]} per residue."""

    id: str
    length: int
    mean: dict[int, np.ndarray] = field(default_factory=dict)
    per_residue: dict[int, np.ndarray] = field(default_factory=dict)
    cls: dict[int, np.ndarray] = field(default_factory=dict)


class Embeddings:
    """Embeddings of N proteins, columnar: arrays for all at once, or one protein by id.

    Attributes:
        ids: [N] protein ids.  lengths: [N] residues.  offsets: [N + 1] row ranges in per_residue.
        mean, cls: {layer: [N, D]};  per_residue: {layer: [sum(lengths), D]} (LayerArrays; empty if not
            embedded).
        layers: embedded layers (non-negative).  n_layers: blocks of the model.
        attrs: provenance (checkpoint, model config, settings, package version).

    ``emb["P69905"]`` gives a :class:`ProteinEmbedding`; ``emb.residues("P69905", -1)`` one [L, D] array.
    """

    def __init__(self, *, ids: Sequence[str], lengths: np.ndarray, offsets: np.ndarray,
                 arrays: dict[str, dict[int, Any]], n_layers: int, attrs: dict[str, Any],
                 file: h5py.File | None = None) -> None:
        self.ids = list(ids)
        self.lengths = lengths
        self.offsets = offsets
        self.n_layers = n_layers
        self.attrs = attrs
        self.mean = LayerArrays(arrays.get("mean", {}), n_layers)
        self.per_residue = LayerArrays(arrays.get("per_residue", {}), n_layers)
        self.cls = LayerArrays(arrays.get("cls", {}), n_layers)
        self.layers = tuple(sorted({layer for kind in arrays.values() for layer in kind}))
        self._index = {protein_id: i for i, protein_id in enumerate(self.ids)}
        self._file = file

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, protein_id: object) -> bool:
        return protein_id in self._index

    def __repr__(self) -> str:
        kinds = [kind for kind in INCLUDE_KINDS if len(getattr(self, kind))]
        return f"Embeddings({len(self)} proteins, layers={list(self.layers)}, include={kinds})"

    def index(self, protein_id: str) -> int:
        """Row of `protein_id` in ids, lengths, mean/* and cls/*."""
        try:
            return self._index[protein_id]
        except KeyError:
            raise KeyError(f"no protein with id {protein_id!r} in these embeddings ({len(self)} proteins)") from None

    def residues(self, protein_id: str, layer: int = -1) -> np.ndarray:
        """Per-residue embeddings [length, D] of one protein at `layer`."""
        i = self.index(protein_id)
        return np.asarray(self.per_residue[layer][self.offsets[i]:self.offsets[i + 1]])

    def __getitem__(self, protein_id: str) -> ProteinEmbedding:
        i = self.index(protein_id)
        return ProteinEmbedding(
            id=protein_id,
            length=int(self.lengths[i]),
            mean={layer: np.asarray(self.mean[layer][i]) for layer in self.mean},
            per_residue={layer: self.residues(protein_id, layer) for layer in self.per_residue},
            cls={layer: np.asarray(self.cls[layer][i]) for layer in self.cls},
        )

    def close(self) -> None:
        """Close the file behind lazy arrays (no-op otherwise)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Embeddings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """int64 [N + 1]: protein i is rows offsets[i]:offsets[i + 1] of the per-residue arrays."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
