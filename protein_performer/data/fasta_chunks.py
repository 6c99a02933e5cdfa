"""The fast FASTA chunk reader behind `build_token_store`: blocks of bytes in, chunks of records out.

    read_fasta_chunks(path)                  FastaChunks of a few thousand records as joined byte strings
    read_fasta_chunks_reference(path)        the same by Biopython's SimpleFastaParser (the reference)
    record_blocks(path) / record_ranges(path)   blocks of whole records (inflated here) or byte ranges
                                             of a plain file: what parallel workers parse (`chunk_of_block`)
    translated_chunk_of_block(...)           a worker's fast path: the sequences cut out and translated
                                             to token ids in one pass (None: the block needs chunk_of_block)

It must keep up with 100 GB of TrEMBL: a thread decompresses the file (ISA-L or zlib: both release the GIL)
into blocks of whole records, and each chunk is cut out of its block with numpy and a few slices per
record (one split for a file with one line per sequence), with no str per line; `build_token_store` runs
that in worker processes (workers.py). Opening and the file's checks are fasta.py's (`open_fasta`,
`check_fasta`), shared with `read_fasta`.
"""
from __future__ import annotations

import functools
import io
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from protein_performer.data.errors import FastaFormatError
from protein_performer.data.fasta import (
    GZIP_MAGIC,
    GZIP_STREAM_ERRORS,
    INFLATE,
    check_fasta,
    open_fasta,
    truncated_gzip_error,
)
from protein_performer.errors import raise_if_interrupted

__all__ = ["FastaChunk", "chunk_of_block", "translated_chunk_of_block", "read_fasta_chunks", "read_fasta_chunks_reference",
           "RecordRange", "record_blocks", "record_block_pieces", "record_ranges", "records_before"]


@dataclass(frozen=True)
class FastaChunk:
    """Consecutive records of one file, as joined byte strings (latin-1, byte for byte).

    titles: the n header lines without '>', joined with b"\\n".
    sequences: the n sequences concatenated (whitespace removed), lengths[i] bytes each.
    """

    path: Path
    first_record: int  # index of the chunk's first record in its file (0-based; see block_offset)
    titles: bytes
    sequences: bytes
    lengths: np.ndarray  # int64 [n]
    position: int  # bytes of the (possibly compressed) file consumed so far: progress, not exact
    # -1, or: first_record counts from the block of records starting at this (decompressed) byte of
    # the file. A parallel worker knows its block, not how many records came before it; that count
    # is needed only to name a line in an error, so only then is it found (`record_number`).
    block_offset: int = -1

    def __len__(self) -> int:
        return len(self.lengths)

    def record_number(self, i: int) -> int:
        """Index in its file (0-based) of the chunk's record i (error path: may read the file)."""
        before = 0 if self.block_offset < 0 else records_before(self.path, self.block_offset)
        return before + self.first_record + i


def chunk_of_block(path: Path, text: bytes, offset: int, position: int) -> FastaChunk:
    """All records of one block of whole records (`record_blocks`) as one FastaChunk, numbered
    from the block (`block_offset=offset`): what a parallel worker parses."""
    records = _RecordSpans.of(text)
    return FastaChunk(path, 0, *records.cut(text, 0, len(records)), position, block_offset=offset)


def translated_chunk_of_block(path: Path, text: bytes, offset: int, position: int, table: bytes,
                              reject: bytes) -> FastaChunk | None:
    """`chunk_of_block` with its sequences translated through `table` (256 bytes, as bytes.translate
    takes it) in the same pass that joins them, or None when a translated sequence byte is one of
    `reject` (then `chunk_of_block` and the caller's own translation handle the block).

    The encoder's fast path: one pass over the residues instead of one to remove line breaks and one
    to translate. Chunks that SimpleFastaParser parses (whitespace inside sequences or after titles)
    give None: whitespace translates to reject[0] here whatever `table` says.
    """
    records = _RecordSpans.of(text)
    cut = records.cut(text, 0, len(records), _marking_whitespace(table, reject[:1]), reject)
    return None if cut is None else FastaChunk(path, 0, *cut, position, block_offset=offset)


@functools.lru_cache(maxsize=8)
def _marking_whitespace(table: bytes, code: bytes) -> bytes:
    """`table` with every byte of _WHITESPACE translated to `code`."""
    return bytes(code[0] if byte in _WHITESPACE else table[byte] for byte in range(256))


