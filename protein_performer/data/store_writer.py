"""Writing the HDF5 token store: FASTA chunks in, the layout of store.py out, in constant memory.

`build_token_store` hands blocks of records to worker processes (workers.py): byte ranges of a plain
file, which each worker reads itself, or blocks of a gzip stream inflated here in one stream. Each
worker parses its block, encodes it with the Alphabet, assigns splits from accession hashes and counts
tokens; this process takes the results back in input order and appends each split's records to
chunked, compressed datasets, so the store is the same whatever the number of workers or the block
size. It writes a temporary file beside the output and renames it when complete;
`remove_stale_temporaries` cleans up after builds that were killed.
"""
from __future__ import annotations

import gc
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

from protein_performer.data.alphabet import DIGITS, NON_TOKEN_CODES, Alphabet, EncodedSequences, count_tokens
from protein_performer.data.clusters import ClusterMap, gather, read_clusters
from protein_performer.data.errors import DataError, FastaFormatError
from protein_performer.data.fasta import (
    PathInput,
    accession_spans,
    check_fasta,
    digit_in_sequence_error,
    expand_inputs,
    header_line_of_record,
    open_raw,
)
from protein_performer.data.fasta_chunks import (
    FastaChunk,
    RecordRange,
    chunk_of_block,
    read_fasta_chunks,
    record_block_pieces,
    record_ranges,
    translated_chunk_of_block,
)
from protein_performer.data.workers import JoinedBytes, default_workers, map_in_processes
from protein_performer.data.splits import SPLITS, SplitAssigner, SplitSpec, accession_hashes, file_identity
from protein_performer.data.store import (
    COMPRESSIONS,
    FORMAT,
    FORMAT_VERSION,
    HDF5_SUFFIXES,
    StoreSummary,
    input_identity,
)
from protein_performer.errors import describe_os_error, make_output_directory, raise_if_interrupted

__all__ = ["build_token_store", "remove_stale_temporaries", "DUPLICATE_LIMIT"]

log = logging.getLogger(__name__)

_TOKEN_CHUNK = 1 << 18  # elements per HDF5 chunk: 256 KiB of tokens, a few hundred proteins
_OFFSET_CHUNK = 1 << 15  # 256 KiB of int64 offsets
_HISTOGRAM_CAP = 1 << 17  # exact length statistics up to 131,072 residues (UniProt's longest: 74,488)
_QUANTILES = {"p10": 0.10, "p50": 0.50, "p90": 0.90, "p99": 0.99}
DUPLICATE_LIMIT = 0.01  # repeated accessions refused above this fraction of the records (allow_duplicates)
_DUPLICATE_SAMPLE = 1 << 20  # records whose accession hash is kept for finding repeats (~17 MB); a hash sample beyond


def _deflate_huffman(data: bytes) -> bytes:
    """A zlib stream (what HDF5's gzip filter reads) with Huffman coding only, no LZ77 matching.

    Residues barely repeat, so string matching is wasted work: Huffman-only is about 2x faster than
    level 1 and smaller (53% vs 60% of the input on UniProt).
    """
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return compressor.compress(data) + compressor.flush()


