"""Clusters as data: the MMseqs2 TSV, its errors, splits that follow clusters, and the store's cluster keys."""
from __future__ import annotations

import collections
import gzip
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from protein_performer.data import DataError, ProteinDataModule, SplitSpec, TokenStore, build_token_store
from protein_performer.data.clusters import read_clusters
from protein_performer.data.splits import SPLITS, accession_hash
from tests.data.conftest import SUBSET_SPLIT


def read_tsv(path: Path) -> dict[str, str]:
    """member -> representative, the plain-Python reference."""
    with gzip.open(path, "rt") as handle:
        return {member: rep for rep, member in (line.rstrip("\n").split("\t") for line in handle)}


def key(accession: str) -> int:
    """A cluster key as the store keeps it: the representative's accession hash, as int64."""
    return int(np.uint64(accession_hash(accession.encode())).view(np.int64))


def test_the_lookup_maps_every_member_to_its_representative_and_others_to_themselves(subset_clusters):
    clusters = read_clusters(subset_clusters)
    reference = read_tsv(subset_clusters)
    assert len(clusters.members) == len(reference) and clusters.clusters == len(set(reference.values()))
    members = list(reference)[::97] + ["NOT_A_MEMBER", "Q00000"]
    hashes = np.array([accession_hash(m.encode()) for m in members], dtype=np.uint64)
    keys, listed = clusters.keys(hashes)
    expected = [accession_hash(reference.get(m, m).encode()) for m in members]
    assert keys.tolist() == expected and listed.tolist() == [m in reference for m in members]


def test_whole_uniprot_words_crlf_blank_lines_and_plain_text_are_read_by_the_accession_rule(tmp_path):
    path = tmp_path / "clusters.tsv"
    path.write_bytes(b"sp|P69905|HBA_HUMAN\tsp|P69905|HBA_HUMAN\r\nsp|P69905|HBA_HUMAN\ttr|Q9XXX1|Q9XXX1_X\r\n\n"
                     b"UniRef50_P01308\tP01308")  # no final newline
    clusters = read_clusters(path)
    keys, listed = clusters.keys(np.array([accession_hash(a) for a in (b"P69905", b"Q9XXX1", b"P01308")],
                                          dtype=np.uint64))
    assert listed.all() and keys.tolist() == [accession_hash(b"P69905")] * 2 + [accession_hash(b"UniRef50_P01308")]