def read_fasta_chunks(path: Path, chunk_records: int = 2048) -> Iterator[FastaChunk]:
    """Records of one file in chunks of `chunk_records` (the last one shorter).

    The fast path behind `build_token_store`: the (decompressed) bytes are cut into blocks of whole
    records and each chunk's titles and sequences are cut out of its block with a few slices per
    record and one C-level pass per chunk, with no str per line. It gives exactly what Biopython's
    `SimpleFastaParser` gives (the reference, see `read_fasta_chunks_reference`): every line that
    starts with '>' is a header, a title is its line without '>' and trailing whitespace, and a
    sequence is its lines joined without line breaks. A chunk whose sequences hold other whitespace
    (blanks, tabs, carriage returns) or whose titles end in whitespace is parsed by SimpleFastaParser
    itself, so those rules are Biopython's own. Content checks that need the bytes (binary data,
    empty accessions) are the consumer's: it has the bytes at hand and reports the line with
    `header_line_of_record`.
    """
    if chunk_records < 1:
        raise ValueError(f"chunk_records must be >= 1, got {chunk_records}")
    first = 0
    carry = b""  # records of the previous block that did not fill a chunk
    for block, _, position, last in record_blocks(path):
        text = carry + block if carry else block
        records = _RecordSpans.of(text)
        count = len(records)
        whole = count if last else count // chunk_records * chunk_records
        for begin in range(0, whole, chunk_records):
            stop = min(begin + chunk_records, whole)
            titles, sequences, lengths = records.cut(text, begin, stop)
            yield FastaChunk(path, first, titles, sequences, lengths, position)
            first += stop - begin
        carry = text[records.head[whole]:] if whole < count else b""
    if first == 0:
        raise FastaFormatError(f"{path}: no FASTA records")


def read_fasta_chunks_reference(path: Path, chunk_records: int = 2048) -> Iterator[FastaChunk]:
    """`read_fasta_chunks` by Biopython's `SimpleFastaParser`, a record at a time (the reference)."""
    if chunk_records < 1:
        raise ValueError(f"chunk_records must be >= 1, got {chunk_records}")
    first = 0
    with open_fasta(path) as (text, raw):
        from Bio.SeqIO.FastaIO import SimpleFastaParser  # imported when used: Bio.SeqIO costs 0.1 s to import

        parser = SimpleFastaParser(text)
        while True:
            try:
                batch = list(islice(parser, chunk_records))
            except GZIP_STREAM_ERRORS as error:
                raise truncated_gzip_error(path, error) from None
            if not batch:
                break
            yield FastaChunk(path, first, *_join_records(batch), raw.tell())
            first += len(batch)
    if first == 0:
        raise FastaFormatError(f"{path}: no FASTA records")


def _join_records(records: Sequence[tuple[str, str]]) -> tuple[bytes, bytes, np.ndarray]:
    """(title, sequence) string pairs -> the joined bytes and lengths of a FastaChunk."""
    titles, sequences = zip(*records)
    return ("\n".join(titles).encode("latin-1"), "".join(sequences).encode("latin-1"),
            np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences)))


# Bytes that str.rstrip() removes from a latin-1 line, besides the line break: a sequence holding any
# of them (or a title ending in one) goes to SimpleFastaParser, whose rules for them are the standard.
_WHITESPACE = b"\t\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0"
_IS_WHITESPACE = np.zeros(256, dtype=bool)
_IS_WHITESPACE[list(_WHITESPACE)] = True


