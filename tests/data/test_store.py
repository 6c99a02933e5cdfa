"""The token store: what goes in comes out, the summary is right, and failures leave nothing behind."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest

from protein_performer.data import DataError, FastaFormatError, SplitSpec, TokenStore, build_token_store
from protein_performer.data.splits import SPLITS, SplitAssigner, accession_hash
from protein_performer.data import store_writer
from protein_performer.data.store_writer import _ChunkEncoder


def test_every_record_comes_back(sample_store, sample_records, alphabet, sample_split):
    assigner = SplitAssigner(sample_split)
    by_accession = {r.accession: r for r in sample_records}
    assert len(sample_store) == 500
    seen = set()
    for i in range(len(sample_store)):
        record = by_accession[sample_store.accession(i)]
        np.testing.assert_array_equal(sample_store.tokens(i), alphabet.encode(record.sequence))
        assert sample_store.length(i) == len(record.sequence)
        code = assigner.assign(np.array([accession_hash(record.accession.encode())], dtype=np.uint64),
                               [record.accession.encode()], [record.description.encode()])[0]
        assert sample_store.split(i) == SPLITS[code]
        seen.add(record.accession)
    assert len(seen) == 500


def test_records_keep_their_input_order_within_a_split(sample_store, sample_records):
    order = {r.accession: k for k, r in enumerate(sample_records)}
    for split in SPLITS:
        positions = [order[a] for a in sample_store.accessions(split)]
        assert positions == sorted(positions)


def test_summary_is_printed_and_stored(sample_store, sample_records):
    summary = sample_store.summary
    lengths = np.array([len(r.sequence) for r in sample_records])
    assert (summary.records, summary.residues, summary.skipped_empty, summary.unknown) == (500, lengths.sum(), 0, 0)
    assert (summary.length_min, summary.length_max, summary.longer_than_1024) == (8, 4291, 43)
    assert summary.length_quantiles["p50"] == int(np.quantile(lengths, 0.5, method="inverted_cdf")) == 360
    assert summary.split_records == sample_store.split_sizes and summary.split_records["ood"] == 8
    assert sum(summary.split_residues.values()) == lengths.sum()
    text = summary.format()
    assert "500" in text and "4,291" in text and "ood" in text
    attrs = sample_store.attrs
    assert attrs["format_version"] == 2 and "OS=Homo sapiens" in attrs["split_spec"]


@pytest.mark.parametrize("options", [
    dict(compression="none", chunk_records=1, background_reader=False),
    dict(compression="lzf", chunk_records=33, background_reader=True),
    dict(compression="gzip", chunk_records=4096, background_reader=True, compression_threads=0),
], ids=["none-1", "lzf-33", "gzip-4096-inline"])
def test_contents_do_not_depend_on_compression_chunking_or_reader(options, sample_fasta, sample_store_path,
                                                                   sample_split, tmp_path):
    path = tmp_path / "other.h5"
    build_token_store(sample_fasta, path, split=sample_split, progress=False, **options)
    with h5py.File(sample_store_path) as reference, h5py.File(path) as other:
        for split in SPLITS:
            for name in ("tokens", "offsets", "accessions", "accession_offsets"):
                np.testing.assert_array_equal(reference[split][name][:], other[split][name][:])


@pytest.mark.parametrize("compression, filter_of, largest", [
    ("scaleoffset", lambda d: d.scaleoffset == 0, 0.65),  # 5 bits per token
    ("gzip", lambda d: d.compression == "gzip", 0.6),
])
def test_store_is_chunked_compressed_and_readable_by_plain_h5py(compression, filter_of, largest, sample_fasta,
                                                               sample_records, alphabet, tmp_path):
    # Three copies of the sample: 737k residues, so full 256 KiB chunks are written (for gzip the
    # writer deflates those itself, Huffman only, in threads, and hands them to HDF5 precompressed).
    (tmp_path / "x3.fasta").write_bytes(sample_fasta.read_bytes() * 3)
    build_token_store(tmp_path / "x3.fasta", tmp_path / "x3.h5", split=SplitSpec(0.0, 0.0), progress=False,
                      compression=compression)
    expected = np.concatenate([alphabet.encode(r.sequence) for r in sample_records] * 3)
    with h5py.File(tmp_path / "x3.h5") as h5:
        tokens = h5["train/tokens"]
        assert filter_of(tokens) and tokens.chunks == (1 << 18,) and tokens.dtype == np.uint8
        assert tokens.shape[0] == len(expected) > 2 * tokens.chunks[0]
        np.testing.assert_array_equal(tokens[:], expected)
        capacity = -(-tokens.shape[0] // tokens.chunks[0]) * tokens.chunks[0]  # the last chunk is padded
        assert tokens.id.get_storage_size() < largest * capacity
        offsets = h5["train/offsets"][:]
        assert offsets.dtype == np.int64 and offsets[0] == 0 and len(offsets) == 1501
        assert np.diff(offsets).tolist() == [len(r.sequence) for r in sample_records] * 3


def test_empty_sequences_are_skipped_and_counted(sample_records, tmp_path, write_fasta, alphabet):
    records = [(r.description, r.sequence) for r in sample_records[:5]]
    records.insert(1, ("sp|EMPTY1|NONE_HUMAN nothing", ""))
    records.insert(3, ("sp|GAPS|GAP_HUMAN gaps and a stop", "--..-*"))
    records.append(("tr|ODD|ODD stops and unknowns", "mkjv*"))
    path = write_fasta(tmp_path / "holes.fasta", records, width=3)
    summary = build_token_store(path, tmp_path / "holes.h5", split=SplitSpec(0.0, 0.0), progress=False)
    assert (summary.records, summary.skipped_empty, summary.unknown) == (6, 2, 1)
    with TokenStore(tmp_path / "holes.h5") as store:
        assert store.accessions("train") == [r.accession for r in sample_records[:5]] + ["ODD"]
        assert alphabet.decode(store.tokens(5)) == "MK<unk>V"


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".h5", ".tmp"))


def test_bad_input_anywhere_in_a_glob_fails_before_writing(sample_fasta, tmp_path):
    (tmp_path / "a.fasta").write_bytes(sample_fasta.read_bytes())
    (tmp_path / "b.fasta").write_bytes(b"This is a README, not FASTA\n")
    with pytest.raises(FastaFormatError, match=r"b\.fasta:1: text before the first '>'"):
        build_token_store(str(tmp_path / "*.fasta"), tmp_path / "out.h5", progress=False)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("background_reader", [True, False], ids=["background", "foreground"])
def test_binary_data_midway_names_the_line_and_leaves_no_output(background_reader, sample_fasta, tmp_path):
    lines = sample_fasta.read_bytes().split(b"\n")
    lines[701] = lines[701][:10] + b"\x00\x01\x02" + lines[701][10:]  # a sequence line of record 351
    path = tmp_path / "damaged.fasta"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(FastaFormatError, match=r"damaged\.fasta:701: binary data \(byte 0x00\) in the sequence"):
        build_token_store(path, tmp_path / "out.h5", chunk_records=64, background_reader=background_reader,
                          progress=False)
    assert leftovers(tmp_path) == []


def test_an_interrupted_build_leaves_no_output(sample_fasta, tmp_path, monkeypatch):
    calls = []

    def interrupt(self, chunk, summary):
        calls.append(chunk)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, chunk, summary)

    original = _ChunkEncoder.__call__
    monkeypatch.setattr(_ChunkEncoder, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(sample_fasta, tmp_path / "out.h5", chunk_records=50, progress=False)
    assert leftovers(tmp_path) == []


def test_an_existing_output_is_replaced_only_when_asked(sample_fasta, tmp_path):
    output = tmp_path / "out.h5"
    output.write_bytes(b"precious")
    with pytest.raises(DataError, match="out.h5: already exists; pass overwrite=true"):
        build_token_store(sample_fasta, output, progress=False)
    assert output.read_bytes() == b"precious"
    build_token_store(sample_fasta, output, overwrite=True, progress=False)
    assert len(TokenStore(output)) == 500 and leftovers(tmp_path) == ["out.h5"]


def test_stale_temporaries_of_killed_builds_are_removed_never_reused(sample_fasta, tmp_path):
    """A SIGKILLed build leaves <stem>.<host>-<pid>-<token>.h5.tmp; the next build removes it if <pid> is gone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # has exited: nothing runs under this pid (unless reused within the test)
    host = store_writer._HOST
    stale = tmp_path / f"out.{host}-{dead_pid}-0123abcd.h5.tmp"
    old_style = tmp_path / f"out.{dead_pid}-89abcdef.h5.tmp"  # before host names were part of the name
    running = tmp_path / f"out.{host}-{os.getpid()}-00000000.h5.tmp"  # a build still in progress
    elsewhere = tmp_path / f"out.another-host-{dead_pid}-11111111.h5.tmp"  # another machine's, on a shared disk
    unrelated = tmp_path / f"other.{host}-{dead_pid}-22222222.h5.tmp"
    for path in (stale, old_style, running, elsewhere, unrelated):
        path.write_bytes(b"half a store")
    build_token_store(sample_fasta, tmp_path / "out.h5", progress=False)
    assert leftovers(tmp_path) == sorted([p.name for p in (running, elsewhere, unrelated)] + ["out.h5"])
    assert len(TokenStore(tmp_path / "out.h5")) == 500


