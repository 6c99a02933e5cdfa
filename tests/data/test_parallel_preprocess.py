"""Parallel preprocessing: the same store whatever the workers and block size, errors named from workers."""
from __future__ import annotations

import gzip
import os
import pickle

import h5py
import numpy as np
import pytest

from protein_performer.data import DataError, FastaFormatError, build_token_store
from protein_performer.data import workers as workers_module
from protein_performer.data.workers import JoinedBytes, default_workers, map_in_processes

VOLATILE = {"created", "summary_seconds"}  # the build's time; everything else must be equal


def store_contents(path) -> dict:
    """Every dataset (as bytes with dtype and shape) and attribute of a store, keyed by HDF5 path."""
    contents = {}
    with h5py.File(path) as h5:
        def visit(name, item):
            if isinstance(item, h5py.Dataset):
                contents[name] = (item.dtype.str, item.shape, item[()].tobytes(), item.chunks, item.compression,
                                  item.scaleoffset)
            contents[name + "@attrs"] = {k: np.asarray(v).tolist() for k, v in item.attrs.items()}
        h5.visititems(visit)
        contents["@attrs"] = {k: np.asarray(v).tolist() for k, v in h5.attrs.items() if k not in VOLATILE}
    return contents


@pytest.fixture(scope="module", params=["one-line", "wrapped-60", "crlf", "gzip-members"])
def awkward_input(request, sample_records, tmp_path_factory, write_fasta):
    """Real sequences written four ways, with blocks of 1-4 KiB many records straddle block boundaries."""
    directory = tmp_path_factory.mktemp(request.param)
    records = [(r.description, r.sequence) for r in sample_records]
    if request.param == "one-line":
        return write_fasta(directory / "in.fasta", records)
    if request.param == "wrapped-60":
        return write_fasta(directory / "in.fasta", records, width=60)
    if request.param == "crlf":
        return write_fasta(directory / "in.fasta", records, width=80, newline="\r\n")
    text = write_fasta(directory / "plain.fasta", records, width=60).read_bytes()
    cut = text.index(b"\n>", len(text) // 3) + 1
    path = directory / "in.fasta.gz"  # as bgzip or `cat a.gz b.gz` make them
    path.write_bytes(gzip.compress(text[:cut]) + gzip.compress(text[cut:]))
    return path


@pytest.mark.parametrize("workers, block_bytes", [(1, 4096), (2, 1024), (4, 1 << 16), (2, None)],
                         ids=["1w-4KiB", "2w-1KiB", "4w-64KiB", "2w-default"])
def test_the_store_does_not_depend_on_workers_or_block_size(workers, block_bytes, awkward_input, sample_split,
                                                            tmp_path):
    reference = tmp_path / "reference.h5"
    build_token_store(awkward_input, reference, split=sample_split, background_reader=False, progress=False)
    parallel = tmp_path / "parallel.h5"
    build_token_store(awkward_input, parallel, split=sample_split, workers=workers, block_bytes=block_bytes,
                      progress=False)
    expected, got = store_contents(reference), store_contents(parallel)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key
    assert expected["train@attrs"]["records"] > 400  # a real store, not two empty ones


@pytest.mark.parametrize("workers", [1, 3])
def test_a_bad_record_in_a_worker_names_its_file_and_line(workers, sample_records, tmp_path, write_fasta):
    records = [(r.description, r.sequence) for r in sample_records]
    path = write_fasta(tmp_path / "bad.fasta", records, width=60)
    lines = path.read_bytes().split(b"\n")
    target = len(lines) * 3 // 4  # in a late block, far from the first worker's
    target += lines[target].startswith(b">")
    lines[target] = lines[target][:5] + b"\x01" + lines[target][5:]
    path.write_bytes(b"\n".join(lines))
    header = max(i for i in range(target) if lines[i].startswith(b">")) + 1
    with pytest.raises(FastaFormatError, match=rf"bad\.fasta:{header}: binary data \(byte 0x01\) in the sequence"):
        build_token_store(path, tmp_path / "out.h5", workers=workers, block_bytes=2048, progress=False)
    assert not list(tmp_path.glob("*.h5*"))


def test_results_come_back_in_task_order_and_bugs_bring_their_traceback():
    assert list(map_in_processes(lambda x: x * x, range(50), workers=3)) == [x * x for x in range(50)]
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        list(map_in_processes(lambda x: 1 // (x - 7), range(20), workers=2))
    assert 1 <= default_workers() <= 8


def _arrays(x: int) -> dict:
    """Arrays that travel out of band (large, empty, Fortran order), one that does not (a strided view)."""
    rng = np.random.default_rng(x)
    big = rng.integers(0, 2**40, size=300_000 + x)  # 2.4 MB: more than a pipe holds
    return {"big": big, "empty": np.zeros(0, np.uint8), "fortran": np.asfortranarray(rng.random((5, 7))),
            "strided": big[::3], "tokens": rng.integers(0, 33, size=x, dtype=np.uint8), "x": x}


def test_numpy_results_arrive_whole_and_in_order():
    got = list(map_in_processes(_arrays, range(6), workers=2))
    assert [r["x"] for r in got] == list(range(6))
    for x, result in enumerate(got):
        expected = _arrays(x)
        for name in ("big", "empty", "fortran", "strided", "tokens"):
            assert result[name].dtype == expected[name].dtype and result[name].shape == expected[name].shape
            np.testing.assert_array_equal(result[name], expected[name])
        assert result["fortran"].flags.f_contiguous


def _block(x: int) -> bytes:
    return np.random.default_rng(x).integers(0, 256, size=(3 << 20) + x, dtype=np.uint8).tobytes()


def test_large_bytes_tasks_arrive_whole_as_bytes():
    """Blocks of FASTA travel to the workers beside the pickle (out of band): still bytes, every byte there."""
    tasks = [(x, _block(x), b"small") for x in range(5)]
    got = list(map_in_processes(lambda task: (type(task[1]), hash(task[1]), task[2]), tasks, workers=2))
    assert got == [(bytes, hash(block), b"small") for _, block, _ in tasks]
    buffers = []
    pickle.dumps(workers_module._large_bytes_out_of_band(tasks[0]), protocol=5, buffer_callback=buffers.append)
    assert [len(buffer.raw()) for buffer in buffers] == [len(tasks[0][1])]  # the block, not b"small"
    # A block still in pieces (bytes and views of them, as inflated) arrives joined, as one bytes object.
    pieces = [[_block(x), memoryview(_block(x + 1))[5:-7], b"", b"tail"] for x in range(3)]
    got = list(map_in_processes(lambda task: (type(task), hash(task)), [JoinedBytes(p) for p in pieces], workers=2))
    assert got == [(bytes, hash(b"".join(p))) for p in pieces]


def test_a_worker_that_dies_is_reported_not_waited_for():
    def die_at_three(x):
        if x == 3:
            os._exit(7)
        return x

    with pytest.raises(RuntimeError, match=r"worker 1 died \(exit code 7\)"):
        list(map_in_processes(die_at_three, range(10), workers=2))



def _cath_records(sample_records):
    """Real sequences under CATH domain headers (`>cath|4_1_0|102mA00/0-153`): not UniProt `db|ACC|NAME`."""
    return [(f"cath|4_1_0|{r.accession.lower()}A00/0-{len(r.sequence)}", r.sequence) for r in sample_records]


def test_cath_headers_keep_their_first_word_and_spread_over_the_splits(sample_records, tmp_path, write_fasta, caplog):
    from protein_performer.data import SplitSpec, TokenStore

    path = write_fasta(tmp_path / "cath.fasta", _cath_records(sample_records), width=60)
    with caplog.at_level("WARNING"):
        build_token_store(path, tmp_path / "cath.h5", split=SplitSpec(0.1, 0.1), workers=2, progress=False)
    assert not [r for r in caplog.records if "repeat" in r.message]
    with TokenStore(tmp_path / "cath.h5") as store:
        counts = store.record_counts()
        assert counts["valid"] > 20 and counts["test"] > 20 and sum(counts.values()) == 500
        accessions = [store.accession(i) for i in range(len(store))]
    assert len(set(accessions)) == 500 and all(a.startswith("cath|4_1_0|") for a in accessions)


def test_repeated_accessions_are_refused_in_one_line_above_the_limit(sample_fasta, tmp_path):
    path = tmp_path / "twice.fasta"
    path.write_bytes(sample_fasta.read_bytes() * 2)
    with pytest.raises(DataError) as caught:
        build_token_store(path, tmp_path / "out.h5", workers=2, progress=False)
    message = str(caught.value)
    assert "\n" not in message and "twice.fasta: 500 of 1,000 records (50.0%) repeat an accession" in message
    assert "e.g. A7TBS3 x2, Q8WWJ3 x2, H6QJ35 x2" in message and "allow_duplicates=true" in message
    assert not list(tmp_path.glob("*.h5*"))
    summary = build_token_store(path, tmp_path / "out.h5", allow_duplicates=True, workers=2, progress=False)
    assert summary.records == 1000


def test_a_few_repeats_are_kept_with_a_warning(sample_fasta, sample_records, tmp_path, caplog):
    path = tmp_path / "few.fasta"
    lines = sample_fasta.read_bytes().split(b"\n")
    path.write_bytes(sample_fasta.read_bytes() + b"\n".join(lines[:4]) + b"\n")  # the first 2 records again
    with caplog.at_level("WARNING"):
        summary = build_token_store(path, tmp_path / "out.h5", workers=1, progress=False)
    assert summary.records == 502
    [warning] = [r.message for r in caplog.records if "repeat" in r.message]
    assert "2 of 502 records (0.4%) repeat an accession seen before (e.g. A7TBS3 x2, Q8WWJ3 x2); kept" in warning


def test_repeats_are_estimated_from_a_hash_sample_in_bounded_memory(sample_fasta, tmp_path, monkeypatch):
    from protein_performer.data import store_writer

    monkeypatch.setattr(store_writer, "_DUPLICATE_SAMPLE", 100)  # 1,000 records: sampled 1/16 or so
    path = tmp_path / "twice.fasta"
    path.write_bytes(sample_fasta.read_bytes() * 2)
    with pytest.raises(DataError, match=r"of 1,000 records \(\d+\.\d%, estimated from a 1/(\d+) sample\)") as caught:
        build_token_store(path, tmp_path / "out.h5", workers=1, progress=False)
    repeats = int(str(caught.value).split(": ")[1].split(" of")[0].replace(",", ""))
    assert 250 <= repeats <= 1000  # 500 in truth
