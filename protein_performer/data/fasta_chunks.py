"""The fast FASTA chunk reader behind `build_token_store`: blocks of bytes in, chunks of records out.

    read_fasta_chunks(path)                  FastaChunks of a few thousand records as joined byte strings
    read_fasta_chunks_reference(path)        the same by Biopython's SimpleFastaParser (the reference)
    read_fasta_chunks_in_background(paths)   read_fasta_chunks in a child process, overlapping the caller

It must keep up with 100 GB of TrEMBL: a thread decompresses the file (zlib releases the GIL) into
blocks of whole records, and each chunk is cut out of its block with numpy and a few slices per
record, with no str per line; `read_fasta_chunks_in_background` moves all of that into a child
process that dies with its parent. Opening and the file's checks are fasta.py's (`open_fasta`,
`check_fasta`), shared with `read_fasta`.
"""
from __future__ import annotations

import gc
import io
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

from protein_performer.data.errors import DataError, FastaFormatError
from protein_performer.data.fasta import (
    GZIP_MAGIC,
    GZIP_STREAM_ERRORS,
    check_fasta,
    open_fasta,
    truncated_gzip_error,
)
from protein_performer.errors import raise_if_interrupted

__all__ = ["FastaChunk", "read_fasta_chunks", "read_fasta_chunks_reference", "read_fasta_chunks_in_background"]


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
    with open_fasta(path) as (text, raw):
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
    compressed = raw.read(2) == GZIP_MAGIC
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
    except GZIP_STREAM_ERRORS as error:
        raise truncated_gzip_error(path, error) from None


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
    if hasattr(signal, "pthread_sigmask"):  # blocked by the parent across the fork (_start_unsignalled)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _START_BLOCKED)
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


_START_BLOCKED = {signal.SIGTERM, signal.SIGINT}


def _start_unsignalled(process: Any) -> None:
    """`process.start()` with SIGTERM and SIGINT blocked in this thread, so the child is born with them
    blocked (the mask is inherited) until `_die_with_parent` has replaced the parent's handlers.
    Otherwise a SIGTERM in the window between fork and that point runs the parent's handler inside the
    child's at-fork hooks (an "Exception ignored" traceback on the shared stderr). Signals that arrive
    meanwhile stay pending here and are handled once the mask is restored."""
    if not hasattr(signal, "pthread_sigmask"):
        process.start()
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _START_BLOCKED)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
    _start_unsignalled(process)
    sender.close()
    messages: queue.Queue[tuple] = queue.Queue(maxsize=_CHUNKS_AHEAD)
    stop = threading.Event()
    drain = threading.Thread(target=_receive, args=(receiver, messages, stop), name="fasta-receiver", daemon=True)
    drain.start()
    try:
        while True:
            message = _get(messages)
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


_SIGNAL_POLL_SECONDS = 0.1


def _get(items: queue.Queue) -> Any:
    """The next item of `items`, waiting for it at a safe point: a SIGTERM or Ctrl-C meanwhile is raised."""
    while True:
        raise_if_interrupted()
        try:
            return items.get(timeout=_SIGNAL_POLL_SECONDS)
        except queue.Empty:
            continue


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