class _ChunkedAppender:
    """Appends to a resizable 1-D dataset in whole HDF5 chunks.

    Every full chunk is written once with `write_direct_chunk`, straight from the appended array where
    it lies (only a chunk that spans two appends is copied, into one chunk's buffer): no concatenation,
    no hyperslab selection, no trip through HDF5's chunk cache, and a compressed chunk is never read
    back, decompressed, patched and recompressed, which small appends to a compressed dataset would
    cost. The last, partial chunk goes through HDF5's own write (and filter). Holds at most one chunk
    plus one append in memory, and a few chunks in compression.

    With `compress`, full chunks are compressed here (in `executor`'s threads: zlib releases the GIL);
    it is a plain deflate stream, so any HDF5 reader decodes them. Without it, full chunks are stored
    as they are, which is only right for a dataset without filters: one with filters but no `compress`
    (shuffled or scale-offset offsets) goes through HDF5's own write, as a whole run of chunks at a time.
    """

    def __init__(self, dataset: h5py.Dataset, compress: Callable[[bytes], bytes] | None = None,
                 executor: ThreadPoolExecutor | None = None, max_in_flight: int = 4) -> None:
        self.dataset = dataset
        self.chunk = dataset.chunks[0]
        self.compress = compress
        self.executor = executor
        self.direct = compress is not None or dataset.id.get_create_plist().get_nfilters() == 0
        self.pending: list[np.ndarray] = []
        self.pending_size = 0
        self.in_flight: deque[tuple[int, Future[bytes]]] = deque()
        self.max_in_flight = max_in_flight  # chunks being compressed at once: bounds memory

    def append(self, values: np.ndarray) -> None:
        if not len(values):
            return
        if self.pending_size + len(values) < self.chunk:
            self.pending.append(values)
            self.pending_size += len(values)
            return
        if not self.direct:
            self.pending.append(values)
            self.pending_size += len(values)
            self._write(final=False)
            return
        size = self.dataset.shape[0]
        head = self.chunk - self.pending_size if self.pending_size else 0  # what completes the pending chunk
        full = (len(values) - head) // self.chunk * self.chunk
        self.dataset.resize((size + (self.chunk if head else 0) + full,))
        if head:
            self._store(size, np.concatenate([*self.pending, values[:head]]))
            size += self.chunk
        for begin in range(head, head + full, self.chunk):
            self._store(size + begin - head, values[begin:begin + self.chunk])
        rest = values[head + full:]
        self.pending = [rest] if len(rest) else []
        self.pending_size = len(rest)

    def close(self) -> None:
        self._write(final=True)
        self._drain(0)

    def _store(self, offset: int, values: np.ndarray) -> None:
        """One full chunk at element `offset`, written as it is or compressed."""
        if self.compress is None:
            self._drain(0)  # chunks are written in order
            self.dataset.id.write_direct_chunk((offset,), np.ascontiguousarray(values))
            return
        data = memoryview(np.ascontiguousarray(values)).cast("B")
        future = (self.executor.submit(self.compress, data) if self.executor is not None
                  else _done(self.compress(data)))
        self.in_flight.append((offset, future))
        self._drain(self.max_in_flight)

    def _write(self, final: bool) -> None:
        """The pending values through HDF5's own write: whole chunks, and with `final` the partial rest."""
        if not self.pending_size:
            return
        values = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        count = len(values) if final else len(values) // self.chunk * self.chunk
        if count:
            self._drain(0)
            size = self.dataset.shape[0]
            self.dataset.resize((size + count,))
            self.dataset[size:size + count] = values[:count]
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
    """The datasets of one split: four appended as records come, `token_counts` written at the end."""

    def __init__(self, group: h5py.Group, compression: dict[str, Any], executor: ThreadPoolExecutor | None,
                 vocab_size: int, clusters: bool = False) -> None:
        self.group = group
        self.token_counts = np.zeros(vocab_size, dtype=np.int64)
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
        # Each record's cluster key (its representative's accession hash, as int64), with clusters only.
        self.clusters = _ChunkedAppender(group.create_dataset(
            "clusters", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(_OFFSET_CHUNK,),
            **compression)) if clusters else None
        self.records = 0
        self.residues = 0
        self.accession_bytes = 0

    def append(self, part: _SplitPart) -> None:
        tokens, lengths, accessions, accession_lengths = part.tokens, part.lengths, part.accessions, part.accession_lengths
        if self.clusters is not None:
            self.clusters.append(part.clusters)
        self.tokens.append(tokens)
        self.token_counts += part.token_counts
        self.offsets.append(self.residues + np.cumsum(lengths))
        self.accessions.append(accessions)
        self.accession_offsets.append(self.accession_bytes + np.cumsum(accession_lengths))
        self.records += len(lengths)
        self.residues += len(tokens)
        self.accession_bytes += len(accessions)

    def close(self) -> None:
        for appender in (self.tokens, self.offsets, self.accessions, self.accession_offsets, self.clusters):
            if appender is not None:
                appender.close()
        self.group.create_dataset("token_counts", data=self.token_counts)
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