def test_output_that_is_an_input_or_not_hdf5_is_refused(sample_fasta, tmp_path):
    fasta = tmp_path / "proteins.fasta"
    fasta.write_bytes(sample_fasta.read_bytes())
    with pytest.raises(DataError, match="proteins.fasta: this output is also an input"):
        build_token_store(fasta, fasta, overwrite=True, any_suffix=True, progress=False)
    assert fasta.read_bytes() == sample_fasta.read_bytes()
    with pytest.raises(DataError, match=r"out\.fa: a token store is an HDF5 file.*any_suffix=true"):
        build_token_store(fasta, tmp_path / "out.fa", progress=False)
    build_token_store(fasta, tmp_path / "out.tokens", any_suffix=True, progress=False)
    assert len(TokenStore(tmp_path / "out.tokens")) == 500


def test_unwritable_output_directory_is_one_clear_error(sample_fasta, tmp_path, monkeypatch):
    # (The suite may run as root, for whom no directory is read-only: the permission answer is faked.)
    monkeypatch.setattr(store_writer.os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match=rf"{tmp_path}: no permission to write in this directory"):
        build_token_store(sample_fasta, tmp_path / "out.h5", progress=False)
    assert leftovers(tmp_path) == []


def test_opening_something_else_is_explained(tmp_path):
    with pytest.raises(DataError, match="no such token store"):
        TokenStore(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = [1, 2, 3]
    with pytest.raises(DataError, match="not a protein_performer token store"):
        TokenStore(tmp_path / "other.h5")


def test_a_store_pickles_without_its_file_handle(sample_store):
    first = sample_store.tokens(0)
    copy = pickle.loads(pickle.dumps(sample_store))
    assert copy._file is None
    np.testing.assert_array_equal(copy.tokens(0), first)
    assert copy.locate(-1) == ("ood", 7) and copy.split(0) == "train"
    with pytest.raises(IndexError):
        copy.locate(500)
