"""FASTA records: plain or gzip, one file or a glob, with errors that name the file and the line.

- `read_fasta` yields one `FastaRecord` per protein (accession, description, sequence, header line),
  parsed by Biopython's `SimpleFastaParser`: the friendly interface, for embedding a few thousand
  proteins and for the records' reference.
- The fast path behind `build_token_store`, `read_fasta_chunks` (chunks of records as joined byte
  strings, cut out of decompressed blocks with numpy), lives in `fasta_chunks.py`, which builds on this module (never
  the other way round); it gives exactly what SimpleFastaParser gives, and falls back to it for
  records with unusual whitespace. Both readers share this module's opener and its checks
  (`open_fasta`) and its inflater (`INFLATE`: ISA-L's when the `isal` package is installed, about
  2x zlib's speed; the standard library's zlib otherwise).

Accessions, the stable key of a record (splits hash it):
- UniProtKB `>sp|ACCESSION|ENTRY_NAME description OS=...` (or `tr|`) -> ACCESSION
- UniRef `>UniRef50_Q6GZX4 description n=1 Tax=... TaxID=... RepID=...` -> UniRef50_Q6GZX4, and
  `>UniRef50|Q6GZX4|...` -> Q6GZX4 (the `db|ACC|NAME` rule holds for the tags in UNIPROT_TAGS only)
- anything else: the first word of the header (`>1es5-A` -> 1es5-A, `>cath|4_1_0|102mA00/0-153` ->
  cath|4_1_0|102mA00/0-153: another database's `|` fields are not UniProt's)
"""
from __future__ import annotations

import glob
import gzip
import io
import os
import re
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

try:  # ISA-L inflates gzip about twice as fast as zlib (benchmarks/preprocess.py); optional
    from isal import igzip as GZIP
    from isal import isal_zlib as INFLATE
except ImportError:  # pragma: no cover - the standard library is the fallback
    GZIP, INFLATE = gzip, zlib  # type: ignore[misc]

from protein_performer.data.errors import DataError, FastaFormatError

__all__ = [
    "DataError",
    "FastaFormatError",
    "FastaRecord",
    "expand_inputs",
    "parse_accession",
    "accession_spans",
    "check_fasta",
    "open_raw",
    "open_fasta",
    "read_fasta",
    "header_line_of_record",
    "truncated_gzip_error",
]

PathInput = str | os.PathLike[str]
GZIP_MAGIC = b"\x1f\x8b"
_HEAD_BYTES = 1 << 16  # how much of a file the opener inspects for binary content
_READ_BUFFER = 1 << 20
# Control bytes that never occur in text (whitespace excluded): their presence means binary input.
CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")
_GLOB_CHARACTERS = re.compile(r"[*?\[]")
_DIGIT = re.compile(rb"[0-9]")
# What a damaged gzip stream raises while it is being read.
GZIP_STREAM_ERRORS = tuple(dict.fromkeys((EOFError, zlib.error, gzip.BadGzipFile, INFLATE.error, GZIP.BadGzipFile)))
# The first `|` fields under which the second field is the accession (UniProtKB, and UniRef written
# with bars); a UniRef tag is "UniRef" plus a number ("UniRef50").
UNIPROT_TAGS = (b"sp", b"tr")
UNIREF_PREFIX = b"UniRef"


@dataclass(frozen=True)
class FastaRecord:
    """One protein of a FASTA file."""

    accession: str  # stable key (see the module docstring)
    description: str  # the whole header line without '>'
    sequence: str  # residues as written (whitespace removed; case, gaps and '*' untouched)
    line: int  # 1-based line number of the header in its file
    path: Path


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
        tag, field = word.split("|")[:2]
        if field and _is_uniprot_tag(tag.encode("latin-1")):
            return field
    return word