class _RecordSpans(NamedTuple):
    """Where the records of a block of whole records lie: record i's header line is
    text[head[i]:title_end[i]] ('>' included, line break excluded) and its sequence lines are
    text[title_end[i] + 1:end[i]] (end: the next header's '>', or the end of the block)."""

    head: np.ndarray
    title_end: np.ndarray
    end: np.ndarray
    newlines: np.ndarray  # positions of every b"\n" in the block

    @classmethod
    def of(cls, text: bytes) -> _RecordSpans:
        codes = np.frombuffer(text, dtype=np.uint8)
        size = len(codes)
        newlines = np.flatnonzero(codes == 10)
        line_start = np.concatenate([[0], newlines + 1])
        line_end = np.concatenate([newlines, [size]])
        if line_start[-1] == size:  # the block ends with a line break: no line after it
            line_start, line_end = line_start[:-1], line_end[:-1]
        header = codes[line_start] == ord(">")
        head = line_start[header]
        return cls(head, line_end[header], np.append(head[1:], size), newlines)

    def __len__(self) -> int:
        return len(self.head)

    def cut(self, text: bytes, begin: int, stop: int, table: bytes | None = None,
            reject: bytes = b"") -> tuple[bytes, bytes, np.ndarray] | None:
        """(titles joined by b"\n", sequences concatenated, lengths) of records begin..stop-1.

        With `table` the sequences come translated through it (bytes.translate, in the pass that
        removes the line breaks), or None when a translated byte is in `reject` or a title ends in
        whitespace: the chunk is then the caller's to parse without a table (see
        `translated_chunk_of_block`). Whitespace inside sequences must translate into `reject`.
        """
        if stop <= begin:
            return b"", b"", np.zeros(0, dtype=np.int64)
        head, title_end = self.head[begin:stop], self.title_end[begin:stop]
        end = self.end[begin:stop]
        body = np.minimum(title_end + 1, end)  # a header on the block's last line has no body
        lines = np.searchsorted(self.newlines, end) - np.searchsorted(self.newlines, body)
        codes = np.frombuffer(text, dtype=np.uint8)
        last_title_byte = codes[np.maximum(title_end - 1, head)]
        if (_IS_WHITESPACE[last_title_byte] & (title_end > head + 1)).any():
            return None if table is not None else self._parsed_by_biopython(text, begin, stop)
        lengths = (end - body) - lines
        first, last = int(head[0]), int(end[-1])
        if codes[last - 1] == 10 and (lines == 1).all():
            # One line per sequence (most UniProt-style files): the lines alternate header, sequence,
            # so one split gives both, and no line break is left to delete.
            piece = text if (first, last) == (0, len(text)) else text[first:last]
            parts = piece.split(b"\n")  # header, sequence, ..., header, sequence, b""
            titles = b"\n".join(parts[0:-1:2])[1:].replace(b"\n>", b"\n")
            raw, breaks = b"".join(parts[1::2]), b""
        else:
            titles = b"\n".join([text[a + 1:b] for a, b in zip(head.tolist(), title_end.tolist())])
            raw = b"".join([text[a:b] for a, b in zip(body.tolist(), end.tolist())])
            breaks = b"\n"
        if table is not None:
            sequences = raw.translate(table, breaks)
            if any(code in sequences for code in reject):
                return None
            return titles, sequences, lengths.astype(np.int64)
        sequences = raw.translate(None, breaks + _WHITESPACE)
        if len(sequences) != int(lengths.sum()):
            return self._parsed_by_biopython(text, begin, stop)
        return titles, sequences, lengths.astype(np.int64)

    def _parsed_by_biopython(self, text: bytes, begin: int, stop: int) -> tuple[bytes, bytes, np.ndarray]:
        """cut() by SimpleFastaParser: for chunks with whitespace inside sequences or after titles."""
        piece = text[int(self.head[begin]):int(self.end[stop - 1])]
        from Bio.SeqIO.FastaIO import SimpleFastaParser  # imported when used: Bio.SeqIO costs 0.1 s to import

        return _join_records(list(SimpleFastaParser(io.StringIO(piece.decode("latin-1")))))


_BLOCK_BYTES = 4 << 20  # decompressed bytes per block of records (a block grows to hold a longer record)


def record_blocks(path: Path, block_bytes: int | None = None) -> Iterator[tuple[bytes, int, int, bool]]:
    """(block, its decompressed offset in the file, raw file position, is last) over the decompressed
    file: each block is whole records (it starts with a header line and ends where the next one
    starts) of about `block_bytes` (default _BLOCK_BYTES); text before the first header (blank lines:
    the opener's check allows nothing else) is dropped."""
    for pieces, offset, position, last in record_block_pieces(path, block_bytes):
        yield b"".join(pieces), offset, position, last


def record_block_pieces(path: Path, block_bytes: int | None = None) -> Iterator[tuple[list[bytes | memoryview], int,
                                                                                    int, bool]]:
    """`record_blocks` with each block still in the pieces it was inflated in (bytes and views of
    them, never copied here): the parallel build hands these to a worker, which joins them."""
    check_fasta(path)
    block_bytes = block_bytes or _BLOCK_BYTES
    pieces: list[bytes | memoryview] = []  # decompressed bytes not yet handed out
    size = 0
    due = block_bytes  # doubles while one record outgrows it, so a huge record is copied O(1) times
    offset = 0  # decompressed offset of pieces[0]
    started = False
    with open(path, "rb") as raw:
        for data in _in_thread(_decompressed(raw, path)):
            if not started:
                first = data.find(b">")
                if first < 0:
                    offset += len(data)
                    continue
                data, started = data[first:], True
                offset += first
            pieces.append(data)
            size += len(data)
            if size < due:
                continue
            cut = data.rfind(b"\n>")  # the block's last record starts in the newest piece (as a rule)
            if cut >= 0 and size - len(data) + cut > 0:
                view = memoryview(data)
                block, rest = [*pieces[:-1], view[:cut + 1]], view[cut + 1:]
            else:
                pending = b"".join(pieces)
                cut = pending.rfind(b"\n>")
                if cut <= 0:  # one record longer than a block: keep reading until it ends
                    pieces, due = [pending], 2 * size
                    continue
                view = memoryview(pending)
                block, rest = [view[:cut + 1]], view[cut + 1:]
            yield block, offset, raw.tell(), False
            offset += size - len(rest)
            pieces, size, due = [rest], len(rest), block_bytes
        yield pieces, offset, raw.tell(), True


