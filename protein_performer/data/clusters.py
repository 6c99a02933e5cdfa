"""Clusters of homologous proteins as data: MMseqs2's two-column TSV, read into a lookup by accession hash.

    representative<TAB>member          (one line per member; `mmseqs createtsv` writes this, plain or .gz)

A record's cluster key is the 64-bit hash (splits.accession_hash) of its cluster's representative;
an accession missing from the file is a singleton, its own representative (its key is its own hash,
exactly what a line "acc<TAB>acc" would give). Splits hash the key instead of the accession when
clusters are given, so a cluster lies in one split; the token store keeps each record's key, so a
store built with clusters needs no TSV afterwards.

Both columns are read by the FASTA accession rule (fasta.parse_accession), so a file whose ids are
whole UniProt words (sp|P69905|HBA_HUMAN) matches the FASTA's accessions (P69905). UniProt's own
clusters work too: the "UniRef50" column of a UniProtKB table, reordered with
    awk -F'\\t' 'NR>1 && $2!="" {print $2"\\t"$1}' uniprot.tsv > clusters.tsv
(the representative is then the UniRef id, which is just as good a key).

The lookup holds 16 bytes per member (two sorted uint64 arrays), not Python strings: UniRef50's
~250M members fit in ~4 GB. Distinct accessions whose 64-bit hashes collide (expected about once in
2**64 / n**2) would share a cluster; nothing else depends on the hash being unique.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protein_performer.data.errors import DataError
from protein_performer.data.fasta import GZIP, GZIP_STREAM_ERRORS, accession_spans, open_raw
from protein_performer.data.splits import accession_hashes

__all__ = ["ClusterMap", "read_clusters", "gather"]

_BLOCK = 1 << 24  # bytes parsed at a time (whole lines)


def gather(text: bytes, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """text[start[i]:start[i] + length[i]] for all i, concatenated, as uint8."""
    data = np.frombuffer(text, dtype=np.uint8)
    total = int(length.sum())
    shift = np.repeat(start - (np.cumsum(length) - length), length)
    return data[shift + np.arange(total)]


@dataclass(frozen=True)
class ClusterMap:
    """Member accession hash -> representative hash, as sorted arrays (from `read_clusters`)."""

    path: Path
    members: np.ndarray  # uint64 [n], sorted: hashes of the member accessions
    representatives: np.ndarray  # uint64 [n]: the representative's hash of each member
    clusters: int  # distinct representatives in the file

    def keys(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster keys uint64 [k], listed bool [k]) of records with accession `hashes` (uint64 [k]):
        the representative's hash for a member of the file, the record's own hash for any other."""
        at = np.minimum(np.searchsorted(self.members, hashes), max(len(self.members) - 1, 0))
        listed = self.members[at] == hashes if len(self.members) else np.zeros(len(hashes), dtype=bool)
        return np.where(listed, self.representatives[at] if len(self.members) else hashes, hashes), listed


def read_clusters(path: str | os.PathLike[str]) -> ClusterMap:
    """Read an MMseqs2 cluster TSV (plain or gzip, told by its magic bytes) into a ClusterMap.

    DataError, naming the file and line, for a line that is not `representative<TAB>member` (blank
    lines are skipped), a member listed in two clusters, a damaged gzip stream or an empty file.
    """
    path = Path(path)
    members: list[np.ndarray] = []
    representatives: list[np.ndarray] = []
    line = 1  # number of the first line of the block being parsed
    for block in _blocks(path):
        text = block.replace(b"\r\n", b"\n")
        rep, member = _parse_block(path, text, line)
        representatives.append(rep)
        members.append(member)
        line += text.count(b"\n")
    member_hashes = np.concatenate(members) if members else np.empty(0, dtype=np.uint64)
    rep_hashes = np.concatenate(representatives) if representatives else np.empty(0, dtype=np.uint64)
    if not len(member_hashes):
        raise DataError(f"{path}: no clusters in this file; expected lines 'representative<TAB>member' "
                        "(mmseqs createtsv)")
    order = np.argsort(member_hashes, kind="stable")
    member_hashes, rep_hashes = member_hashes[order], rep_hashes[order]
    repeated = np.flatnonzero((member_hashes[1:] == member_hashes[:-1]) & (rep_hashes[1:] != rep_hashes[:-1]))
    if repeated.size:
        raise DataError(_repeated_member_message(path, member_hashes[repeated[0]]))
    unique = np.concatenate([[True], member_hashes[1:] != member_hashes[:-1]])  # a line given twice is harmless
    return ClusterMap(path, member_hashes[unique], rep_hashes[unique], int(len(np.unique(rep_hashes))))


