"""Fixtures of the embedding tests: real FLIP chains, a FASTA of 25 of them, a checkpoint as training writes it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protein_performer.data import Alphabet, read_fasta
from protein_performer.training.module import ProteinLM

from .helpers import tiny_model, write_fasta


@pytest.fixture(scope="module")
def alphabet() -> Alphabet:
    return Alphabet()


@pytest.fixture(scope="module")
def flip_records(data_dir) -> list[tuple[str, str]]:
    """The first 40 FLIP chains (real PDB sequences, 20 to ~800 residues)."""
    records = read_fasta(data_dir / "flip_ss_sequences.fasta.gz")
    return [(record.accession, record.sequence) for _, record in zip(range(40), records)]




@pytest.fixture
def fasta(tmp_path, flip_records) -> Path:
    return write_fasta(tmp_path / "proteins.fasta.gz", flip_records[:25])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, alphabet) -> Path:
    """A checkpoint as training writes it (weights under `model.`, the config in hyper_parameters)."""
    config = tiny_model(alphabet).config
    module = ProteinLM(config.to_dict(), alphabet_tokens=alphabet.tokens)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path