class RecordRange(NamedTuple):
    """The records of a plain (uncompressed) file whose header starts in bytes [start, stop): what a
    parallel worker reads for itself, so the parent never touches the bytes. `origin` is the file's
    first '>' (only blank lines may come before it). Ranges that tile [origin, size) hold every
    record exactly once, and the records of range k are those record_blocks would give there."""

    path: Path
    start: int
    stop: int
    origin: int

    def read(self) -> tuple[bytes, int]:
        """(the range's records as one block of whole records, the file offset of that block)."""
        with open(self.path, "rb") as raw:
            begin = self.start if self.start == self.origin else self.start - 1  # to see the line break before start
            raw.seek(begin)
            data = raw.read(self.stop - begin + _LOOKAHEAD_BYTES)  # past stop: the next header, as a rule
            first = 0 if self.start == self.origin else data.find(b"\n>", 0, self.stop - begin) + 1
            if first == 0 and self.start != self.origin:  # no record starts here: it is all one longer record
                return b"", self.stop
            end = data.find(b"\n>", self.stop - begin - 1)  # the line break before the first header from stop
            if end >= 0:
                return data[first:end + 1], begin + first
            pieces, last = [memoryview(data)[first:]], data[-1:]
            while more := raw.read(_READ_BYTES):  # the last record runs on to the next header
                cut = (last + more).find(b"\n>")
                if cut >= 0:
                    pieces.append(more[:cut])
                    break
                pieces.append(more)
                last = more[-1:]
        return b"".join(pieces), begin + first


_LOOKAHEAD_BYTES = 1 << 16


def record_ranges(path: Path, range_bytes: int | None = None) -> Iterator[RecordRange] | None:
    """RecordRanges of about `range_bytes` (default _BLOCK_BYTES) tiling a plain file; None for gzip."""
    check_fasta(path)
    with open(path, "rb") as raw:
        head = raw.read(1 << 16)
        size = os.fstat(raw.fileno()).st_size
    if head[:2] == GZIP_MAGIC:
        return None
    origin = head.find(b">")
    step = range_bytes or _BLOCK_BYTES
    return (RecordRange(path, start, min(start + step, size), origin) for start in range(origin, size, step))


def records_before(path: Path, offset: int) -> int:
    """How many records start before decompressed byte `offset` of `path` (error path only)."""
    count = 0
    for block, start, _, _ in record_blocks(path):
        if start >= offset:
            break
        count += len(_RecordSpans.of(block[:offset - start]))
    return count


def _in_thread(items: Iterator[bytes], ahead: int = 4) -> Iterator[bytes]:
    """`items`, produced by a thread up to `ahead` items in advance (exceptions re-raised here).

    Reading and gunzipping release the GIL, so the file is decompressed while the caller parses.
    """
    pieces: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(pieces, (True, item), stop):
                    return
            outcome: tuple[bool, Any] = (False, None)
        except BaseException as error:  # handed to the consumer, which raises it
            outcome = (False, error)
        _put(pieces, outcome, stop)

    worker = threading.Thread(target=produce, name="fasta-inflate", daemon=True)
    worker.start()
    try:
        while True:
            more, item = pieces.get()
            if more:
                yield item
            elif item is not None:
                raise item
            else:
                return
    finally:
        stop.set()
        worker.join()


_READ_BYTES = 1 << 20
_INFLATE_LIMIT = 16 << 20  # decompressed bytes per call: bounds memory whatever the compression ratio


def _decompressed(raw: IO[bytes], path: Path) -> Iterator[bytes]:
    """The file's bytes, gunzipped if it is gzip (by its magic; several members in a row, as
    bgzip and `cat a.gz b.gz` make, are read one after another). A truncated or corrupt stream
    raises FastaFormatError naming the line where the readable text ends."""
    compressed = raw.read(2) == GZIP_MAGIC
    raw.seek(0)
    if not compressed:
        while data := raw.read(_READ_BYTES):
            yield data
        return
    inflater, fed = INFLATE.decompressobj(31), False
    try:
        while data := raw.read(_READ_BYTES):
            while data:
                if not fed and inflater.unused_data == b"" and not data.strip(b"\x00"):
                    data = b""  # zero padding after the last member (gzip tolerates it too)
                    break
                fed = True
                out = inflater.decompress(data, _INFLATE_LIMIT)
                if out:
                    yield out
                data = inflater.unconsumed_tail
                if inflater.eof:  # end of a member: the rest may start another
                    data = inflater.unused_data + data
                    inflater, fed = INFLATE.decompressobj(31), False
        if fed:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
    except GZIP_STREAM_ERRORS as error:
        raise truncated_gzip_error(path, error) from None


def _put(items: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put `item` into a bounded queue, waiting while it is full; False if `stop` is set first."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
