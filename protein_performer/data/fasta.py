"""FASTA reading: plain or gzip, one file or a glob, with errors that name the file and the line.

Two readers share one opener and its checks:
- `read_fasta` yields one `FastaRecord` per protein (accession, description, sequence, header line):
  the friendly interface, for embedding a few thousand proteins.
- `read_fasta_chunks` yields `FastaChunk`s of a few thousand records as joined byte strings: the fast
  path behind `build_token_store`, which must keep up with 100 GB of TrEMBL. Both parse with
  Biopython's `SimpleFastaParser` (plain string tuples, no SeqRecord per protein).
  `read_fasta_chunks_in_background` runs it in a child process so parsing and encoding overlap.

Accessions, the stable key of a record (splits hash it):
- UniProtKB `>db|ACCESSION|ENTRY_NAME description OS=... OX=... GN=... PE=... SV=...` -> ACCESSION
- UniRef `>UniRef50_Q6GZX4 description n=1 Tax=... TaxID=... RepID=...` -> UniRef50_Q6GZX4
- anything else: the first word of the header (`>1es5-A` -> 1es5-A)
"""
from __future__ import annotations

import gc
import glob
import gzip
import io
import multiprocessing
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

from protein_performer.errors import UserError

__all__ = [
    "DataError",
    "FastaFormatError",
    "FastaRecord",
    "FastaChunk",
    "expand_inputs",
    "parse_accession",
    "accession_spans",
    "check_fasta",
    "read_fasta",
    "read_fasta_chunks",
    "read_fasta_chunks_reference",
    "read_fasta_chunks_in_background",
    "header_line_of_record",
]

PathInput = str | os.PathLike[str]
_GZIP_MAGIC = b"\x1f\x8b"
_HEAD_BYTES = 1 << 16  # how much of a file the opener inspects for binary content
_READ_BUFFER = 1 << 20
# Control bytes that never occur in text (whitespace excluded): their presence means binary input.
_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")
_GLOB_CHARACTERS = re.compile(r"[*?\[]")
# What a damaged gzip stream raises while it is being read.
_STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


class DataError(UserError):
    """Bad input data or configuration. The message names the file (and line) and what to do.

    Command-line entry points print it without a traceback and exit with status 2.
    """


class FastaFormatError(DataError):
    """A file that is not valid FASTA: empty, binary, text before the first '>', truncated gzip."""


@dataclass(frozen=True)
class FastaRecord:
    """One protein of a FASTA file."""

    accession: str  # stable key (see the module docstring)
    description: str  # the whole header line without '>'
    sequence: str  # residues as written (whitespace removed; case, gaps and '*' untouched)
    line: int  # 1-based line number of the header in its file
    path: Path


@dataclass(frozen=True)
class FastaChunk:
    """Consecutive records of one file, as joined byte strings (latin-1, byte for byte).

    titles: the n header lines without '>', joined with b"\\n".
    sequences: the n sequences concatenated (whitespace removed), lengths[i] bytes each.
    """

    path: Path
    first_record: int  # index of the chunk's first record in its file (0-based)
    titles: bytes
    sequences: bytes
    lengths: np.ndarray  # int64 [n]
    position: int  # bytes of the (possibly compressed) file consumed so far: progress, not exact

    def __len__(self) -> int:
        return len(self.lengths)