class _DuplicateCheck:
    """Accessions that repeat, found in bounded memory.

    Keeps the accession hash, split and index of every record whose hash has its low `shift` bits
    zero: all records while there are at most _DUPLICATE_SAMPLE, then a 1/2**shift sample that halves
    whenever it fills. Repeats of an accession share its hash, so they are sampled together and the
    count of repeats among the sample, times 2**shift, estimates the whole (exact when shift is 0).
    """

    def __init__(self) -> None:
        self.shift = 0
        self.hashes: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []
        self.index: list[np.ndarray] = []
        self.size = 0
        self.repeats = 0  # records whose accession was seen before (estimated when sampled)
        self.examples: list[tuple[str, int]] = []  # (accession, how often it occurs), first ones in input order

    def add(self, hashes: np.ndarray, codes: np.ndarray, split_records: dict[str, int]) -> None:
        keep = (hashes & np.uint64((1 << self.shift) - 1)) == 0
        if not keep.any():
            return
        index = np.empty(len(hashes), dtype=np.int64)
        for code in np.unique(codes).tolist():
            rows = codes == code
            index[rows] = split_records[SPLITS[code]] + np.arange(int(np.count_nonzero(rows)))
        self.hashes.append(hashes[keep])
        self.codes.append(codes[keep])
        self.index.append(index[keep])
        self.size += int(np.count_nonzero(keep))
        while self.size > _DUPLICATE_SAMPLE:
            self.shift += 1
            hashes, codes, index = self._joined()
            keep = (hashes & np.uint64((1 << self.shift) - 1)) == 0
            self.hashes, self.codes, self.index = [hashes[keep]], [codes[keep]], [index[keep]]
            self.size = int(np.count_nonzero(keep))

    def _joined(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.hashes:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint8), np.zeros(0, np.int64)
        return np.concatenate(self.hashes), np.concatenate(self.codes), np.concatenate(self.index)

    def find(self, h5: h5py.File, examples: int = 3) -> None:
        """Count the repeats and read a few repeated accessions back from the (complete) store."""
        hashes, codes, index = self._joined()
        ordered = np.sort(hashes)
        if not (ordered[1:] == ordered[:-1]).any():  # no repeats, as in most files: one plain sort decides
            return
        unique, first, counts = np.unique(hashes, return_index=True, return_counts=True)
        repeated = counts > 1
        self.repeats = int((counts[repeated] - 1).sum()) << self.shift
        order = np.argsort(first[repeated])[:examples]
        for row, count in zip(first[repeated][order].tolist(), counts[repeated][order].tolist()):
            group = h5[SPLITS[int(codes[row])]]
            begin, end = group["accession_offsets"][index[row]:index[row] + 2]
            self.examples.append((group["accessions"][begin:end].tobytes().decode("latin-1"), count))

    def report(self, paths: list[Path], records: int, allow: bool) -> None:
        """One line on the repeats: a warning, or a DataError above DUPLICATE_LIMIT unless allowed."""
        if not self.repeats:
            return
        names = ", ".join(map(str, paths[:3])) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        shown = ", ".join(f"{accession} x{count:,}" for accession, count in self.examples)
        sampled = f", estimated from a 1/{1 << self.shift} sample" if self.shift else ""
        message = (f"{names}: {self.repeats:,} of {records:,} records ({self.repeats / records:.1%}{sampled}) repeat "
                   f"an accession seen before (e.g. {shown})")
        if self.repeats > DUPLICATE_LIMIT * records and not allow:
            raise DataError(f"{message}; the accession (see protein_performer/data/fasta.py) decides a record's split, "
                            "so these would pile into one split. Give each record its own identifier as the header's "
                            "first word, or pass allow_duplicates=true to keep them")
        log.warning("%s; kept", message)


class _SplitPart(NamedTuple):
    """The records of one chunk that belong to one split, ready to append."""

    split: str
    tokens: np.ndarray  # uint8, concatenated
    lengths: np.ndarray  # int64 [n]
    accessions: np.ndarray  # uint8, concatenated
    accession_lengths: np.ndarray  # int64 [n]
    token_counts: np.ndarray  # int64 [vocabulary]: bincount of tokens
    clusters: np.ndarray | None = None  # int64 [n] cluster keys, when clusters are given


