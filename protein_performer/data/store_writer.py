"""Writing the HDF5 token store: FASTA chunks in, the layout of store.py out, in constant memory.

`build_token_store` reads FASTA chunks (in a background process by default), encodes each chunk with
the Alphabet, assigns splits from accession hashes, and appends each split's records to chunked,
compressed datasets, deflating in a thread pool. It writes a temporary file beside the output and
renames it when complete; `remove_stale_temporaries` cleans up after builds that were killed.
"""
from __future__ import annotations

import gc
import glob
import json
import logging
import os
import re
import secrets
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
from tqdm import tqdm

from protein_performer.data.alphabet import Alphabet
from protein_performer.data.errors import DataError, FastaFormatError
from protein_performer.data.fasta import PathInput, accession_spans, check_fasta, expand_inputs, header_line_of_record
from protein_performer.data.fasta_chunks import FastaChunk, read_fasta_chunks, read_fasta_chunks_in_background
from protein_performer.data.splits import SPLITS, SplitAssigner, SplitSpec, accession_hashes
from protein_performer.data.store import (
    COMPRESSIONS,
    FORMAT,
    FORMAT_VERSION,
    HDF5_SUFFIXES,
    StoreSummary,
    input_identity,
)
from protein_performer.errors import describe_os_error, make_output_directory, raise_if_interrupted

__all__ = ["build_token_store", "remove_stale_temporaries"]

log = logging.getLogger(__name__)

_TOKEN_CHUNK = 1 << 18  # elements per HDF5 chunk: 256 KiB of tokens, a few hundred proteins
_OFFSET_CHUNK = 1 << 15  # 256 KiB of int64 offsets
_HISTOGRAM_CAP = 1 << 17  # exact length statistics up to 131,072 residues (UniProt's longest: 74,488)
_QUANTILES = {"p10": 0.10, "p50": 0.50, "p90": 0.90, "p99": 0.99}


def _deflate_huffman(data: bytes) -> bytes:
    """A zlib stream (what HDF5's gzip filter reads) with Huffman coding only, no LZ77 matching.

    Residues barely repeat, so string matching is wasted work: Huffman-only is about 2x faster than
    level 1 and smaller (53% vs 60% of the input on UniProt).
    """
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return compressor.compress(data) + compressor.flush()


class _ChunkedAppender:
    """Appends to a resizable 1-D dataset in whole HDF5 chunks.

    A compressed chunk is then written once and never read back, decompressed, patched and
    recompressed, which is what small appends to a compressed dataset would cost. Holds at most one
    chunk plus one append in memory, and a few chunks in compression.

    With `compress`, full chunks are compressed here (in `executor`'s threads: zlib releases the
    GIL) and stored with `write_direct_chunk`; the last, partial chunk goes through HDF5's own
    filter. Both are plain deflate streams, so any HDF5 reader decodes them.
    """

    def __init__(self, dataset: h5py.Dataset, compress: Callable[[bytes], bytes] | None = None,
                 executor: ThreadPoolExecutor | None = None, max_in_flight: int = 4) -> None:
        self.dataset = dataset
        self.chunk = dataset.chunks[0]
        self.compress = compress
        self.executor = executor
        self.pending: list[np.ndarray] = []
        self.pending_size = 0
        self.in_flight: deque[tuple[int, Future[bytes]]] = deque()
        self.max_in_flight = max_in_flight  # chunks being compressed at once: bounds memory

    def append(self, values: np.ndarray) -> None:
        if len(values):
            self.pending.append(values)
            self.pending_size += len(values)
            if self.pending_size >= self.chunk:
                self._write(final=False)

    def close(self) -> None:
        self._write(final=True)
        self._drain(0)

    def _write(self, final: bool) -> None:
        if not self.pending_size:
            return
        values = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        full = len(values) // self.chunk * self.chunk
        count = len(values) if final else full
        size = self.dataset.shape[0]
        self.dataset.resize((size + count,))
        if self.compress is None:
            self.dataset[size:size + count] = values[:count]
        else:
            for begin in range(0, full, self.chunk):
                data = values[begin:begin + self.chunk].tobytes()
                future = (self.executor.submit(self.compress, data) if self.executor is not None
                          else _done(self.compress(data)))
                self.in_flight.append((size + begin, future))
                self._drain(self.max_in_flight)
            if count > full:
                self.dataset[size + full:size + count] = values[full:count]
        rest = values[count:]
        self.pending = [rest] if len(rest) else []
        self.pending_size = len(rest)

    def _drain(self, keep: int) -> None:
        while len(self.in_flight) > keep:
            offset, future = self.in_flight.popleft()
            self.dataset.id.write_direct_chunk((offset,), future.result())