BAD = {
    "one-column": (b"A\tA\nB\n", r"one-column\.tsv:2: expected 'representative<TAB>member'"),
    "three-columns": (b"A\tA\nA\tB\tC\n", r"three-columns\.tsv:2: expected 'representative<TAB>member'.*'A\\tB\\tC'"),
    "empty-member": (b"A\tA\n\nB\t\n", r"empty-member\.tsv:3: expected"),
    "empty-representative": (b"\tA\n", r"empty-representative\.tsv:1: expected"),
    "member-twice": (b"A\tA\nA\tB\nC\tC\nC\tB\n", r"member-twice\.tsv:4: member 'B' is already in another cluster "
                                                 r"\(line 2\)"),
    "empty": (b"", r"empty\.tsv: no clusters"),
    "truncated": (None, r"truncated\.tsv: the gzip stream is truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_malformed_file_is_one_line_naming_file_and_line(case, subset_clusters, tmp_path):
    content, message = BAD[case]
    path = tmp_path / f"{case}.tsv"
    path.write_bytes(content if content is not None else subset_clusters.read_bytes()[:20000])
    with pytest.raises(DataError, match=message) as error:
        read_clusters(path)
    assert "\n" not in str(error.value)


def test_a_file_naming_no_accession_of_the_fasta_is_refused_and_nothing_is_written(sample_fasta, tmp_path):
    clusters = tmp_path / "other.tsv"
    clusters.write_text("X1\tX1\nX1\tX2\n")
    output = tmp_path / "sample.h5"
    with pytest.raises(DataError, match=r"other\.tsv:1: names none of the 500 accessions of .*uniprot_sample"):
        build_token_store(sample_fasta, output, split=SplitSpec(clusters=str(clusters)), progress=False)
    assert list(tmp_path.iterdir()) == [clusters]


def test_a_missing_clusters_file_is_named():
    with pytest.raises(DataError, match=r"nowhere\.tsv: no such file \(clusters"):
        SplitSpec(clusters="nowhere.tsv")


def split_of_accession(store: TokenStore) -> dict[str, str]:
    return {accession: split for split in SPLITS for accession in store.accessions(split)}


def test_no_cluster_straddles_two_splits_of_real_homologs(clustered_store_path, subset_fasta, subset_clusters,
                                                          tmp_path):
    members = collections.defaultdict(list)
    for member, rep in read_tsv(subset_clusters).items():
        members[rep].append(member)
    with TokenStore(clustered_store_path) as store:
        split_of = split_of_accession(store)
    held_out = [rep for rep, group in members.items() if len(group) >= 2 and split_of[group[0]] != "train"]
    assert len(held_out) >= 50  # the held-out splits hold many real multi-member clusters
    assert all(len({split_of[m] for m in group}) == 1 for group in members.values())
    # The control: by accession alone, homologs do land in different splits (so the check above can fail).
    plain = tmp_path / "plain.h5"
    build_token_store(subset_fasta, plain, split=SplitSpec(valid_fraction=0.05, test_fraction=0.05), progress=False)
    with TokenStore(plain) as store:
        split_of = split_of_accession(store)
    assert sum(len({split_of[m] for m in group}) > 1 for group in members.values()) > 100


def test_the_store_keeps_each_record_cluster_and_unlisted_records_are_singletons(subset_fasta, subset_clusters,
                                                                                 tmp_path):
    reference = read_tsv(subset_clusters)
    partial = tmp_path / "partial.tsv.gz"  # every third line left out: those members become singletons
    with gzip.open(subset_clusters, "rt") as source, gzip.open(partial, "wt") as out:
        out.writelines(line for i, line in enumerate(source) if i % 3)
    kept = read_tsv(partial)
    output = tmp_path / "subset.h5"
    build_token_store(subset_fasta, output, split=SplitSpec(clusters=str(partial)), progress=False)
    with TokenStore(output) as store:
        assert store.has_clusters and store.attrs["clustered_records"] == len(kept) < len(reference)
        for split in SPLITS:
            expected = [key(kept.get(a, a)) for a in store.accessions(split)]
            assert store.clusters(split).tolist() == expected
            assert store.clusters(split, 2, 5).tolist() == expected[2:5]


def test_a_store_without_clusters_says_so_and_format_1_stores_are_still_read(sample_store_path, tmp_path):
    old = tmp_path / "old.h5"
    old.write_bytes(sample_store_path.read_bytes())
    with h5py.File(old, "a") as h5:
        h5.attrs["format_version"] = 1
    with TokenStore(old) as store:
        assert not store.has_clusters and len(store) == 500
        with pytest.raises(DataError, match=r"old\.h5: this token store was built without clusters; .*clusters="):
            store.clusters("train")
    with h5py.File(old, "a") as h5:
        h5.attrs["format_version"] = 3
    with pytest.raises(DataError, match=r"token store format 3, this version reads 1 and 2"):
        TokenStore(old)


def test_preprocess_takes_clusters_and_reports_them(subset_fasta, subset_clusters, tmp_path):
    result = subprocess.run([sys.executable, "-m", "protein_performer.preprocess", f"input={subset_fasta}",
                             "output=subset.h5", f"clusters={subset_clusters}", "progress=false",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "18,070 records named by" in result.stdout and "the other 0 are singletons" in result.stdout
    with TokenStore(tmp_path / "subset.h5") as store:
        assert store.has_clusters
    bad = tmp_path / "bad.tsv"
    bad.write_text("A\tA\nB\n")
    result = subprocess.run([sys.executable, "-m", "protein_performer.preprocess", f"input={subset_fasta}",
                             "output=bad.h5", f"clusters={bad}", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("preprocess: error: ")
    assert "bad.tsv:2: expected" in result.stderr and not (tmp_path / "bad.h5").exists()


def test_data_clusters_builds_its_own_cached_store(sample_fasta, sample_records, tmp_path):
    accessions = [record.accession for record in sample_records[:6]]
    clusters = tmp_path / "clusters.tsv"
    clusters.write_text("".join(f"{accessions[0]}\t{a}\n" for a in accessions))
    plain = ProteinDataModule(fasta=str(sample_fasta), cache_dir=str(tmp_path / "cache"))
    clustered = ProteinDataModule(fasta=str(sample_fasta), cache_dir=str(tmp_path / "cache"), clusters=str(clusters))
    assert plain.cache_path() != clustered.cache_path()  # the clusters file is part of the store's identity
    clustered.setup("fit")
    with TokenStore(clustered.store_path) as store:
        assert store.has_clusters and store.attrs["clustered_records"] == 6
        keys = {a: k for split in SPLITS for a, k in zip(store.accessions(split), store.clusters(split).tolist())}
    assert {keys[a] for a in accessions} == {key(accessions[0])}


def test_the_bundled_clusters_name_the_subset_members_only_with_real_homologs(subset_fasta, subset_clusters):
    with gzip.open(subset_fasta, "rt") as handle:
        accessions = {line.split("|")[1] for line in handle if line.startswith(">")}
    reference = read_tsv(subset_clusters)
    assert set(reference) == accessions  # every member of the subset, nothing else
    sizes = collections.Counter(reference.values())
    assert sum(size >= 2 for size in sizes.values()) == 2_353 and sum(size >= 5 for size in sizes.values()) == 482


def test_cluster_keys_do_not_depend_on_the_number_of_workers(subset_fasta, subset_clusters, clustered_store_path,
                                                             tmp_path):
    one = tmp_path / "one.h5"
    build_token_store(subset_fasta, one, split=SplitSpec(**SUBSET_SPLIT, clusters=str(subset_clusters)),
                      workers=1, background_reader=True, progress=False)
    with TokenStore(one) as a, TokenStore(clustered_store_path) as b:
        assert a.attrs["clustered_records"] == b.attrs["clustered_records"] == 18_070
        for split in SPLITS:
            assert a.accessions(split) == b.accessions(split)
            assert np.array_equal(a.clusters(split), b.clusters(split))
