"""FASTA records: headers to accessions, plain/gzip/globs, and bad input named by file and line."""
from __future__ import annotations

import gzip
import re
import shutil

import pytest

from protein_performer.data import DataError, FastaFormatError, parse_accession, read_fasta
from protein_performer.data.fasta import accession_spans, expand_inputs


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
    ("cath|4_1_0|102mA00/0-153", "cath|4_1_0|102mA00/0-153"),
    ("UniRef90|Q6GZX4|x", "Q6GZX4"),
    ("UniRefX|Q6GZX4|x", "UniRefX|Q6GZX4|x"),
    ("gi|12345|ref|NP_000509.1| hemoglobin", "gi|12345|ref|NP_000509.1|"),
], ids=["swissprot", "trembl", "uniref", "pdb-chain", "tab", "leading-blank", "empty-field", "trailing-pipe", "empty",
        "cath-domain", "uniref-bars", "not-uniref", "ncbi-gi"])
def test_parse_accession(title, accession):
    assert parse_accession(title) == accession


def test_vectorised_accessions_equal_the_reference(sample_records):
    titles = [r.description for r in sample_records]
    # The same proteins as UniRef and as plain-id headers.
    titles += [f"UniRef50_{r.accession} {r.description.split(' ', 1)[1]} n=1 TaxID=1 RepID={r.accession}"
               for r in sample_records[:50]]
    titles += [r.description.split("|")[2] for r in sample_records[:50]]
    titles += [" P12345 x", "sp||ENTRY y", "gi|", "a|b|c|d", "|x|", "plain\tword", "x", "tr|A1|B", "s|A|B",
               "spx|A|B", "UniRef100|Q1|y", "UniRef|Q1|y", "cath|4_1_0|102mA00/0-153", "cath|4_1_0|103lA00/1-160"]
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