def _done(value: bytes) -> Future[bytes]:
    future: Future[bytes] = Future()
    future.set_result(value)
    return future


class _SplitWriter:
    """The four datasets of one split."""

    def __init__(self, group: h5py.Group, compression: dict[str, Any], executor: ThreadPoolExecutor | None) -> None:
        self.group = group
        compress = _deflate_huffman if compression.get("compression") == "gzip" else None
        self.tokens = _ChunkedAppender(group.create_dataset(
            "tokens", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(_TOKEN_CHUNK,), **compression),
            compress, executor)
        self.accessions = _ChunkedAppender(group.create_dataset(
            "accessions", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(_TOKEN_CHUNK,), **compression),
            compress, executor)
        # Offsets grow steadily: byte-shuffled deflate shrinks them well; scaleoffset packs each chunk's
        # values above its minimum into the bits they need.
        shuffle = bool(compression) and "scaleoffset" not in compression
        offset_options = dict(compression, shuffle=True) if shuffle else compression
        # Offsets start with their leading 0 in place; appends add the running ends.
        self.offsets = _ChunkedAppender(group.create_dataset(
            "offsets", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(_OFFSET_CHUNK,), **offset_options))
        self.accession_offsets = _ChunkedAppender(group.create_dataset(
            "accession_offsets", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(_OFFSET_CHUNK,),
            **offset_options))
        self.offsets.append(np.zeros(1, dtype=np.int64))
        self.accession_offsets.append(np.zeros(1, dtype=np.int64))
        self.records = 0
        self.residues = 0
        self.accession_bytes = 0

    def append(self, tokens: np.ndarray, lengths: np.ndarray, accessions: np.ndarray,
               accession_lengths: np.ndarray) -> None:
        self.tokens.append(tokens)
        self.offsets.append(self.residues + np.cumsum(lengths))
        self.accessions.append(accessions)
        self.accession_offsets.append(self.accession_bytes + np.cumsum(accession_lengths))
        self.records += len(lengths)
        self.residues += len(tokens)
        self.accession_bytes += len(accessions)

    def close(self) -> None:
        for appender in (self.tokens, self.offsets, self.accessions, self.accession_offsets):
            appender.close()
        self.group.attrs["records"] = self.records
        self.group.attrs["residues"] = self.residues


class _LengthStatistics:
    """Exact length distribution in constant memory: a histogram of lengths up to _HISTOGRAM_CAP."""

    def __init__(self) -> None:
        self.histogram = np.zeros(_HISTOGRAM_CAP + 1, dtype=np.int64)
        self.minimum = np.iinfo(np.int64).max
        self.maximum = 0
        self.total = 0

    def add(self, lengths: np.ndarray) -> None:
        if len(lengths):
            counts = np.bincount(np.minimum(lengths, _HISTOGRAM_CAP))
            self.histogram[:len(counts)] += counts
            self.minimum = min(self.minimum, int(lengths.min()))
            self.maximum = max(self.maximum, int(lengths.max()))
            self.total += int(lengths.sum())

    def fill(self, summary: StoreSummary) -> None:
        count = int(self.histogram.sum())
        if not count:
            return
        cumulative = np.cumsum(self.histogram)
        summary.length_min, summary.length_max = self.minimum, self.maximum
        summary.length_mean = self.total / count
        summary.length_quantiles = {name: int(np.searchsorted(cumulative, q * count)) for name, q in _QUANTILES.items()}
        summary.longer_than_1024 = int(self.histogram[1025:].sum())


class _SplitPart(NamedTuple):
    """The records of one chunk that belong to one split, ready to append."""

    split: str
    tokens: np.ndarray  # uint8, concatenated
    lengths: np.ndarray  # int64 [n]
    accessions: np.ndarray  # uint8, concatenated
    accession_lengths: np.ndarray  # int64 [n]