def _is_uniprot_tag(tag: bytes) -> bool:
    return tag in UNIPROT_TAGS or (tag.startswith(UNIREF_PREFIX) and tag[len(UNIREF_PREFIX):].isdigit())


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
    # The field counts only under a UniProt tag: sp and tr compared as byte pairs, UniRef<n> one by one.
    tag_length = np.where(in_word, first_pipe - line_start, 0)
    first_byte = text[np.minimum(line_start, end - 1)] if end else np.zeros(count, dtype=np.uint8)
    second_byte = text[np.minimum(line_start + 1, end - 1)] if end else first_byte
    sp_or_tr = (tag_length == 2) & (((first_byte == ord("s")) & (second_byte == ord("p")))
                                    | ((first_byte == ord("t")) & (second_byte == ord("r"))))
    for i in np.flatnonzero(use_field & ~sp_or_tr & (tag_length > len(UNIREF_PREFIX)) & (first_byte == ord("U"))):
        sp_or_tr[i] = _is_uniprot_tag(titles[line_start[i]:first_pipe[i]])
    use_field &= sp_or_tr
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
def open_fasta(path: Path) -> Iterator[tuple[IO[str], IO[bytes]]]:
    """(text handle, raw file) of a plain or gzip FASTA (detected by its magic bytes, not its name).

    Checks the first 64 KiB: empty file, binary content, text before the first '>'. The raw file's
    position reports progress through the compressed bytes.
    """
    with open_raw(path) as (raw, compressed):
        stream: IO[bytes] = GZIP.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        buffered = io.BufferedReader(stream, _READ_BUFFER)  # type: ignore[arg-type]
        _check_head(path, _readable(path, lambda: buffered.peek(_HEAD_BYTES)[:_HEAD_BYTES]), compressed)
        text = io.TextIOWrapper(buffered, encoding="latin-1", newline="\n")
        try:
            yield text, raw
        finally:
            text.close()  # and with it the buffer and the gzip stream


def check_fasta(path: Path) -> None:
    """Check the start of `path` (empty, binary, text before the first '>'), as `open_fasta` does; a
    FastaFormatError (DataError if it cannot be opened) if bad. Reads only the first _HEAD_BYTES (the
    opener fills a whole read buffer: a megabyte inflated for nothing on every check of a gzip file)."""
    with open_raw(path) as (raw, compressed):
        if compressed:
            with GZIP.GzipFile(fileobj=raw, mode="rb") as stream:
                head = _readable(path, lambda: stream.read(_HEAD_BYTES))
        else:
            head = raw.read(_HEAD_BYTES)
    _check_head(path, head, compressed)


@contextmanager
def open_raw(path: Path, what: str = "") -> Iterator[tuple[IO[bytes], bool]]:
    """`path` open for reading bytes, and whether it is gzip (by its magic, not its name); a DataError
    naming it (as `what`, e.g. "the clusters file") if it cannot be opened."""
    try:
        raw = open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot open{' ' + what if what else ''} ({error.strerror})") from None
    with raw:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        yield raw, compressed


def _readable(path: Path, read: Callable[[], bytes]) -> bytes:
    """read() of a file's start, a broken gzip stream reported as the FastaFormatError naming the file."""
    try:
        return read()
    except EOFError as error:
        raise truncated_gzip_error(path, error) from None
    except (*GZIP_STREAM_ERRORS, OSError) as error:
        raise FastaFormatError(f"{path}: not a readable gzip file ({error})") from None


def _check_head(path: Path, head: bytes, compressed: bool) -> None:
    kind = "gzip file" if compressed else "file"
    if not head.strip():
        raise FastaFormatError(f"{path}: empty {kind}: no FASTA records")
    control = CONTROL_BYTES.search(head)
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


def truncated_gzip_error(path: Path, error: BaseException) -> FastaFormatError:
    """The error for a gzip stream that breaks off: it names the line where the readable text ends."""
    line = _lines_before_failure(path)
    return FastaFormatError(f"{path}:{line}: the gzip stream is truncated or corrupt: the text breaks off at line "
                            f"{line} ({error}); re-download or re-compress the file")


