"""The fast chunk reader: the same records as Biopython on awkward files, gzip members, huge records,
byte ranges (protein_performer.data.fasta_chunks); workers born with SIGTERM blocked."""
from __future__ import annotations

import gzip
import zlib

import numpy as np
import pytest

from protein_performer.data import fasta_chunks, read_fasta_chunks
from protein_performer.data.alphabet import NON_TOKEN_CODES
from protein_performer.data.fasta_chunks import read_fasta_chunks_reference


@pytest.mark.parametrize("chunk_records", [1, 7, 4096])
def test_chunks_hold_exactly_the_records(sample_fasta, sample_records, chunk_records):
    chunks = list(read_fasta_chunks(sample_fasta, chunk_records))
    assert [c.first_record for c in chunks] == list(range(0, 500, chunk_records))
    titles = b"\n".join(c.titles for c in chunks).decode().split("\n")
    sequences = b"".join(c.sequences for c in chunks)
    lengths = np.concatenate([c.lengths for c in chunks])
    assert titles == [r.description for r in sample_records]
    assert lengths.tolist() == [len(r.sequence) for r in sample_records]
    assert sequences.decode() == "".join(r.sequence for r in sample_records)


def _awkward_fasta(records, seed: int) -> bytes:
    """Real records written in every way FASTA files vary, mixed at random: wrapped at various widths,
    CRLF lines, blank lines, blanks and tabs inside and after sequence lines, titles with trailing
    blanks or a '>' inside, empty sequences, a header without a line break at the very end."""
    rng = np.random.default_rng(seed)
    out = [b"\n\n"] if seed % 2 else []  # blank lines before the first header are allowed
    for record in records:
        title, sequence = record.description.encode(), record.sequence.encode()
        style = rng.integers(12)
        newline = b"\r\n" if style == 0 else b"\n"
        if style == 1:
            title += b"  \t"
        if style == 2:
            title += b" >not a header"
        if style == 3:
            sequence = b""
        width = int(rng.choice([10, 60, 80, 1 << 20]))
        lines = [sequence[i:i + width] for i in range(0, len(sequence), width)]
        if style == 4 and lines:
            lines[0] = lines[0][:3] + b" " + lines[0][3:]  # a blank inside a line
        if style == 5 and lines:
            lines[-1] += b"\t"  # trailing tab: stripped
        if style == 6 and lines:
            lines[0] = lines[0][:2] + b"\t" + lines[0][2:]  # inner tab: kept (becomes <unk>)
        if style == 7:
            lines.insert(len(lines) // 2, b"")  # a blank line inside the sequence
        out.append(b">" + title + newline + b"".join(line + newline for line in lines))
    if seed % 3 == 0:
        out.append(b">last header at the end of the file")
    text = b"".join(out)
    return text.rstrip(b"\n") if seed % 4 == 1 else text


@pytest.mark.parametrize("block_bytes", [64, 4096, 4 << 20])
@pytest.mark.parametrize("seed", range(6))
def test_fast_chunks_equal_biopython_on_awkward_files(sample_records, tmp_path, monkeypatch, seed, block_bytes):
    monkeypatch.setattr(fasta_chunks, "_BLOCK_BYTES", block_bytes)  # many blocks: records carried across them
    path = tmp_path / ("awkward.fasta.gz" if seed % 2 else "awkward.fasta")
    text = _awkward_fasta(sample_records[:120], seed)
    path.write_bytes(gzip.compress(text) if seed % 2 else text)
    for chunk_records in (1, 7, 50, 4096):
        fast = list(read_fasta_chunks(path, chunk_records))
        reference = list(read_fasta_chunks_reference(path, chunk_records))
        assert [c.first_record for c in fast] == [c.first_record for c in reference]
        for a, b in zip(fast, reference, strict=True):
            assert a.titles == b.titles and a.sequences == b.sequences
            assert a.lengths.tolist() == b.lengths.tolist() and a.lengths.dtype == np.int64


@pytest.mark.parametrize("range_bytes", [1, 37, 4096])
@pytest.mark.parametrize("seed", [0, 2, 4, 5])
def test_byte_ranges_of_a_plain_file_hold_each_record_once(sample_records, tmp_path, seed, range_bytes):
    """What parallel workers read for themselves: ranges as small as a byte, cut anywhere in a record
    (CRLF lines, blank lines, a header at the end, leading blank lines), give the reference's records."""
    path = tmp_path / "awkward.fasta"
    path.write_bytes(_awkward_fasta(sample_records[:60], seed))
    chunks = []
    for part in fasta_chunks.record_ranges(path, range_bytes):
        text, offset = part.read()
        if text:
            chunks.append(fasta_chunks.chunk_of_block(path, text, offset, part.stop))
            assert fasta_chunks.records_before(path, offset) == sum(len(c) for c in chunks[:-1])
    reference = list(read_fasta_chunks_reference(path, 4096))
    for field in ("titles", "sequences"):
        joiner = b"\n" if field == "titles" else b""
        assert joiner.join(getattr(c, field) for c in chunks if len(c)) == joiner.join(getattr(c, field) for c in reference)
    assert np.concatenate([c.lengths for c in chunks]).tolist() == np.concatenate([c.lengths for c in reference]).tolist()
    compressed = tmp_path / "awkward.fasta.gz"
    compressed.write_bytes(gzip.compress(path.read_bytes()))
    assert fasta_chunks.record_ranges(compressed, 10) is None  # a gzip stream is inflated in one place


def test_a_range_whose_last_record_runs_far_past_it_reads_that_record_whole(tmp_path):
    """A worker reads a little past its range to find the next header; a longer record is read on to its end."""
    rng = np.random.default_rng(1)
    long = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)[rng.integers(0, 20, 300_000)].tobytes()
    path = tmp_path / "long.fasta"
    path.write_bytes(b">a\nMKV\n>long\n" + b"\n".join(long[i:i + 60] for i in range(0, len(long), 60)) + b"\n>b\nMK\n")
    blocks = [part.read() for part in fasta_chunks.record_ranges(path, 4096)]
    chunks = [fasta_chunks.chunk_of_block(path, text, offset, 0) for text, offset in blocks if text]
    assert b"\n".join(c.titles for c in chunks) == b"a\nlong\nb"
    assert b"".join(c.sequences for c in chunks) == b"MKV" + long + b"MK"
    assert [offset for text, offset in blocks if text] == [0, path.read_bytes().index(b">b")]