class _ChunkEncoder:
    """FastaChunk -> one _SplitPart per split present, for the records worth storing."""

    def __init__(self, alphabet: Alphabet, assigner: SplitAssigner) -> None:
        self.alphabet = alphabet
        self.assigner = assigner

    def __call__(self, chunk: FastaChunk, summary: StoreSummary) -> Iterator[_SplitPart]:
        encoded = self.alphabet.encode_concatenated(chunk.sequences, chunk.lengths)
        if encoded.invalid_at >= 0:
            record = int(np.searchsorted(np.cumsum(chunk.lengths), encoded.invalid_at, side="right"))
            line = header_line_of_record(chunk.path, chunk.first_record + record)
            byte = chunk.sequences[encoded.invalid_at]
            raise FastaFormatError(f"{chunk.path}:{line}: binary data (byte 0x{byte:02x}) in the sequence of this "
                                   "record; expected FASTA text")
        control = _first_control_byte(chunk.titles)
        if control >= 0:
            record = chunk.titles.count(b"\n", 0, control)
            line = header_line_of_record(chunk.path, chunk.first_record + record)
            raise FastaFormatError(f"{chunk.path}:{line}: binary data (byte 0x{chunk.titles[control]:02x}) in this "
                                   "header line; expected FASTA text")
        start, stop = accession_spans(chunk.titles, len(chunk))
        empty_accession = np.flatnonzero(stop == start)
        if empty_accession.size:
            line = header_line_of_record(chunk.path, chunk.first_record + int(empty_accession[0]))
            raise FastaFormatError(f"{chunk.path}:{line}: header line has no identifier")
        lengths = encoded.lengths
        summary.unknown += encoded.unknown
        keep = lengths > 0
        if not keep.all():
            summary.skipped_empty += int(np.count_nonzero(~keep))
            start, stop, lengths = start[keep], stop[keep], lengths[keep]
        if not len(lengths):
            return
        accessions = [chunk.titles[a:b] for a, b in zip(start, stop)] if self.assigner.ood_accessions else None
        titles = None
        if self.assigner.ood_regex is not None:
            titles = chunk.titles.split(b"\n")
            titles = [t for t, k in zip(titles, keep) if k] if not keep.all() else titles
        codes = self.assigner.assign(accession_hashes(chunk.titles, start, stop), accessions, titles)

        accession_lengths = stop - start
        yield from _split_parts(codes, np.frombuffer(encoded.tokens, dtype=np.uint8), lengths,
                                _gather(chunk.titles, start, accession_lengths), accession_lengths)


def _split_parts(codes: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, accessions: np.ndarray,
                 accession_lengths: np.ndarray) -> Iterator[_SplitPart]:
    """Regroup a chunk's records by split code, keeping their order within each split.

    Consecutive records of one split form a run; a chunk is mostly one long train run with a few
    valid/test records in between, so regrouping costs a few slices per run, not a gather per byte.
    """
    boundaries = np.flatnonzero(np.diff(codes)) + 1
    run_starts = np.concatenate([[0], boundaries])
    run_stops = np.concatenate([boundaries, [len(codes)]])
    token_ends = np.concatenate([[0], np.cumsum(lengths)])
    accession_ends = np.concatenate([[0], np.cumsum(accession_lengths)])
    for code in np.unique(codes):
        of_split = codes[run_starts] == code
        runs = list(zip(run_starts[of_split].tolist(), run_stops[of_split].tolist()))
        rows = codes == code
        yield _SplitPart(SPLITS[code],
                         np.concatenate([tokens[token_ends[a]:token_ends[b]] for a, b in runs]),
                         lengths[rows],
                         np.concatenate([accessions[accession_ends[a]:accession_ends[b]] for a, b in runs]),
                         accession_lengths[rows])


def _first_control_byte(text: bytes) -> int:
    """Offset of the first control byte (not tab or line/page breaks) in `text`, or -1."""
    codes = np.frombuffer(text, dtype=np.uint8)
    control = np.flatnonzero((codes < 9) | ((codes > 13) & (codes < 32)) | (codes == 127))
    return int(control[0]) if control.size else -1