def _blocks(path: Path):
    """The file's bytes in blocks of whole lines (the last ends with a newline)."""
    with open_raw(path, "the clusters file") as (raw, compressed):
        stream = GZIP.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        rest = b""
        try:
            while data := stream.read(_BLOCK):
                data = rest + data
                cut = data.rfind(b"\n") + 1
                rest = data[cut:]
                if cut:
                    yield data[:cut]
        except GZIP_STREAM_ERRORS as error:
            raise DataError(f"{path}: the gzip stream is truncated or corrupt ({error}); re-download or "
                            "re-compress the file") from None
        if rest:
            yield rest + b"\n"


def _parse_block(path: Path, text: bytes, first_line: int) -> tuple[np.ndarray, np.ndarray]:
    """(representative hashes, member hashes), uint64 each, of the non-blank lines of `text`."""
    data = np.frombuffer(text, dtype=np.uint8)
    ends = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([[0], ends[:-1] + 1])
    filled = np.flatnonzero(ends > starts)
    tabs = np.flatnonzero(data == ord("\t"))
    first_tab = np.searchsorted(tabs, starts)
    tab_count = np.searchsorted(tabs, ends) - first_tab
    tab = np.append(tabs, len(data))[first_tab]
    bad = filled[(tab_count[filled] != 1) | (tab[filled] == starts[filled]) | (tab[filled] + 1 == ends[filled])]
    if bad.size:
        i = int(bad[0])
        shown = text[starts[i]:ends[i]].decode("latin-1")
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise DataError(f"{path}:{first_line + i}: expected 'representative<TAB>member' (two tab-separated columns, "
                        f"as mmseqs createtsv writes), got {shown!r}")
    if not filled.size:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)
    starts, ends, tab = starts[filled], ends[filled], tab[filled]
    return _column_hashes(text, starts, tab), _column_hashes(text, tab + 1, ends)


def _column_hashes(text: bytes, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Hashes of the accessions (fasta.parse_accession's rule) of the fields text[start:stop], uint64."""
    column = gather(text, start, stop - start + 1)  # each field with the newline or tab after it
    column[np.cumsum(stop - start + 1) - 1] = ord("\n")
    blob = column[:-1].tobytes()
    first, last = accession_spans(blob, len(start))
    return accession_hashes(blob, first, last)


def _repeated_member_message(path: Path, member_hash: np.uint64) -> str:
    """Where a member listed under two representatives appears (the error path: parses the file again)."""
    first: tuple[int, int] | None = None  # (line, representative hash) of the member's first listing
    line = 1
    for block in _blocks(path):
        for row in block.replace(b"\r\n", b"\n").split(b"\n")[:-1]:
            tab = row.find(b"\t")
            if tab > 0:
                rep, member = _column_hashes(row + b"\n", np.array([0, tab + 1]), np.array([tab, len(row)]))
                if member == member_hash:
                    if first is not None and first[1] != rep:
                        return (f"{path}:{line}: member {row[tab + 1:].decode('latin-1')!r} is already in another "
                                f"cluster (line {first[0]}); each member belongs to one cluster")
                    first = first or (line, int(rep))
            line += 1
    return f"{path}: a member is listed in two clusters; each member belongs to one cluster"