class _EncodedChunk(NamedTuple):
    """What encoding a FastaChunk gives the writer (computed in a worker process when there are some)."""

    path: Path
    position: int  # progress through the raw file
    parts: list[_SplitPart]  # one per split present
    hashes: np.ndarray  # uint64 [n]: accession hashes of the stored records, in order
    codes: np.ndarray  # uint8 [n]: their split codes (SPLITS)
    unknown: int  # characters stored as <unk>
    skipped_empty: int  # records with an empty sequence, not stored
    clustered: int = 0  # stored records the clusters file names


class _ChunkEncoder:
    """FastaChunk -> _EncodedChunk: one _SplitPart per split present, for the records worth storing.

    Also called on a block of records (path, text, decompressed offset, raw position) or a
    RecordRange of a plain file, as the parallel workers are: reading a plain file, parsing and
    encoding are then all done where it runs.
    """

    def __init__(self, alphabet: Alphabet, assigner: SplitAssigner, clusters: ClusterMap | None = None) -> None:
        self.alphabet = alphabet
        self.assigner = assigner
        self.clusters = clusters

    def __call__(self, chunk: FastaChunk | RecordRange | tuple[Path, bytes, int, int]) -> _EncodedChunk:
        if isinstance(chunk, RecordRange):
            text, offset = chunk.read()
            chunk = (chunk.path, text, offset, chunk.stop)
        encoded = None
        if not isinstance(chunk, FastaChunk):  # a block of records: parsed and translated in one pass
            block = chunk
            chunk = translated_chunk_of_block(*block, self.alphabet.translation, NON_TOKEN_CODES)
            if chunk is None:  # stops, gaps, whitespace or bad bytes in a sequence: the general way
                chunk = chunk_of_block(*block)
            else:
                encoded = EncodedSequences(chunk.sequences, chunk.lengths, -1, -1)  # unknown: counted below
        if not len(chunk):
            return _EncodedChunk(chunk.path, chunk.position, [], np.zeros(0, np.uint64), np.zeros(0, np.uint8), 0, 0)
        if encoded is None:
            encoded = self.alphabet.encode_concatenated(chunk.sequences, chunk.lengths)
        if encoded.invalid_at >= 0:
            ends = np.cumsum(chunk.lengths)
            record = int(np.searchsorted(ends, encoded.invalid_at, side="right"))
            byte = chunk.sequences[encoded.invalid_at]
            if byte in DIGITS:
                within = encoded.invalid_at - int(ends[record] - chunk.lengths[record])
                raise digit_in_sequence_error(chunk.path, chunk.record_number(record), within, chr(byte))
            line = header_line_of_record(chunk.path, chunk.record_number(record))
            raise FastaFormatError(f"{chunk.path}:{line}: binary data (byte 0x{byte:02x}) in the sequence of this "
                                   "record; expected FASTA text")
        control = _first_control_byte(chunk.titles)
        if control >= 0:
            record = chunk.titles.count(b"\n", 0, control)
            line = header_line_of_record(chunk.path, chunk.record_number(record))
            raise FastaFormatError(f"{chunk.path}:{line}: binary data (byte 0x{chunk.titles[control]:02x}) in this "
                                   "header line; expected FASTA text")
        start, stop = accession_spans(chunk.titles, len(chunk))
        empty_accession = np.flatnonzero(stop == start)
        if empty_accession.size:
            line = header_line_of_record(chunk.path, chunk.record_number(int(empty_accession[0])))
            raise FastaFormatError(f"{chunk.path}:{line}: header line has no identifier")
        tokens = np.frombuffer(encoded.tokens, dtype=np.uint8)
        counts = count_tokens(tokens, len(self.alphabet))
        unknown = int(counts[self.alphabet.unk_idx])
        lengths = encoded.lengths
        keep = lengths > 0
        skipped = int(np.count_nonzero(~keep))
        if skipped:
            start, stop, lengths = start[keep], stop[keep], lengths[keep]
        if not len(lengths):
            return _EncodedChunk(chunk.path, chunk.position, [], np.zeros(0, np.uint64), np.zeros(0, np.uint8),
                                 unknown, skipped)
        accessions = [chunk.titles[a:b] for a, b in zip(start, stop)] if self.assigner.ood_accessions else None
        titles = None
        if self.assigner.ood_regex is not None:
            titles = chunk.titles.split(b"\n")
            titles = [t for t, k in zip(titles, keep) if k] if not keep.all() else titles
        hashes = accession_hashes(chunk.titles, start, stop)
        keys, clustered = hashes, 0  # what decides the split: the accession, or its cluster's representative
        if self.clusters is not None:
            keys, listed = self.clusters.keys(hashes)
            clustered = int(np.count_nonzero(listed))
        codes = self.assigner.assign(keys, accessions, titles)
        accession_lengths = stop - start
        parts = _split_parts(codes, tokens, lengths, gather(chunk.titles, start, accession_lengths), accession_lengths,
                             counts, keys.view(np.int64) if self.clusters is not None else None)
        return _EncodedChunk(chunk.path, chunk.position, parts, hashes, codes.astype(np.uint8), unknown, skipped,
                             clustered)