def expand_inputs(inputs: PathInput | Sequence[PathInput]) -> list[Path]:
    """Files named by a path, a glob (`uniref/*.fasta.gz`), or a list of either; sorted per glob.

    Raises DataError for a glob that matches nothing, a missing file or a directory.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise DataError("no input given: pass a FASTA file or a glob such as 'data/*.fasta.gz'")
    paths: list[Path] = []
    for item in items:
        pattern = os.path.expanduser(os.fspath(item))
        if _GLOB_CHARACTERS.search(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern")
            paths.extend(Path(p) for p in matches)
        elif os.path.isdir(pattern):
            raise DataError(f"{pattern}: is a directory; pass a file or a glob such as '{pattern}/*.fasta'")
        elif not os.path.exists(pattern):
            raise DataError(f"{pattern}: no such file")
        else:
            paths.append(Path(pattern))
    return list(dict.fromkeys(paths))  # a file named twice is read once


def parse_accession(title: str) -> str:
    """The record key of a header line (without '>'): see the module docstring. '' if there is none.

    The reference for `accession_spans`, which does the same for thousands of headers at once.
    """
    words = title.split(None, 1)
    if not words:
        return ""
    word = words[0]
    if "|" in word:
        field = word.split("|")[1]
        if field:
            return field
    return word


def accession_spans(titles: bytes, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each accession lies in `titles` (`count` header lines joined by b"\\n").

    Returns (start, stop) int64 [count]: accession i is titles[start[i]:stop[i]], exactly what
    `parse_accession` returns for that line. Vectorised over the chunk: positions of newlines, blanks
    and '|' found once with numpy, then matched to lines by binary search.
    """
    text = np.frombuffer(titles, dtype=np.uint8)
    end = len(text)
    newlines = np.flatnonzero(text == ord("\n"))
    if len(newlines) != count - 1:
        raise ValueError(f"{count} titles expected, found {len(newlines) + 1} lines")
    line_start = np.concatenate([[0], newlines + 1])
    line_end = np.concatenate([newlines, [end]])
    blanks = np.flatnonzero((text == ord(" ")) | (text == ord("\t")))
    word_end = np.minimum(np.append(blanks, end)[np.searchsorted(blanks, line_start)], line_end)
    pipes = np.flatnonzero(text == ord("|"))
    padded = np.append(pipes, [end, end])
    k = np.searchsorted(pipes, line_start)
    first_pipe, second_pipe = padded[k], padded[k + 1]
    in_word = first_pipe < word_end
    field_stop = np.minimum(second_pipe, word_end)
    use_field = in_word & (field_stop > first_pipe + 1)  # an empty field falls back to the word
    start = np.where(use_field, first_pipe + 1, line_start)
    stop = np.where(use_field, field_stop, word_end)
    # A header with leading blanks ('> P12345 ...') is rare: parse those few lines the slow way.
    leading = np.flatnonzero((word_end == line_start) & (line_end > line_start))
    for i in leading:
        line = titles[line_start[i]:line_end[i]].decode("latin-1")
        accession = parse_accession(line).encode("latin-1")
        offset = titles.find(accession, line_start[i], line_end[i]) if accession else line_start[i]
        start[i], stop[i] = offset, offset + len(accession)
    return start.astype(np.int64), stop.astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Opening and checking a file.


def _line_of_offset(head: bytes, offset: int) -> int:
    return head.count(b"\n", 0, offset) + 1


@contextmanager
def _open_fasta(path: Path) -> Iterator[tuple[IO[str], IO[bytes]]]:
    """(text handle, raw file) of a plain or gzip FASTA (detected by its magic bytes, not its name).

    Checks the first 64 KiB: empty file, binary content, text before the first '>'. The raw file's
    position reports progress through the compressed bytes.
    """
    try:
        raw = open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot open ({error.strerror})") from None
    with raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        buffered = io.BufferedReader(stream, _READ_BUFFER)  # type: ignore[arg-type]
        try:
            head = buffered.peek(_HEAD_BYTES)[:_HEAD_BYTES]
        except EOFError as error:
            raise _truncated(path, error) from None
        except (*_STREAM_ERRORS, OSError) as error:
            raise FastaFormatError(f"{path}: not a readable gzip file ({error})") from None
        _check_head(path, head, compressed)
        text = io.TextIOWrapper(buffered, encoding="latin-1", newline="\n")
        try:
            yield text, raw
        finally:
            text.close()  # and with it the buffer and the gzip stream


def check_fasta(path: Path) -> None:
    """Open `path` and check its start (empty, binary, text before the first '>'); FastaFormatError if bad."""
    with _open_fasta(path):
        pass


def _check_head(path: Path, head: bytes, compressed: bool) -> None:
    kind = "gzip file" if compressed else "file"
    if not head.strip():
        raise FastaFormatError(f"{path}: empty {kind}: no FASTA records")
    control = _CONTROL.search(head)
    if control is not None:
        line = _line_of_offset(head, control.start())
        raise FastaFormatError(f"{path}:{line}: binary data (byte 0x{head[control.start()]:02x} at offset "
                               f"{control.start()}{' after decompression' if compressed else ''}); "
                               "expected FASTA text")
    first = len(head) - len(head.lstrip())
    if head[first:first + 1] != b">":
        line = _line_of_offset(head, first)
        snippet = head[first:first + 40].split(b"\n")[0].decode("latin-1")
        raise FastaFormatError(f"{path}:{line}: text before the first '>' header ({snippet!r}); "
                               "a FASTA file starts with a '>' header line")


def _truncated(path: Path, error: BaseException) -> FastaFormatError:
    line = _lines_before_failure(path)
    return FastaFormatError(f"{path}:{line}: the gzip stream is truncated or corrupt: the text breaks off at line "
                            f"{line} ({error}); re-download or re-compress the file")


def _lines_before_failure(path: Path) -> int:
    """Number of the line the readable part of a damaged gzip stream ends in (error path only)."""
    lines = 1
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as stream:
        try:
            while block := stream.read1(1 << 16):
                lines += block.count(b"\n")
        except _STREAM_ERRORS:
            pass
    return lines


