"""Embeddings of proteins from a trained model (the library behind ``python -m protein_performer.embed``).

    settings.py   EmbedSettings: every option of a run in one dataclass; its check against the model
    compute.py    windows, token-budget batches, the forward pass; `embed` for proteins in memory
    results.py    Embeddings / ProteinEmbedding / LayerArrays: columnar results, in memory or from a file
    store.py      the columnar HDF5 file: `embed_fasta` (resumable writer) and `load_embeddings`
    probe.py      linear probes of per-residue embeddings; the FLIP secondary-structure experiment
"""
from __future__ import annotations

from protein_performer.embedding.compute import embed
from protein_performer.embedding.results import Embeddings, LayerArrays, ProteinEmbedding
from protein_performer.embedding.settings import INCLUDE_KINDS, EmbedError, EmbedSettings
from protein_performer.embedding.store import embed_fasta, load_embeddings

__all__ = [
    "INCLUDE_KINDS",
    "EmbedError",
    "EmbedSettings",
    "Embeddings",
    "LayerArrays",
    "ProteinEmbedding",
    "embed",
    "embed_fasta",
    "load_embeddings",
]
