"""Splits: a pinned hash of the accession decides, so file order and sharding never move a record."""
from __future__ import annotations

import numpy as np
import pytest

from protein_performer.data import DataError, SplitSpec, TokenStore, accession_hash, build_token_store
from protein_performer.data.splits import SPLITS, accession_hashes, hash_to_unit

MASK64 = (1 << 64) - 1


def splitmix64_finaliser(h: int) -> int:
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK64
    return h ^ (h >> 31)


def test_hash_is_fnv1a_with_the_splitmix_finaliser():
    # FNV-1a 64 test vectors (Fowler, Noll, Vo): "" and "a".
    assert accession_hash(b"") == splitmix64_finaliser(0xCBF29CE484222325)
    assert accession_hash(b"a") == splitmix64_finaliser(0xAF63DC4C8601EC8C)


@pytest.mark.parametrize("accession, value", [
    (b"P69905", 0x923DAFC6734F85F9),
    (b"A7TBS3", 0x2793D6F105C6FC1B),
    (b"UniRef50_Q6GZX4", 0x3016A90EF104A908),
])
def test_hash_values_are_pinned(accession, value):
    """Changing the hash would silently move records between train and test of existing stores."""
    assert accession_hash(accession) == value


def test_vectorised_hashes_equal_the_reference(sample_records):
    accessions = [r.accession for r in sample_records] + [r.description for r in sample_records[:20]]
    accessions += ["", "x", "UniRef100_A0A0A0A0A0A0A0A0"]
    text = "".join(accessions).encode()
    lengths = np.array([len(a) for a in accessions])
    start = np.cumsum(lengths) - lengths
    hashes = accession_hashes(text, start, start + lengths)
    assert hashes.tolist() == [accession_hash(a.encode()) for a in accessions]


def test_split_fractions_follow_the_settings():
    # 200,000 accessions in UniProt's format (a math property: synthetic keys are fine here).
    ids = [f"A0A{i:07X}" for i in range(0, 200_000 * 7919, 7919)]
    text = "".join(ids).encode()
    lengths = np.array([len(a) for a in ids])
    start = np.cumsum(lengths) - lengths
    u = hash_to_unit(accession_hashes(text, start, start + lengths))
    assert 0.0 <= u.min() and u.max() < 1.0
    for fraction in (0.001, 0.01, 0.05, 0.5):
        share = np.mean(u < fraction)
        assert abs(share - fraction) < 4 * np.sqrt(fraction * (1 - fraction) / len(ids)), fraction


def split_of_each_accession(path) -> dict[str, str]:
    with TokenStore(path) as store:
        return {accession: split for split in SPLITS for accession in store.accessions(split)}


def test_split_depends_on_the_accession_only_not_on_file_order_or_sharding(
        sample_store_path, sample_records, sample_split, tmp_path, write_fasta):
    reference = split_of_each_accession(sample_store_path)
    assert sorted(reference) == sorted(r.accession for r in sample_records)  # each record in exactly one split
    shuffled = [sample_records[i] for i in np.random.default_rng(0).permutation(len(sample_records))]
    write_fasta(tmp_path / "shard0.fasta.gz", [(r.description, r.sequence) for r in shuffled[:123]])
    write_fasta(tmp_path / "shard1.fasta", [(r.description, r.sequence) for r in shuffled[123:]], width=60)
    build_token_store(str(tmp_path / "shard*"), tmp_path / "shards.h5", split=sample_split, chunk_records=17,
                      background_reader=False, progress=False)
    assert split_of_each_accession(tmp_path / "shards.h5") == reference
    assert {s: list(reference.values()).count(s) > 0 for s in SPLITS} == dict.fromkeys(SPLITS, True)


def test_ood_records_are_held_out_of_every_other_split(sample_fasta, sample_records, tmp_path):
    listed = [sample_records[i].accession for i in (3, 30, 300)]
    (tmp_path / "ood.txt").write_text("# held out\n" + "\n".join(listed) + "\n\n")
    spec = SplitSpec(valid_fraction=0.2, test_fraction=0.2, ood_accessions=str(tmp_path / "ood.txt"),
                     ood_regex=r"OS=Homo sapiens|OS=Mus musculus")
    build_token_store(sample_fasta, tmp_path / "s.h5", split=spec, progress=False)
    splits = split_of_each_accession(tmp_path / "s.h5")
    expected = {r.accession for r in sample_records
                if r.accession in listed or "OS=Homo sapiens" in r.description or "OS=Mus musculus" in r.description}
    assert len(expected) == 3 + 8 + 5
    assert {a for a, s in splits.items() if s == "ood"} == expected
    assert len(splits) == 500  # each accession in one split only


@pytest.mark.parametrize("settings, message", [
    (dict(valid_fraction=0.6, test_fraction=0.5), "must be < 1"),
    (dict(valid_fraction=-0.1), r"valid_fraction must be in \[0, 1\)"),
    (dict(ood_regex="OS=(Homo"), "not a valid regular expression"),
    (dict(ood_accessions="no-such-list.txt"), "no-such-list.txt: no such file"),
])
def test_bad_split_settings_are_explained(settings, message):
    with pytest.raises(DataError, match=message):
        SplitSpec(**settings)