def header_line_of_record(path: Path, record: int) -> int:
    """1-based line of the header of record number `record` (0-based) in `path` (error path only)."""
    with _open_fasta(path) as (text, _):
        seen = -1
        for number, line in enumerate(text, start=1):
            if line.startswith(">"):
                seen += 1
                if seen == record:
                    return number
    raise ValueError(f"{path} has no record number {record}")


# ----------------------------------------------------------------------------------------------------
# Readers.


def read_fasta(inputs: PathInput | Sequence[PathInput]) -> Iterator[FastaRecord]:
    """Every record of the input files (a path, a glob or a list), in order, empty sequences included.

    Raises FastaFormatError naming the file and line for: an empty file, binary content, text before
    the first '>', a truncated gzip stream, a header without an identifier.
    """
    for path in expand_inputs(inputs):
        yield from _read_one(path)


def _read_one(path: Path) -> Iterator[FastaRecord]:
    header_lines: deque[int] = deque()

    def numbered(handle: IO[str]) -> Iterator[str]:
        for number, line in enumerate(handle, start=1):
            if line.startswith(">"):
                header_lines.append(number)
            yield line

    count = 0
    with _open_fasta(path) as (text, _):
        records = SimpleFastaParser(numbered(text))
        while True:
            try:
                title, sequence = next(records)
            except StopIteration:
                break
            except _STREAM_ERRORS as error:
                raise _truncated(path, error) from None
            line = header_lines.popleft()
            if _CONTROL.search(title.encode("latin-1")) is not None:
                raise FastaFormatError(f"{path}:{line}: binary data in this header line; expected FASTA text")
            accession = parse_accession(title)
            if not accession:
                raise FastaFormatError(f"{path}:{line}: header line has no identifier: '>{title}'")
            control = _CONTROL.search(sequence.encode("latin-1"))
            if control is not None:
                raise FastaFormatError(f"{path}: binary data in the sequence of the record at line {line} "
                                       f"(byte 0x{ord(sequence[control.start()]):02x}); expected FASTA text")
            count += 1
            yield FastaRecord(accession, title, sequence, line, path)
    if count == 0:
        raise FastaFormatError(f"{path}: no FASTA records")


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
    for block, position, last in _record_blocks(path):
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
    with _open_fasta(path) as (text, raw):
        parser = SimpleFastaParser(text)
        while True:
            try:
                batch = list(islice(parser, chunk_records))
            except _STREAM_ERRORS as error:
                raise _truncated(path, error) from None
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

    def cut(self, text: bytes, begin: int, stop: int) -> tuple[bytes, bytes, np.ndarray]:
        """(titles joined by b"\n", sequences concatenated, lengths) of records begin..stop-1."""
        head, title_end = self.head[begin:stop], self.title_end[begin:stop]
        end = self.end[begin:stop]
        body = np.minimum(title_end + 1, end)  # a header on the block's last line has no body
        lines = np.searchsorted(self.newlines, end) - np.searchsorted(self.newlines, body)
        raw = b"".join([text[a:b] for a, b in zip(body.tolist(), end.tolist())])
        sequences = raw.translate(None, b"\n" + _WHITESPACE)
        lengths = (end - body) - lines
        last_title_byte = np.frombuffer(text, dtype=np.uint8)[np.maximum(title_end - 1, head)]
        if len(sequences) != int(lengths.sum()) or (_IS_WHITESPACE[last_title_byte] & (title_end > head + 1)).any():
            records = list(SimpleFastaParser(io.StringIO(text[int(head[0]):int(end[-1])].decode("latin-1"))))
            return _join_records(records)
        titles = b"\n".join([text[a + 1:b] for a, b in zip(head.tolist(), title_end.tolist())])
        return titles, sequences, lengths.astype(np.int64)


_BLOCK_BYTES = 4 << 20  # decompressed bytes per block of records (a block grows to hold a longer record)


def _record_blocks(path: Path) -> Iterator[tuple[bytes, int, bool]]:
    """(block, raw file position, is last) over the decompressed file: each block is whole records
    (it starts with a header line and ends where the next one starts); text before the first
    header (blank lines: the opener's check allows nothing else) is dropped."""
    check_fasta(path)
    pieces: list[bytes] = []  # decompressed bytes not yet handed out, joined only when a block is due
    size = 0
    due = _BLOCK_BYTES  # doubles while one record outgrows it, so a huge record is copied O(1) times
    started = False
    with open(path, "rb") as raw:
        for data in _in_thread(_decompressed(raw, path)):
            if not started:
                first = data.find(b">")
                if first < 0:
                    continue
                data, started = data[first:], True
            pieces.append(data)
            size += len(data)
            if size < due:
                continue
            pending = b"".join(pieces)
            cut = pending.rfind(b"\n>")
            if cut <= 0:  # one record longer than a block: keep reading until it ends
                pieces, due = [pending], 2 * size
                continue
            yield pending[:cut + 1], raw.tell(), False
            rest = pending[cut + 1:]
            pieces, size, due = [rest], len(rest), _BLOCK_BYTES
        yield b"".join(pieces), raw.tell(), True


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
    compressed = raw.read(2) == _GZIP_MAGIC
    raw.seek(0)
    if not compressed:
        while data := raw.read(_READ_BYTES):
            yield data
        return
    inflater, fed = zlib.decompressobj(31), False
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
                    inflater, fed = zlib.decompressobj(31), False
        if fed:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
    except _STREAM_ERRORS as error:
        raise _truncated(path, error) from None


