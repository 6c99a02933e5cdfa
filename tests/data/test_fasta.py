"""FASTA reading: headers to accessions, plain/gzip/globs, chunked and background reading, and bad input."""
from __future__ import annotations

import gzip
import re
import shutil

import numpy as np
import pytest

from protein_performer.data import DataError, FastaFormatError, fasta, parse_accession, read_fasta, read_fasta_chunks
from protein_performer.data.fasta import (
    accession_spans,
    expand_inputs,
    read_fasta_chunks_in_background,
    read_fasta_chunks_reference,
)


def test_sample_records_keys_lines_and_sequences(sample_fasta, sample_records):
    lines = sample_fasta.read_text().splitlines()
    assert len(sample_records) == 500
    first = sample_records[0]
    assert first.accession == "A7TBS3" and first.line == 1
    assert first.description.startswith("tr|A7TBS3|A7TBS3_NEMVE Predicted protein")
    for record in sample_records:  # the sample has one sequence line per record
        assert lines[record.line - 1].rstrip() == ">" + record.description
        assert lines[record.line] == record.sequence
    assert len({r.accession for r in sample_records}) == 500


@pytest.mark.parametrize("title, accession", [
    ("sp|P69905|HBA_HUMAN Hemoglobin subunit alpha OS=Homo sapiens OX=9606 GN=HBA1 PE=1 SV=2", "P69905"),
    ("tr|A0A0S2ES34|A0A0S2ES34_9RHIZ Ribonuclease HII OS=Aureimonas sp. AU20", "A0A0S2ES34"),
    ("UniRef50_Q6GZX4 Putative transcription factor 001R n=2 Tax=Ranavirus TaxID=10492 RepID=001R_FRG3G",
     "UniRef50_Q6GZX4"),
    ("1es5-A", "1es5-A"),
    ("seq1\tsome description", "seq1"),
    (" P12345 leading blank", "P12345"),
    ("sp||ENTRY empty accession field", "sp||ENTRY"),
    ("gi|", "gi|"),
    ("", ""),
], ids=["swissprot", "trembl", "uniref", "pdb-chain", "tab", "leading-blank", "empty-field", "trailing-pipe", "empty"])
def test_parse_accession(title, accession):
    assert parse_accession(title) == accession


def test_vectorised_accessions_equal_the_reference(sample_records):
    titles = [r.description for r in sample_records]
    # The same proteins as UniRef and as plain-id headers.
    titles += [f"UniRef50_{r.accession} {r.description.split(' ', 1)[1]} n=1 TaxID=1 RepID={r.accession}"
               for r in sample_records[:50]]
    titles += [r.description.split("|")[2] for r in sample_records[:50]]
    titles += [" P12345 x", "sp||ENTRY y", "gi|", "a|b|c|d", "|x|", "plain\tword", "x"]
    blob = "\n".join(titles).encode("latin-1")
    start, stop = accession_spans(blob, len(titles))
    assert [blob[a:b].decode() for a, b in zip(start, stop)] == [parse_accession(t) for t in titles]


def test_gzip_wrapped_and_crlf_files_read_the_same_records(sample_records, tmp_path, write_fasta):
    pairs = [(r.description, r.sequence) for r in sample_records]
    plain = [(r.accession, r.sequence) for r in sample_records]
    for name, width, newline in [("a.fasta.gz", None, "\n"), ("b.fa", 60, "\n"), ("c.fa.gz", 80, "\r\n")]:
        path = write_fasta(tmp_path / name, pairs, width=width, newline=newline)
        assert [(r.accession, r.sequence) for r in read_fasta(path)] == plain, name


def test_a_glob_reads_its_files_in_sorted_order(sample_records, tmp_path, write_fasta):
    pairs = [(r.description, r.sequence) for r in sample_records]
    write_fasta(tmp_path / "part2.fasta", pairs[300:])
    write_fasta(tmp_path / "part1.fasta.gz", pairs[:300])
    assert [p.name for p in expand_inputs(str(tmp_path / "part*"))] == ["part1.fasta.gz", "part2.fasta"]
    assert [r.accession for r in read_fasta(str(tmp_path / "part*"))] == [r.accession for r in sample_records]


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
    monkeypatch.setattr(fasta, "_BLOCK_BYTES", block_bytes)  # many blocks: records carried across them
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


