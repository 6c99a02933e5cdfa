"""Fixtures of the data tests: the bundled real UniProt sample, its records and a token store of it."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from protein_performer.data import Alphabet, FastaRecord, SplitSpec, TokenStore, build_token_store, read_fasta

# Held out by the sample store: 8 human proteins (the sample config's OOD rule).
HUMAN = "OS=Homo sapiens"
SAMPLE_SPLIT = SplitSpec(valid_fraction=0.05, test_fraction=0.05, ood_regex=HUMAN)


@pytest.fixture(scope="session")
def sample_fasta(data_dir: Path) -> Path:
    return data_dir / "uniprot_sample.fasta"


@pytest.fixture(scope="session")
def sample_records(sample_fasta: Path) -> list[FastaRecord]:
    return list(read_fasta(sample_fasta))


@pytest.fixture(scope="session")
def alphabet() -> Alphabet:
    return Alphabet()


@pytest.fixture(scope="session")
def sample_store_path(sample_fasta: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "sample.h5"
    build_token_store(sample_fasta, path, split=SAMPLE_SPLIT, progress=False)
    return path


@pytest.fixture()
def sample_store(sample_store_path: Path) -> TokenStore:
    with TokenStore(sample_store_path) as store:
        yield store


def _write_fasta(path: Path, records: list[tuple[str, str]], width: int | None = None, newline: str = "\n") -> Path:
    """Records as FASTA (sequence lines wrapped at `width`), gzip-compressed if the name ends in .gz."""
    lines = []
    for title, sequence in records:
        lines.append(">" + title)
        step = width or max(len(sequence), 1)
        lines.extend(sequence[i:i + step] for i in range(0, len(sequence), step))
    text = newline.join(lines) + newline
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="latin-1", newline="") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="latin-1", newline="")
    return path


@pytest.fixture(scope="session")
def write_fasta():
    """write_fasta(path, [(title, sequence), ...], width=None, newline="\\n") -> path (.gz: compressed)."""
    return _write_fasta


@pytest.fixture(scope="session")
def sample_split() -> SplitSpec:
    return SAMPLE_SPLIT


# The bundled Swiss-Prot subset and its MMseqs2 clusters (50% identity): real homologs for the cluster tests.
SUBSET_SPLIT = dict(valid_fraction=0.05, test_fraction=0.05)


@pytest.fixture(scope="session")
def subset_fasta(data_dir: Path) -> Path:
    return data_dir / "swissprot_subset.fasta.gz"


@pytest.fixture(scope="session")
def subset_clusters(data_dir: Path) -> Path:
    return data_dir / "swissprot_subset.clusters50.tsv.gz"


@pytest.fixture(scope="session")
def clustered_store_path(subset_fasta: Path, subset_clusters: Path, tmp_path_factory) -> Path:
    """The subset's token store built with its clusters (about a second)."""
    path = tmp_path_factory.mktemp("clustered") / "subset.h5"
    build_token_store(subset_fasta, path, split=SplitSpec(**SUBSET_SPLIT, clusters=str(subset_clusters)),
                      progress=False)
    return path