def _reader_main(paths: list[Path], chunk_records: int, connection: Any, parent_end: Any, parent: int) -> None:
    """Child process: parse every file and send its chunks, then ("done",) or ("error", ...)."""
    _die_with_parent(parent)
    # The fork duplicated the parent's end of the pipe: closed here, the parent's death breaks the pipe
    # (a send fails) instead of leaving this process blocked on a pipe it holds open itself.
    parent_end.close()
    gc.disable()  # the parser makes millions of short-lived tuples; cyclic GC finds nothing in them
    try:
        for path in paths:
            for chunk in read_fasta_chunks(path, chunk_records):
                connection.send(("chunk", chunk))
        connection.send(("done",))
    except DataError as error:
        connection.send(("error", error))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone or stopped reading: nothing to report to
    except BaseException:  # anything else is a bug: hand its traceback to the parent
        connection.send(("crash", traceback.format_exc()))
    finally:
        connection.close()


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PARENT_POLL_SECONDS = 0.5


def _die_with_parent(parent: int) -> None:
    """Make this (forked) process end when `parent` does, however it ends (SIGKILL and OOM kills included).

    Signals first: the forked child inherited the parent's Python handlers (which would turn the
    parent's terminate() into an exception here); SIGTERM gets its default action back and SIGINT
    (Ctrl-C reaches the whole process group) is left to the parent, which stops this process itself.
    Then Linux's PR_SET_PDEATHSIG delivers SIGKILL when the parent dies (strictly: when the thread
    that forked it ends, which is the thread consuming the chunks); a thread polling the parent's pid
    covers other systems and the moment before prctl took effect.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the poll below still ends this process

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before prctl was set
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_CHUNKS_AHEAD = 8  # chunks the background reader may have parsed before the caller takes them


def read_fasta_chunks_in_background(paths: Sequence[Path], chunk_records: int = 2048) -> Iterator[FastaChunk]:
    """`read_fasta_chunks` over several files, parsed in a child process while the caller works.

    Parsing (and gunzipping) is most of preprocessing; with it in its own process the caller's
    encoding, compression and HDF5 writing overlap with it. A thread of the caller drains the pipe
    into a queue of at most `_CHUNKS_AHEAD` chunks, so the child keeps parsing while the caller is
    busy (a pipe alone holds 64 KiB: the child would wait for every chunk to be read), and memory
    stays constant. Errors raised in the child (DataError) are raised again here.
    """
    methods = multiprocessing.get_all_start_methods()
    # fork: the child needs nothing but this module and starts instantly; it never touches the
    # parent's HDF5 or tqdm state, which is what makes forking unsafe elsewhere.
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_reader_main, args=(list(paths), chunk_records, sender, receiver, os.getpid()),
                              name="fasta-reader", daemon=True)
    process.start()
    sender.close()
    messages: queue.Queue[tuple] = queue.Queue(maxsize=_CHUNKS_AHEAD)
    stop = threading.Event()
    drain = threading.Thread(target=_receive, args=(receiver, messages, stop), name="fasta-receiver", daemon=True)
    drain.start()
    try:
        while True:
            message = messages.get()
            if message[0] == "chunk":
                yield message[1]
            elif message[0] == "done":
                return
            elif message[0] == "error":
                raise message[1]
            elif message[0] == "died":
                process.join()
                raise RuntimeError(f"the FASTA reader process died (exit code {process.exitcode})")
            else:
                raise RuntimeError(f"the FASTA reader process failed:\n{message[1]}")
    finally:
        stop.set()
        if process.is_alive():
            process.terminate()  # its end of the pipe closes: a pending recv returns
        drain.join()
        receiver.close()
        process.join(timeout=5)
        if process.is_alive():  # cannot happen with SIGTERM's default action; never hang on it
            process.kill()
            process.join()


def _receive(receiver: Any, messages: queue.Queue, stop: threading.Event) -> None:
    """Thread: move the child's messages into `messages` until its last one (or the caller stops)."""
    while not stop.is_set():
        try:
            message = receiver.recv()
        except (EOFError, OSError):
            message = ("died",)
        if not _put(messages, message, stop) or message[0] != "chunk":
            return


def _put(items: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put `item` into a bounded queue, waiting while it is full; False if `stop` is set first."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