def _split_parts(codes: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, accessions: np.ndarray,
                 accession_lengths: np.ndarray, token_counts: np.ndarray,
                 clusters: np.ndarray | None = None) -> list[_SplitPart]:
    """Regroup a chunk's records by split code, keeping their order within each split.

    Consecutive records of one split form a run; a chunk is mostly one long train run with a few
    valid/test records in between, so regrouping costs a few slices per run, not a gather per byte.
    `token_counts` are the whole chunk's: the largest part's counts are those minus the other parts'
    (counted here), so the bulk of the tokens is counted once.
    """
    boundaries = np.flatnonzero(np.diff(codes)) + 1
    run_starts = np.concatenate([[0], boundaries])
    run_stops = np.concatenate([boundaries, [len(codes)]])
    token_ends = np.concatenate([[0], np.cumsum(lengths)])
    accession_ends = np.concatenate([[0], np.cumsum(accession_lengths)])
    parts = []
    for code in np.unique(codes):
        of_split = codes[run_starts] == code
        runs = list(zip(run_starts[of_split].tolist(), run_stops[of_split].tolist()))
        rows = codes == code
        parts.append(_SplitPart(SPLITS[code], _end_to_end([tokens[token_ends[a]:token_ends[b]] for a, b in runs]),
                                lengths[rows],
                                _end_to_end([accessions[accession_ends[a]:accession_ends[b]] for a, b in runs]),
                                accession_lengths[rows], token_counts,
                                None if clusters is None else clusters[rows]))
    largest = max(range(len(parts)), key=lambda i: len(parts[i].tokens))
    rest = token_counts.copy()
    for i, part in enumerate(parts):
        if i != largest:
            parts[i] = part._replace(token_counts=count_tokens(part.tokens, len(token_counts)))
            rest -= parts[i].token_counts
    parts[largest] = parts[largest]._replace(token_counts=rest)
    return parts


def _end_to_end(pieces: list[np.ndarray]) -> np.ndarray:
    """The pieces end to end: the one piece itself when there is one (a view, no copy)."""
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _first_control_byte(text: bytes) -> int:
    """Offset of the first control byte (not tab or line/page breaks) in `text`, or -1."""
    codes = np.frombuffer(text, dtype=np.uint8)
    control = np.flatnonzero((codes < 9) | ((codes > 13) & (codes < 32)) | (codes == 127))
    return int(control[0]) if control.size else -1