@pytest.mark.parametrize("layout", ["one-line", "wrapped-60", "awkward"])
def test_translating_while_cutting_equals_cutting_then_translating(alphabet, sample_records, tmp_path, layout):
    """The encoder's fast path (`translated_chunk_of_block`) against `chunk_of_block` and bytes.translate:
    the same chunk where it answers, None for every block with whitespace inside sequences or after titles
    (SimpleFastaParser's to read), stops or gaps; clean one-line and wrapped files always take it."""
    reject = NON_TOKEN_CODES
    if layout == "awkward":
        text = _awkward_fasta(sample_records[:200], seed=4)
    else:
        width = None if layout == "one-line" else 60
        text = b"".join(b">" + r.description.encode() + b"\n" + b"\n".join(
            r.sequence.encode()[i:i + (width or len(r.sequence))] for i in range(0, len(r.sequence), width or 1 << 30))
            + b"\n" for r in sample_records)
    path = tmp_path / "in.fasta"
    path.write_bytes(text)
    answered = declined = 0
    for part in fasta_chunks.record_ranges(path, 512 if layout == "awkward" else 4096):  # as the workers read them
        (block, offset), position = part.read(), part.stop
        fast = fasta_chunks.translated_chunk_of_block(path, block, offset, position, alphabet.translation, reject)
        chunk = fasta_chunks.chunk_of_block(path, block, offset, position)
        coded = chunk.sequences.translate(alphabet.translation)
        lines = block.decode("latin-1").split("\n")
        sequence_lines = "".join(line for line in lines if not line.startswith(">"))
        messy = (any(code in coded for code in reject)
                 or any(line.rstrip() != line for line in lines if line.startswith(">"))
                 or any(chr(byte) in sequence_lines for byte in fasta_chunks._WHITESPACE))
        assert (fast is None) == messy
        if fast is None:
            declined += 1
            continue
        answered += 1
        assert (fast.titles, fast.sequences, fast.lengths.tolist(), fast.block_offset) == (
            chunk.titles, coded, chunk.lengths.tolist(), chunk.block_offset)
    if layout == "awkward":
        assert answered and declined
    else:
        assert answered > 5 and not declined
    with_tab = b">t\nMK\tV\n>u\nMKV\n"  # a tab inside a sequence: whitespace is declined whatever the table says
    assert fasta_chunks.translated_chunk_of_block(path, with_tab, 0, 0, bytes(range(256)), reject) is None


@pytest.mark.parametrize("inflate", ["isal", "zlib"])
def test_multi_member_and_zero_padded_gzip_read_as_one_file(inflate, sample_fasta, sample_records, tmp_path,
                                                            monkeypatch):
    if inflate == "zlib":  # the standard library's fallback, as without the isal package
        monkeypatch.setattr(fasta_chunks, "INFLATE", zlib)
    else:
        assert fasta_chunks.INFLATE.__name__.startswith("isal"), "the isal package is a dependency"
    data = sample_fasta.read_bytes()
    cut = data.index(b"\n>", len(data) // 3) + 1
    path = tmp_path / "members.fasta.gz"  # as bgzip or `cat a.gz b.gz` make them
    path.write_bytes(gzip.compress(data[:cut]) + gzip.compress(data[cut:]) + b"\x00" * 1024)
    chunks = list(read_fasta_chunks(path, 4096))
    assert b"\n".join(c.titles for c in chunks).decode().split("\n") == [r.description for r in sample_records]
    assert b"".join(c.sequences for c in chunks).decode() == "".join(r.sequence for r in sample_records)


def test_a_record_far_longer_than_a_block_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(fasta_chunks, "_BLOCK_BYTES", 1 << 10)  # the 32 MB record spans 32,000 blocks
    rng = np.random.default_rng(0)
    giant = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)[rng.integers(0, 20, 32 << 20)].tobytes()
    wrapped = b"\n".join(giant[i:i + 60] for i in range(0, len(giant), 60))
    path = tmp_path / "giant.fasta"
    path.write_bytes(b">small\nMKV\n>giant one record\n" + wrapped + b"\n>after\nMK\n")
    chunks = list(read_fasta_chunks(path, 2))
    assert b"\n".join(c.titles for c in chunks) == b"small\ngiant one record\nafter"
    assert b"".join(c.sequences for c in chunks) == b"MKV" + giant + b"MK"
    assert np.concatenate([c.lengths for c in chunks]).tolist() == [3, len(giant), 2]


def _report_mask(connection) -> None:
    import signal

    connection.send(signal.pthread_sigmask(signal.SIG_BLOCK, []))


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="POSIX signal masks")
def test_worker_is_born_with_sigterm_blocked_and_the_parent_mask_is_restored():
    """A SIGTERM between fork and the child's own handlers must not run the parent's handler there."""
    import multiprocessing
    import signal

    from protein_performer.data import workers

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    process = context.Process(target=_report_mask, args=(sender,))
    workers._start_unsignalled(process)
    child_mask = receiver.recv()
    process.join(timeout=30)
    assert {signal.SIGTERM, signal.SIGINT} <= child_mask
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
