"""Parallel preprocessing: the same store whatever the workers and block size, errors named from workers."""
from __future__ import annotations

import gzip

import h5py
import numpy as np
import pytest

from protein_performer.data import FastaFormatError, build_token_store
from protein_performer.data.workers import default_workers, map_in_processes

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


@pytest.fixture(scope="module", params=["wrapped-60", "crlf", "gzip-members"])
def awkward_input(request, sample_records, tmp_path_factory, write_fasta):
    """Real sequences written three ways, with blocks of 1-4 KiB many records straddle block boundaries."""
    directory = tmp_path_factory.mktemp(request.param)
    records = [(r.description, r.sequence) for r in sample_records]
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