def build_token_store(
    inputs: PathInput | Sequence[PathInput],
    output: PathInput,
    *,
    split: SplitSpec | None = None,
    compression: str = "none",
    compression_threads: int = 2,
    chunk_records: int = 2048,
    background_reader: bool = True,
    workers: int | None = None,
    block_bytes: int | None = None,
    allow_duplicates: bool = False,
    overwrite: bool = False,
    any_suffix: bool = False,
    progress: bool = True,
) -> StoreSummary:
    """Tokenise FASTA files (a path, a glob or a list; plain or gzip) into an HDF5 token store.

    Streams in constant memory (2 or 4 blocks per worker in flight, one HDF5 chunk per dataset, and at
    most _DUPLICATE_SAMPLE accession hashes for finding repeats), so input size is bounded by disk,
    not RAM. The store is written under a temporary name
    in the output's directory and renamed when complete: an interrupted or failed run leaves nothing
    at `output`, and two concurrent builds of the same output each produce a complete file. A
    temporary left by a killed build (its process gone) is removed first, never reused.

    Args:
        split: train/valid/test fractions, the OOD rules and the clusters file (SplitSpec() by default).
            With clusters, splits follow clusters and every split gets a `clusters` dataset (clusters.py).
        compression: "none" (the default: the cheapest to write and to read, since the parent's HDF5
            write is the build's one serial stage), "scaleoffset" (HDF5's built-in integer packing: each
            chunk as value - min in the fewest bits, 5 per residue token: 63% of raw, about 0.2 CPU s
            more per 100 MB to write and 0.25 more to read), "gzip" (deflate, Huffman-only for residues,
            see _deflate_huffman: 53% of raw, slower still), "lzf". All are lossless and decoded by any
            HDF5 reader; stores built with any of them load the same way.
        compression_threads: threads deflating residue chunks for "gzip" (0: in the calling thread).
        background_reader: parse and encode in `workers` child processes while this one inflates
            and writes; False: everything in this process (no children), in chunks of `chunk_records`.
        workers: processes parsing and encoding blocks of records (None: `default_workers()`, the
            cores available up to 8). The store's contents do not depend on it.
        block_bytes: decompressed bytes per block handed to a worker (None: 4 MiB from a plain file, 1 MiB
            from gzip, with 2 or 4 blocks per worker in flight). Neither does this change the store's
            contents; memory is about (blocks in flight) * workers * block_bytes * 3.
        allow_duplicates: keep records whose accession repeats one already seen even when more
            than DUPLICATE_LIMIT of the records do (the same accession means the same split, so
            many repeats mean lopsided splits: most likely headers parsed the wrong way).
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
    make_output_directory(output, DataError)  # also checks that it can write there
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
    clusters = read_clusters(split.clusters) if split.clusters is not None else None
    encode = _ChunkEncoder(alphabet, assigner, clusters)
    try:
        if background_reader:
            streamed = any(_is_gzip(path) for path in paths)  # blocks cut here from one inflated stream
            encoded = map_in_processes(encode, _blocks(paths, block_bytes), workers or default_workers(),
                                       depth=_STREAM_DEPTH if streamed else 2)
        else:
            encoded = (encode(chunk) for path in paths for chunk in read_fasta_chunks(path, chunk_records))
        with closing(encoded):
            duplicates, clustered = _write_store(temporary, encoded, len(alphabet), summary, options,
                                                 compression_threads, progress, clusters is not None)
        if summary.records == 0:
            names = ", ".join(map(str, paths[:3])) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            raise DataError(f"{names}: no records with a non-empty sequence ({summary.skipped_empty:,} empty records "
                            "skipped); a FASTA record is a '>' header line followed by its residues")
        if clusters is not None and clustered == 0:
            raise DataError(f"{clusters.path}:1: names none of the {summary.records:,} accessions of {paths[0]}"
                            f"{' and the other inputs' if len(paths) > 1 else ''}; is it the clusters file of "
                            "these sequences (its ids must be their accessions or whole header words)?")
        duplicates.report(paths, summary.records, allow_duplicates)
        summary.seconds = time.perf_counter() - started
        with h5py.File(temporary, "a") as h5:
            h5.attrs.update({
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "alphabet": json.dumps(alphabet.tokens),
                "inputs": json.dumps(identity),
                "split_spec": json.dumps(split.identity()),
                "clusters": json.dumps(file_identity(split.clusters)),
                "clustered_records": clustered,
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
    """Delete the temporaries that builds killed on this host left in `output`'s directory; return them.

    A temporary is <stem>.<host>-<pid>-<token><suffix>.tmp (the pid of the build that writes it). It
    is stale when <host> is this machine and process <pid> no longer runs (SIGKILL and the OOM killer
    leave no chance to clean up), whichever store it was for: a cache directory does not keep a dead
    build's 600 MB until that same store is built again. A temporary of a running build, or of
    another host sharing the file system, is left alone; so is `output`'s own older form without a host.
    """
    output = Path(output)
    token = r"-(?P<pid>\d+)-[0-9a-f]{8}"
    own = re.compile(rf"{re.escape(output.stem)}\.(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]{{8}}"
                     rf"{re.escape(output.suffix)}\.tmp")
    any_store = re.compile(rf".+\.{re.escape(_HOST)}{token}\.[^.]+\.tmp")
    removed = []
    for candidate in output.parent.glob("*.tmp"):
        match = own.fullmatch(candidate.name)
        if match is None or match["host"] not in (None, _HOST):
            match = any_store.fullmatch(candidate.name)
        if match is None or _running(int(match["pid"])):
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


# A gzip stream is inflated and cut into blocks here, serially: smaller blocks, more of them in flight, so
# that the workers start sooner and the tail (the last blocks, parsed after the inflate ends) is short.
# 1 MiB x 4 holds less in flight than the 4 MiB x 2 of plain files, where each worker reads its own range
# and a task's fixed cost (opening and seeking the file) favours larger ones. Measured on 200 MB and on
# Swiss-Prot's 44 MB on the quiet 2-core machine: 1-5% faster from gzip; plain files cut so were 10-15% slower.
_STREAM_BLOCK_BYTES = 1 << 20
_STREAM_DEPTH = 4


def _is_gzip(path: Path) -> bool:
    with open_raw(path) as (_, compressed):
        return compressed


def _blocks(paths: list[Path], block_bytes: int | None) -> Iterator[RecordRange | tuple[Path, JoinedBytes, int, int]]:
    """The workers' tasks: byte ranges of a plain file (each worker reads its own), or, from a gzip
    stream (decompressed here, in one stream), (path, block of whole records, its offset, raw position),
    the block in the pieces it was inflated in: the worker joins them (JoinedBytes), this process never
    copies it."""
    for path in paths:
        ranges = record_ranges(path, block_bytes)
        if ranges is not None:
            yield from ranges
            continue
        for pieces, offset, position, _ in record_block_pieces(path, block_bytes or _STREAM_BLOCK_BYTES):
            yield path, JoinedBytes(pieces), offset, position  # joined in the worker, not here


def _write_store(path: Path, encoded: Iterable[_EncodedChunk], vocab_size: int, summary: StoreSummary,
                 compression: dict[str, Any], threads: int, progress: bool,
                 with_clusters: bool = False) -> tuple[_DuplicateCheck, int]:
    """Write the encoded chunks' records; (the duplicate check, records the clusters file named)."""
    statistics = _LengthStatistics()
    duplicates = _DuplicateCheck()
    clustered = 0
    done_bytes = 0  # bytes of the files finished before the current one
    current: Path | None = None
    last_position = 0
    executor = ThreadPoolExecutor(threads, thread_name_prefix="deflate") if threads > 0 else None
    try:
        with (h5py.File(path, "w") as h5,
              tqdm(total=summary.input_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenising",
                   disable=not progress, smoothing=0.1) as bar):
            writers = {name: _SplitWriter(h5.create_group(name), compression, executor, vocab_size, with_clusters)
                       for name in SPLITS}
            for chunk in encoded:
                raise_if_interrupted()  # a SIGTERM or Ctrl-C stops the build here (errors.py says why here)
                if chunk.path != current:
                    done_bytes += last_position
                    current, last_position = chunk.path, 0
                duplicates.add(chunk.hashes, chunk.codes, {name: w.records for name, w in writers.items()})
                summary.unknown += chunk.unknown
                summary.skipped_empty += chunk.skipped_empty
                clustered += chunk.clustered
                for part in chunk.parts:
                    writers[part.split].append(part)
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
            duplicates.find(h5)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    return duplicates, clustered