def _gather(text: bytes, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """text[start[i]:start[i] + length[i]] for all i, concatenated, as uint8."""
    data = np.frombuffer(text, dtype=np.uint8)
    total = int(length.sum())
    shift = np.repeat(start - (np.cumsum(length) - length), length)
    return data[shift + np.arange(total)]


def build_token_store(
    inputs: PathInput | Sequence[PathInput],
    output: PathInput,
    *,
    split: SplitSpec | None = None,
    compression: str = "scaleoffset",
    compression_threads: int = 2,
    chunk_records: int = 2048,
    background_reader: bool = True,
    overwrite: bool = False,
    any_suffix: bool = False,
    progress: bool = True,
) -> StoreSummary:
    """Tokenise FASTA files (a path, a glob or a list; plain or gzip) into an HDF5 token store.

    Streams in constant memory (a few chunks of `chunk_records` records and one HDF5 chunk per
    dataset), so input size is bounded by disk, not RAM. The store is written under a temporary name
    in the output's directory and renamed when complete: an interrupted or failed run leaves nothing
    at `output`, and two concurrent builds of the same output each produce a complete file. A
    temporary left by a killed build (its process gone) is removed first, never reused.

    Args:
        split: train/valid/test fractions and the OOD rules (SplitSpec() by default).
        compression: "scaleoffset" (HDF5's built-in integer packing: each chunk as value - min in the
            fewest bits, 5 per residue token: 63% of raw; the fastest to build), "gzip" (deflate,
            Huffman-only for residues, see _deflate_huffman: 53% of raw, ~15% slower to build), "lzf",
            "none". All are lossless and decoded by any HDF5 reader.
        compression_threads: threads deflating residue chunks for "gzip" (0: in the calling thread).
        background_reader: parse FASTA in a child process so parsing and encoding overlap.
        overwrite: replace an existing `output` (otherwise that is an error). An output that is one of
            the inputs is refused whatever this says.
        any_suffix: accept an output name without an HDF5 suffix (HDF5_SUFFIXES); by default such a
            name is refused, since it is most likely a typo for an input.
        progress: a tqdm bar on stderr with MB/s and records/s.

    Raises DataError (FastaFormatError for bad FASTA) naming the file and line.
    """
    started = time.perf_counter()
    split = split if split is not None else SplitSpec()
    if compression not in COMPRESSIONS:
        raise DataError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    paths = expand_inputs(inputs)
    output = Path(output)
    if output.suffix == "" or output.is_dir():
        raise DataError(f"{output}: give the output file a name such as 'proteins.h5'")
    for path in paths:
        if os.path.realpath(output) == os.path.realpath(path) or (output.exists() and os.path.samefile(output, path)):
            raise DataError(f"{output}: this output is also an input; writing it would destroy the FASTA. "
                            "Choose another output name, such as 'proteins.h5'")
    if output.suffix.lower() not in HDF5_SUFFIXES and not any_suffix:
        raise DataError(f"{output}: a token store is an HDF5 file, but this name does not end in "
                        f"{'/'.join(HDF5_SUFFIXES)}; name it e.g. '{output.stem}.h5', or pass any_suffix=true")
    if output.exists() and not overwrite:
        raise DataError(f"{output}: already exists; pass overwrite=true to replace it")
    make_output_directory(output, DataError)
    if not os.access(output.parent, os.W_OK):
        raise DataError(f"{output.parent}: no permission to write in this directory; choose another output")
    remove_stale_temporaries(output)
    for path in paths:  # fail now on file 40 of 40, not after hours of parsing the first 39
        check_fasta(path)
    assigner = SplitAssigner(split)
    alphabet = Alphabet()
    identity = input_identity(paths)
    summary = StoreSummary(input_files=len(paths), input_bytes=sum(size for _, size, _ in identity))
    options: dict[str, Any] = {}
    if compression == "gzip":
        options = {"compression": "gzip", "compression_opts": 4}
    elif compression == "scaleoffset":
        options = {"scaleoffset": 0}  # integers: each chunk stored as (value - min) in the fewest bits
    elif compression == "lzf":
        options = {"compression": "lzf"}

    temporary = output.with_name(f"{output.stem}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{output.suffix}.tmp")
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived parser tuples; cyclic GC would scan them and find nothing
    try:
        with closing(_chunks(paths, chunk_records, background_reader)) as chunks:
            _write_store(temporary, chunks, _ChunkEncoder(alphabet, assigner), summary, options, compression_threads,
                         progress)
        if summary.records == 0:
            names = ", ".join(map(str, paths[:3])) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            raise DataError(f"{names}: no records with a non-empty sequence ({summary.skipped_empty:,} empty records "
                            "skipped); a FASTA record is a '>' header line followed by its residues")
        summary.seconds = time.perf_counter() - started
        with h5py.File(temporary, "a") as h5:
            h5.attrs.update({
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "alphabet": json.dumps(alphabet.tokens),
                "inputs": json.dumps(identity),
                "split_spec": json.dumps(split.identity()),
                "hash": "fnv1a64 + splitmix64 finaliser of the accession bytes; u = (h >> 11) / 2**53",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **summary.to_attrs(),
            })
        raise_if_interrupted()  # the last safe point: after it the store is complete and in place
        os.replace(temporary, output)
    except OSError as error:  # disk full, permissions, a file system gone away: name the file
        temporary.unlink(missing_ok=True)
        raise DataError(f"{output}: building the token store failed: {describe_os_error(error)}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        if gc_was_enabled:
            gc.enable()
    return summary


_HOST = socket.gethostname().replace("/", "_")


def remove_stale_temporaries(output: PathInput) -> list[Path]:
    """Delete the temporaries of `output` that builds killed on this host left behind; return them.

    A temporary is <stem>.<host>-<pid>-<token><suffix>.tmp. It is stale when <host> is this machine
    and process <pid> no longer runs (SIGKILL and the OOM killer leave no chance to clean up). A
    temporary of a running build, or of another host sharing the file system, is left alone.
    """
    output = Path(output)
    pattern = re.compile(rf"{re.escape(output.stem)}\.(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]{{8}}"
                         rf"{re.escape(output.suffix)}\.tmp")
    removed = []
    for candidate in output.parent.glob(f"{glob.escape(output.stem)}.*{glob.escape(output.suffix)}.tmp"):
        match = pattern.fullmatch(candidate.name)
        if match is None or match["host"] not in (None, _HOST) or _running(int(match["pid"])):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
        log.warning("removed %s, left by a build that was killed (process %s is gone)", candidate, match["pid"])
    return removed


def _running(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, dead but not yet reaped, does not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _chunks(paths: list[Path], chunk_records: int, background: bool) -> Iterator[FastaChunk]:
    if background:
        yield from read_fasta_chunks_in_background(paths, chunk_records)
    else:
        for path in paths:
            yield from read_fasta_chunks(path, chunk_records)


def _write_store(path: Path, chunks: Iterable[FastaChunk], encode: _ChunkEncoder, summary: StoreSummary,
                 compression: dict[str, Any], threads: int, progress: bool) -> None:
    statistics = _LengthStatistics()
    done_bytes = 0  # bytes of the files finished before the current one
    current: Path | None = None
    last_position = 0
    executor = ThreadPoolExecutor(threads, thread_name_prefix="deflate") if threads > 0 else None
    try:
        with (h5py.File(path, "w") as h5,
              tqdm(total=summary.input_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenising",
                   disable=not progress, smoothing=0.1) as bar):
            writers = {name: _SplitWriter(h5.create_group(name), compression, executor) for name in SPLITS}
            for chunk in chunks:
                raise_if_interrupted()  # a SIGTERM or Ctrl-C stops the build here (errors.py says why here)
                if chunk.path != current:
                    done_bytes += last_position
                    current, last_position = chunk.path, 0
                for part in encode(chunk, summary):
                    writers[part.split].append(part.tokens, part.lengths, part.accessions, part.accession_lengths)
                    statistics.add(part.lengths)
                bar.update(max(done_bytes + chunk.position - bar.n, 0))
                last_position = chunk.position
                records = sum(w.records for w in writers.values())
                bar.set_postfix_str(f"{records:,} records, {records / max(bar.format_dict['elapsed'], 1e-9):,.0f} rec/s",
                                    refresh=False)
            for writer in writers.values():
                writer.close()
            for name, writer in writers.items():
                summary.split_records[name] = writer.records
                summary.split_residues[name] = writer.residues
            summary.records = sum(summary.split_records.values())
            summary.residues = sum(summary.split_residues.values())
            statistics.fill(summary)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