def test_multi_member_and_zero_padded_gzip_read_as_one_file(sample_fasta, sample_records, tmp_path):
    data = sample_fasta.read_bytes()
    cut = data.index(b"\n>", len(data) // 3) + 1
    path = tmp_path / "members.fasta.gz"  # as bgzip or `cat a.gz b.gz` make them
    path.write_bytes(gzip.compress(data[:cut]) + gzip.compress(data[cut:]) + b"\x00" * 1024)
    chunks = list(read_fasta_chunks(path, 4096))
    assert b"\n".join(c.titles for c in chunks).decode().split("\n") == [r.description for r in sample_records]
    assert b"".join(c.sequences for c in chunks).decode() == "".join(r.sequence for r in sample_records)


def test_background_reader_delivers_the_same_chunks_and_forwards_errors(sample_fasta, tmp_path):
    foreground = list(read_fasta_chunks(sample_fasta, 100))
    background = list(read_fasta_chunks_in_background([sample_fasta, sample_fasta], 100))
    assert len(background) == 2 * len(foreground)
    for a, b in zip(foreground * 2, background):
        assert (a.titles, a.sequences, a.lengths.tolist()) == (b.titles, b.sequences, b.lengths.tolist())
    bad = tmp_path / "bad.fasta"
    bad.write_bytes(b"not fasta\n>x\nMKV\n")
    with pytest.raises(FastaFormatError, match="bad.fasta:1: text before the first '>'"):
        list(read_fasta_chunks_in_background([sample_fasta, bad], 100))


def _truncated_gzip(sample_fasta, path, keep):
    data = gzip.compress(sample_fasta.read_bytes() * 4)
    path.write_bytes(data[:int(len(data) * keep)])


# Each case: how to make the file, then a regex its error message must match (file name and line).
BAD_FILES = {
    "empty": (lambda s, p: p.write_bytes(b""), r"empty\.fasta: empty file"),
    "blank-lines-only": (lambda s, p: p.write_bytes(b"\n \n\n"), r"blank-lines-only\.fasta: empty file"),
    "empty-gzip": (lambda s, p: p.write_bytes(gzip.compress(b"")), r"empty-gzip\.fasta: empty gzip file"),
    "text-before-header": (lambda s, p: p.write_bytes(b"\n# comment\n" + s.read_bytes()),
                           r"text-before-header\.fasta:2: text before the first '>' header \('# comment'\)"),
    "sequence-without-header": (lambda s, p: p.write_bytes(b"MKVLAAGIV\n"),
                                r"sequence-without-header\.fasta:1: text before the first '>'"),
    "binary": (lambda s, p: p.write_bytes(bytes(range(256)) * 4), r"binary\.fasta:1: binary data"),
    "binary-in-a-header": (lambda s, p: p.write_bytes(s.read_bytes().replace(b"Bovine", b"Bo\x00ine", 1)),
                           r"binary-in-a-header\.fasta:\d+: binary data"),
    "truncated-gzip-start": (lambda s, p: _truncated_gzip(s, p, 0.05), r"truncated-gzip-start\.fasta:\d+: the gzip "
                                                                       r"stream is truncated"),
    "truncated-gzip-end": (lambda s, p: _truncated_gzip(s, p, 0.9), r"truncated-gzip-end\.fasta:\d+: the gzip "
                                                                    r"stream is truncated"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_named_with_their_line(case, sample_fasta, tmp_path):
    make, message = BAD_FILES[case]
    path = tmp_path / f"{case}.fasta"
    make(sample_fasta, path)
    with pytest.raises(FastaFormatError, match=message):
        list(read_fasta(path))


def test_binary_in_a_header_names_the_header_line(sample_fasta, tmp_path):
    path = tmp_path / "b.fasta"
    BAD_FILES["binary-in-a-header"][0](sample_fasta, path)
    line = next(i for i, text in enumerate(path.read_bytes().split(b"\n"), 1) if b"\x00" in text)
    with pytest.raises(FastaFormatError, match=rf"b\.fasta:{line}: "):
        list(read_fasta(path))


def test_truncated_gzip_names_the_line_where_the_text_breaks_off(sample_fasta, tmp_path):
    path = tmp_path / "t.fasta.gz"
    _truncated_gzip(sample_fasta, path, 0.5)
    readable = b""
    with gzip.open(path) as stream:
        with pytest.raises(EOFError):
            while block := stream.read1(1 << 16):
                readable += block
    line = readable.count(b"\n") + 1
    with pytest.raises(FastaFormatError, match=rf"t\.fasta\.gz:{line}: "):
        list(read_fasta(path))


@pytest.mark.parametrize("pattern, message", [
    ("missing.fasta", "missing.fasta: no such file"),
    ("nothing-*.fasta", re.escape("nothing-*.fasta: no file matches this pattern")),
    (".", "is a directory"),
])
def test_missing_inputs_are_named(pattern, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=message):
        list(read_fasta(pattern))


def test_a_gzip_file_is_recognised_by_content_not_name(sample_fasta, tmp_path):
    misnamed = tmp_path / "really-gzip.fasta"
    misnamed.write_bytes(gzip.compress(sample_fasta.read_bytes()))
    plain_named_gz = tmp_path / "plain.fasta.gz"
    shutil.copy(sample_fasta, plain_named_gz)
    assert len(list(read_fasta(misnamed))) == len(list(read_fasta(plain_named_gz))) == 500


def test_a_record_far_longer_than_a_block_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(fasta, "_BLOCK_BYTES", 1 << 10)  # the 32 MB record spans 32,000 blocks
    rng = np.random.default_rng(0)
    giant = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)[rng.integers(0, 20, 32 << 20)].tobytes()
    wrapped = b"\n".join(giant[i:i + 60] for i in range(0, len(giant), 60))
    path = tmp_path / "giant.fasta"
    path.write_bytes(b">small\nMKV\n>giant one record\n" + wrapped + b"\n>after\nMK\n")
    chunks = list(read_fasta_chunks(path, 2))
    assert b"\n".join(c.titles for c in chunks) == b"small\ngiant one record\nafter"
    assert b"".join(c.sequences for c in chunks) == b"MKV" + giant + b"MK"
    assert np.concatenate([c.lengths for c in chunks]).tolist() == [3, len(giant), 2]
