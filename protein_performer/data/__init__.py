"""Proteins from FASTA to training batches.

    errors.py     DataError, FastaFormatError: every data error, each naming the file (and line)
    fasta.py      read_fasta: FastaRecords (Biopython), accessions, the opener and its checks
    fasta_chunks.py  read_fasta_chunks: the fast chunk parser, its decompression thread and reader process
    alphabet.py   Alphabet: residues <-> uint8 token ids through a byte lookup table; `frame`: <cls> ... <eos> rows
    splits.py     train/valid/test/ood from a stable hash of the accession (or of its cluster's representative)
    clusters.py   read_clusters: MMseqs2 cluster TSV (representative TAB member) -> ClusterMap of accession hashes
    store.py      the HDF5 token store's layout, StoreSummary, and TokenStore (reading it)
    store_writer.py  build_token_store: FASTA -> HDF5, streaming in constant memory
    sampling.py   single proteins (crops, token-budget batches), a concatenated stream in windows, or
                  homolog windows (whole clusters, <cls> m1 <eos> m2 <eos> ..., packed)
    masking.py    masked-LM corruption and causal-LM labels
    dataset.py    ProteinBatches: one split's batches, sharded over DDP ranks and DataLoader workers
    datamodule.py ProteinDataModule (Lightning), building the store from FASTA into a cache on first use;
                  its settings in typed groups: DataSource, BatchSpec, SplitSpec, Loading

The torch/Lightning parts (dataset, datamodule) are imported on first use, so preprocessing and
FASTA reading start without loading torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from protein_performer.data.alphabet import Alphabet, EncodedSequences, frame
from protein_performer.data.clusters import ClusterMap, read_clusters
from protein_performer.data.errors import DataError, FastaFormatError
from protein_performer.data.fasta import FastaRecord, expand_inputs, parse_accession, read_fasta
from protein_performer.data.fasta_chunks import FastaChunk, read_fasta_chunks
from protein_performer.data.masking import IGNORE_INDEX, OBJECTIVES, causal_lm_labels, mask_for_mlm
from protein_performer.data.sampling import SAMPLINGS, budget_batches, plan_epoch, single_examples
from protein_performer.data.splits import SPLITS, SplitSpec, accession_hash
from protein_performer.data.store import StoreSummary, TokenStore
from protein_performer.data.store_writer import build_token_store

_LAZY = {
    "Batch": "protein_performer.data.dataset",
    "BatchSpec": "protein_performer.data.dataset",
    "ProteinBatches": "protein_performer.data.dataset",
    "DataSource": "protein_performer.data.datamodule",
    "EpochLoader": "protein_performer.data.datamodule",
    "Loading": "protein_performer.data.datamodule",
    "ProteinDataModule": "protein_performer.data.datamodule",
}

if TYPE_CHECKING:
    from protein_performer.data.datamodule import DataSource, EpochLoader, Loading, ProteinDataModule
    from protein_performer.data.dataset import Batch, BatchSpec, ProteinBatches

__all__ = [
    "Alphabet",
    "Batch",
    "BatchSpec",
    "ClusterMap",
    "DataError",
    "DataSource",
    "EncodedSequences",
    "EpochLoader",
    "FastaChunk",
    "FastaFormatError",
    "FastaRecord",
    "IGNORE_INDEX",
    "Loading",
    "OBJECTIVES",
    "ProteinBatches",
    "ProteinDataModule",
    "SAMPLINGS",
    "SPLITS",
    "SplitSpec",
    "StoreSummary",
    "TokenStore",
    "accession_hash",
    "budget_batches",
    "build_token_store",
    "causal_lm_labels",
    "expand_inputs",
    "frame",
    "mask_for_mlm",
    "parse_accession",
    "plan_epoch",
    "read_fasta",
    "read_clusters",
    "read_fasta_chunks",
    "single_examples",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'protein_performer.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
