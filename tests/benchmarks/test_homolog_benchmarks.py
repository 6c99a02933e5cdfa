"""benchmarks/homolog_attention.py, homolog_reading.py and homolog_sets.py on tiny models and data."""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest
import torch

from protein_performer.data import Alphabet
from protein_performer.homologs import read_cluster_members
from protein_performer.model import PerformerConfig, ProteinPerformer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import homolog_attention  # noqa: E402
import homolog_reading  # noqa: E402
import homolog_sets  # noqa: E402

FASTA = REPO / "data" / "swissprot_subset.fasta.gz"


def write_checkpoint(path: Path, attention: str) -> Path:
    alphabet = Alphabet()
    torch.manual_seed(0)
    config = PerformerConfig(vocab_size=len(alphabet), d_model=32, n_layers=2, n_heads=2, d_ff=64,
                             attention=attention, nb_features=32, max_length=512, pad_idx=alphabet.pad_idx)
    model = ProteinPerformer(config)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_config": config.to_dict(), "alphabet_tokens": alphabet.tokens}}, path)
    return path


@pytest.fixture(scope="module")
def small_clusters(tmp_path_factory) -> Path:
    """Three clusters of the bundled subset with 2-4 members."""
    clusters = read_cluster_members(REPO / "data" / "swissprot_subset.clusters50.tsv.gz")
    chosen = [r for r, members in sorted(clusters.items()) if 2 <= len(members) <= 4][:3]
    path = tmp_path_factory.mktemp("clusters") / "clusters.tsv"
    path.write_text("".join(f"{r}\t{m}\n" for r in chosen for m in clusters[r]))
    return path


@pytest.mark.parametrize("attention", ["softmax", "favor"])
def test_homolog_attention_prints_both_kinds_for_every_head(attention, small_clusters, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", attention)
    homolog_attention.main([str(checkpoint), str(small_clusters), str(FASTA), "--window", "256", "--clusters", "2",
                            "--features", "16"])
    out = capsys.readouterr().out
    assert f"trained with {attention}" in out and "2 windows" in out
    swapped = "favor" if attention == "softmax" else "softmax"
    assert f"{swapped} (swapped) lift" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4  # 2 layers x 2 heads
    if attention == "softmax":
        assert "m = 16" in out


def test_homolog_attention_with_masked_queries_measures_only_the_masked_residues(small_clusters, tmp_path, capsys):
    import re

    checkpoint = write_checkpoint(tmp_path / "model.ckpt", "softmax")
    pairs = {}
    for mask in ("0", "0.3"):
        homolog_attention.main([str(checkpoint), str(small_clusters), str(FASTA), "--window", "256", "--clusters", "2",
                                "--features", "16", "--mask", mask])
        out = capsys.readouterr().out
        pairs[mask] = int(re.search(r"(\d+) aligned \(later residue", out).group(1))
        assert ("shown as <mask>" in out) is (mask != "0")
    # the same windows and alignments, queries cut to the masked ~30% of later residues
    assert 0.15 * pairs["0"] < pairs["0.3"] < 0.45 * pairs["0"]
    with pytest.raises(SystemExit):
        homolog_attention.main([str(checkpoint), str(small_clusters), str(FASTA), "--mask", "1.5"])


def test_homolog_reading_scores_first_and_later_members(small_clusters, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", "softmax")
    homolog_reading.main([str(checkpoint), str(small_clusters), str(FASTA), "512", "3"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if "members |" in line}
    assert set(rows) == {"first members", "later members"}
    for cells in rows.values():
        assert int(cells[7]) > 0  # masked targets scored
        assert 1.0 < float(cells[2]) < 40.0  # a perplexity over ~25 tokens


def test_homolog_sets_writes_train_and_held_out_clusters_apart(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    representatives = [f"P{index:05d}" for index in range(60)]
    members = {r: [r, r + "b"] for r in representatives}
    members["SINGLE"] = ["SINGLE"]
    with gzip.open(data / "swissprot_2014_01_dev.fasta.gz", "wt") as fasta:
        for r, accessions in members.items():
            for accession in accessions:
                fasta.write(f">sp|{accession}|NAME_{accession}\nMKTAYIAK\n")
    with gzip.open(data / "swissprot_2014_01_dev.clusters90.tsv.gz", "wt") as tsv:
        tsv.write("".join(f"{r}\t{m}\n" for r, accessions in members.items() for m in accessions))
    monkeypatch.chdir(tmp_path)
    homolog_sets.main(["90", str(data)])
    held = {r for r in representatives if homolog_sets.is_held_out(r)}
    assert held and len(held) < len(representatives)
    train = [line[1:].split("|")[1] for line in (tmp_path / "train90.fasta").read_text().splitlines()
             if line.startswith(">")]
    evaluation = read_cluster_members(tmp_path / "eval90.tsv")
    assert set(evaluation) == held
    assert sorted(train) == sorted(m for r in representatives if r not in held for m in members[r])
    for index in range(0, len(train), 2):  # each cluster's two members are consecutive
        assert train[index].rstrip("b") == train[index + 1].rstrip("b")
    assert "SINGLE" not in train
    assert f"held-out clusters {len(held)}" in capsys.readouterr().out


def test_member_offsets_counts_aligned_pairs_by_member_position_offset(capsys) -> None:
    import member_offsets

    clusters = {"A": ["A", "B", "C"], "D": ["D"]}
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    with gzip.open(FASTA, "rt") as handle:
        base = next(sequence for _, sequence in SimpleFastaParser(handle) if len(sequence) >= 200)[:200]
    sequences = {"A": base, "B": "GG" + base, "C": "GG" + base[:50] + base[53:], "D": base}
    offsets, used = member_offsets.member_offsets(clusters, sequences, max_clusters=10, max_members=5)
    assert used == 1  # D has one member
    # B = 2 residues + A: every pair 2 apart. C = B with 3 residues deleted: 0 apart up to the deletion,
    # 3 apart after it (where the gap goes among repeated residues is the aligner's choice: +-3).
    assert len(base) == 200 and sorted(set(offsets.tolist())) == [0, 2, 3]
    assert (offsets == 2).sum() == 200 and (offsets == 0).sum() + (offsets == 3).sum() == 197 + 2
    assert 49 <= (offsets == 0).sum() <= 55
    text = member_offsets.table(offsets, used)
    assert "| 0 |" in text and f"{len(offsets):,} pairs in 1 clusters" in text
    assert member_offsets.main([str(REPO / "data" / "swissprot_subset.clusters50.tsv.gz"), str(FASTA),
                                "--clusters", "2", "--members", "2"]) == 0
    assert "| 50 |" in capsys.readouterr().out
