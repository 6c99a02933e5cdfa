"""The token store: what goes in comes out, the summary is right, and failures leave nothing behind."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest

from protein_performer.data import DataError, FastaFormatError, SplitSpec, TokenStore, build_token_store, read_fasta
from protein_performer.data.splits import SPLITS, SplitAssigner, accession_hash
from protein_performer import errors
from protein_performer.data import store_writer


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


def test_token_and_record_counts_are_recorded_per_split(sample_store, sample_records, alphabet):
    counts = sample_store.token_counts
    assert set(counts) == set(SPLITS)
    for split in SPLITS:
        tokens = sample_store.read_tokens(split, 0, sample_store.split_residues[split])
        expected = np.bincount(tokens, minlength=len(alphabet))
        assert counts[split].dtype == np.int64 and counts[split].shape == (len(alphabet),)
        np.testing.assert_array_equal(counts[split], expected)
    assert sum(c.sum() for c in counts.values()) == sum(len(r.sequence) for r in sample_records)
    records = sample_store.record_counts()
    assert records == {split: len(sample_store.accessions(split)) for split in SPLITS}
    assert sum(records.values()) == 500 and records["ood"] == 8


def _as_format_1(source, path):
    """A copy of a store as this project wrote it before format 2: no token_counts datasets."""
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "a") as h5:
        h5.attrs["format_version"] = 1
        for split in SPLITS:
            del h5[split]["token_counts"]
    return path


def test_a_format_1_store_estimates_its_token_counts_from_a_sample_and_says_so_once(sample_store_path, sample_store,
                                                                                   tmp_path, caplog, monkeypatch):
    from protein_performer.data import store as store_module

    old = _as_format_1(sample_store_path, tmp_path / "old.h5")
    with TokenStore(old) as store, caplog.at_level("WARNING"):
        exact = store.token_counts  # the sample store is small: the "sample" is the whole split
        again = store.token_counts
        assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
        assert "format-1" in caplog.records[0].message and "sample" in caplog.records[0].message
    for split in SPLITS:
        np.testing.assert_array_equal(exact[split], sample_store.token_counts[split])
        assert again[split] is exact[split]
    monkeypatch.setattr(store_module, "_SAMPLE_WINDOWS", 8)
    monkeypatch.setattr(store_module, "_SAMPLE_WINDOW_TOKENS", 512)
    with TokenStore(old) as store:
        sampled = store.token_counts["train"]
    truth = sample_store.token_counts["train"]
    assert abs(int(sampled.sum()) - int(truth.sum())) <= len(truth)  # scaled to the split's residues
    assert not np.array_equal(sampled, truth)  # 4 Ki of ~150 Ki tokens: an estimate...
    share, true_share = sampled / sampled.sum(), truth / truth.sum()
    assert np.abs(share - true_share).max() < 0.02  # ...close to the real frequencies


@pytest.mark.parametrize("options", [
    dict(compression="scaleoffset", chunk_records=1, background_reader=False),  # the default is none
    dict(compression="lzf", chunk_records=33, background_reader=True),
    dict(compression="gzip", chunk_records=4096, background_reader=True, compression_threads=0),
], ids=["scaleoffset-1", "lzf-33", "gzip-4096-inline"])
def test_contents_do_not_depend_on_compression_chunking_or_reader(options, sample_fasta, sample_store_path,
                                                                   sample_split, tmp_path):
    path = tmp_path / "other.h5"
    build_token_store(sample_fasta, path, split=sample_split, progress=False, **options)
    with h5py.File(sample_store_path) as reference, h5py.File(path) as other:
        for split in SPLITS:
            for name in ("tokens", "offsets", "accessions", "accession_offsets"):
                np.testing.assert_array_equal(reference[split][name][:], other[split][name][:])


@pytest.mark.parametrize("storage", ["plain", "deflated-here", "shuffled-by-hdf5", "scaleoffset-by-hdf5"])
def test_appended_pieces_of_any_size_land_as_one_array(storage, tmp_path):
    # Pieces shorter than a chunk, spanning chunk boundaries and many chunks long, in one order: full
    # chunks are written straight from the piece they lie in (or, spanning two, from a joined buffer);
    # the partial rest at close goes through HDF5. What is read back is the plain concatenation.
    rng = np.random.default_rng(0)
    chunk = 64
    sizes = [3, 61, 0, 64, 1, 200, 5, 127, 128, 2, 700, 63, 1]
    dtype = np.int64 if "hdf5" in storage else np.uint8
    pieces = [rng.integers(0, 25, size, dtype=dtype) for size in sizes]
    options = {"plain": {}, "deflated-here": dict(compression="gzip"),
               "shuffled-by-hdf5": dict(compression="gzip", shuffle=True),
               "scaleoffset-by-hdf5": dict(scaleoffset=0)}[storage]
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        dataset = h5.create_dataset("x", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,), **options)
        compress = store_writer._deflate_huffman if storage == "deflated-here" else None
        appender = store_writer._ChunkedAppender(dataset, compress, executor=None, max_in_flight=2)
        assert appender.direct == (storage in ("plain", "deflated-here"))
        for piece in pieces:
            appender.append(piece)
            assert appender.pending_size < chunk  # never more than one chunk held back
        appender.close()
    with h5py.File(tmp_path / "a.h5") as h5:
        np.testing.assert_array_equal(h5["x"][:], np.concatenate(pieces))


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
                      compression=compression, allow_duplicates=True)
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


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
def test_an_interrupted_build_leaves_no_output(workers, sample_fasta, tmp_path, monkeypatch):
    calls = []

    def interrupt(self, part):
        calls.append(part)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, part)

    original = store_writer._SplitWriter.append
    monkeypatch.setattr(store_writer._SplitWriter, "append", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(sample_fasta, tmp_path / "out.h5", chunk_records=50, block_bytes=4096,
                          background_reader=workers > 0, workers=workers or None, progress=False)
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
    other_store = tmp_path / f"other.{host}-{dead_pid}-22222222.h5.tmp"  # a cache's other store: removed too
    other_running = tmp_path / f"other.{host}-{os.getpid()}-33333333.h5.tmp"
    not_ours = tmp_path / "notes.tmp"
    for path in (stale, old_style, running, elsewhere, other_store, other_running, not_ours):
        path.write_bytes(b"half a store")
    build_token_store(sample_fasta, tmp_path / "out.h5", progress=False)
    assert leftovers(tmp_path) == sorted([p.name for p in (running, elsewhere, other_running, not_ours)] + ["out.h5"])
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
    # (The suite may run as root, for whom no directory is read-only: the file system's answer is faked.)
    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(errors.tempfile, "TemporaryFile", refuse)
    with pytest.raises(DataError, match=rf"{tmp_path}: cannot write in this directory \(Permission denied\)"):
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


def test_a_store_of_an_unknown_format_is_refused_in_one_line(sample_store_path, tmp_path):
    path = tmp_path / "future.h5"
    path.write_bytes(sample_store_path.read_bytes())
    with h5py.File(path, "a") as h5:
        h5.attrs["format_version"] = 3
    with pytest.raises(DataError, match=r"future\.h5: token store format 3, this version reads 1 and 2; rebuild"):
        TokenStore(path)


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("reader", ["background", "foreground", "read_fasta"])
def test_a_digit_in_a_sequence_line_names_that_line(reader, newline, sample_records, tmp_path, write_fasta):
    records = [(r.description, r.sequence) for r in sample_records[:300]]
    path = write_fasta(tmp_path / "numbered.fasta", records, width=60, newline=newline)
    lines = path.read_bytes().split(newline.encode())
    header = next(i for i, line in enumerate(lines) if line.startswith(b">" + records[250][0][:30].encode()))
    target = header + 3  # the third sequence line of record 250 (0-based line index)
    assert not lines[target].startswith(b">")
    lines[target] = lines[target][:17] + b"7" + lines[target][17:]
    path.write_bytes(newline.encode().join(lines))
    message = rf"numbered\.fasta:{target + 1}: digit '7' in a sequence line"
    with pytest.raises(FastaFormatError, match=message):
        if reader == "read_fasta":
            list(read_fasta(path))
        else:
            build_token_store(path, tmp_path / "out.h5", chunk_records=64, background_reader=reader == "background",
                              progress=False)
    assert leftovers(tmp_path) == []


def test_stops_gaps_and_lowercase_are_kept_as_before(sample_records, tmp_path, write_fasta, alphabet):
    sequence = sample_records[0].sequence
    odd = sequence[:5].lower() + "-." + sequence[5:20] + "*" + sequence[20:] + "*"
    path = write_fasta(tmp_path / "odd.fasta", [("odd1", odd), (sample_records[1].description, sample_records[1].sequence)])
    build_token_store(path, tmp_path / "odd.h5", split=SplitSpec(0.0, 0.0), progress=False)
    with TokenStore(tmp_path / "odd.h5") as store:
        np.testing.assert_array_equal(store.tokens(0), alphabet.encode(odd))
        assert store.summary.unknown == 1  # the inner '*'