def _lines_before_failure(path: Path) -> int:
    """Number of the line the readable part of a damaged gzip stream ends in (error path only)."""
    lines = 1
    # zlib's reader, not ISA-L's: it hands out every byte it could inflate before the damage
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as stream:
        try:
            while block := stream.read1(1 << 16):
                lines += block.count(b"\n")
        except GZIP_STREAM_ERRORS:
            pass
    return lines


def header_line_of_record(path: Path, record: int) -> int:
    """1-based line of the header of record number `record` (0-based) in `path` (error path only)."""
    with open_fasta(path) as (text, _):
        seen = -1
        for number, line in enumerate(text, start=1):
            if line.startswith(">"):
                seen += 1
                if seen == record:
                    return number
    raise ValueError(f"{path} has no record number {record}")


def sequence_line_of_residue(path: Path, record: int, offset: int) -> int:
    """1-based line holding character `offset` (whitespace not counted) of the sequence of record
    number `record` (0-based) in `path` (error path only)."""
    header = header_line_of_record(path, record)
    with open_fasta(path) as (text, _):
        seen = 0
        for number, line in enumerate(text, start=1):
            if number <= header:
                continue
            seen += len("".join(line.split()))
            if seen > offset or line.startswith(">"):
                return number
    return header


def digit_in_sequence_error(path: Path, record: int, offset: int, character: str) -> FastaFormatError:
    """The error for a digit in the sequence of record `record` (0-based), `offset` characters in."""
    line = sequence_line_of_residue(path, record, offset)
    return FastaFormatError(f"{path}:{line}: digit {character!r} in a sequence line; residues are letters "
                            "(a numbered or tabular file? strip position numbers first)")


# ----------------------------------------------------------------------------------------------------
# Readers.


def read_fasta(inputs: PathInput | Sequence[PathInput], *, residues: bool = True) -> Iterator[FastaRecord]:
    """Every record of the input files (a path, a glob or a list), in order, empty sequences included.

    Raises FastaFormatError naming the file and line for: an empty file, binary content, text before
    the first '>', a truncated gzip stream, a header without an identifier, and (with `residues`, for
    sequences of residues) a digit in a sequence. residues=False reads per-residue labels or masks
    kept in FASTA form ('0111...').
    """
    for path in expand_inputs(inputs):
        yield from _read_one(path, residues)


def _read_one(path: Path, residues: bool = True) -> Iterator[FastaRecord]:
    header_lines: deque[int] = deque()

    def numbered(handle: IO[str]) -> Iterator[str]:
        for number, line in enumerate(handle, start=1):
            if line.startswith(">"):
                header_lines.append(number)
            yield line

    count = 0
    with open_fasta(path) as (text, _):
        from Bio.SeqIO.FastaIO import SimpleFastaParser  # imported when used: Bio.SeqIO costs 0.1 s to import

        records = SimpleFastaParser(numbered(text))
        while True:
            try:
                title, sequence = next(records)
            except StopIteration:
                break
            except GZIP_STREAM_ERRORS as error:
                raise truncated_gzip_error(path, error) from None
            line = header_lines.popleft()
            if CONTROL_BYTES.search(title.encode("latin-1")) is not None:
                raise FastaFormatError(f"{path}:{line}: binary data in this header line; expected FASTA text")
            accession = parse_accession(title)
            if not accession:
                raise FastaFormatError(f"{path}:{line}: header line has no identifier: '>{title}'")
            raw = sequence.encode("latin-1")
            digit = _DIGIT.search(raw) if residues else None
            if digit is not None:
                raise digit_in_sequence_error(path, count, digit.start(), sequence[digit.start()])
            control = CONTROL_BYTES.search(raw)
            if control is not None:
                raise FastaFormatError(f"{path}: binary data in the sequence of the record at line {line} "
                                       f"(byte 0x{ord(sequence[control.start()]):02x}); expected FASTA text")
            count += 1
            yield FastaRecord(accession, title, sequence, line, path)
    if count == 0:
        raise FastaFormatError(f"{path}: no FASTA records")

