"""Train/valid/test/ood assignment from the accession alone, so file order and sharding never matter.

A record's split is a pure function of its accession (and of the header, for the OOD regex):
    h = splitmix64_finalise(fnv1a_64(accession bytes)),  u = (h >> 11) / 2**53  in [0, 1)
    u < valid_fraction -> valid;  u < valid_fraction + test_fraction -> test;  else train
(with clusters given, the accession of the record's cluster representative is hashed instead: see
clusters.py), and a record held out as out-of-distribution (accession in a list file, or header matching a regex)
goes to `ood` whatever u is. The same accession therefore lands in the same split in every file,
shard and run, and no accession is in two splits. The hash is written out here (not Python's
`hash()`, which is salted per process; not a library's, whose version could change) and pinned by a
test, because changing it would silently move records between train and test.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protein_performer.data.errors import DataError

__all__ = ["SPLITS", "SplitSpec", "SplitAssigner", "accession_hash", "accession_hashes", "file_identity",
           "hash_to_unit"]

SPLITS = ("train", "valid", "test", "ood")  # the code of a split is its index here
TRAIN, VALID, TEST, OOD = range(4)

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def accession_hash(accession: bytes) -> int:
    """64-bit hash of one accession: FNV-1a, then the splitmix64 finaliser to spread its bits.

    The per-record reference for `accession_hashes`.
    """
    h = _FNV_OFFSET
    for byte in accession:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
    return h ^ (h >> 31)


def accession_hashes(text: bytes, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """`accession_hash(text[start[i]:stop[i]])` for every i at once: uint64 [n].

    One vectorised FNV step per character position, over the accessions still that long.
    """
    data = np.frombuffer(text, dtype=np.uint8)
    length = stop - start
    h = np.full(len(start), _FNV_OFFSET, dtype=np.uint64)
    active = np.flatnonzero(length > 0)
    position = 0
    with np.errstate(over="ignore"):  # uint64 products wrap modulo 2**64, as FNV intends
        while active.size:
            h[active] = (h[active] ^ data[start[active] + position].astype(np.uint64)) * np.uint64(_FNV_PRIME)
            position += 1
            active = active[length[active] > position]
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def hash_to_unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 in [0, 1) (the top 53 bits, exactly representable)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class SplitSpec:
    """How records are assigned to splits (stored in the token store and in the cache key).

    valid_fraction, test_fraction: expected shares of the non-OOD records.
    ood_accessions: a text file with one accession per line ('#' comments and blank lines ignored);
        these records form the `ood` split.
    ood_regex: a Python regular expression searched in each header line (without '>'), e.g.
        'OS=Homo sapiens' or 'Tax=Viruses'; matching records form the `ood` split too.
    clusters: an MMseqs2 cluster TSV (representative TAB member, plain or .gz; see clusters.py): the
        hash of a record's representative then decides its split instead of its accession's, so a
        cluster never straddles splits (the OOD rules still apply record by record).
    """

    valid_fraction: float = 0.01
    test_fraction: float = 0.01
    ood_accessions: str | None = None
    ood_regex: str | None = None
    clusters: str | None = None

    def __post_init__(self) -> None:
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise DataError(f"{name} must be in [0, 1), got {value}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise DataError(f"valid_fraction + test_fraction must be < 1 (train needs records), got "
                            f"{self.valid_fraction} + {self.test_fraction}")
        if self.ood_regex is not None:
            try:
                re.compile(self.ood_regex)
            except re.error as error:
                raise DataError(f"ood_regex {self.ood_regex!r} is not a valid regular expression: {error}") from None
        if self.ood_accessions is not None and not os.path.isfile(self.ood_accessions):
            raise DataError(f"{self.ood_accessions}: no such file (ood_accessions: one accession per line)")
        if self.clusters is not None and not os.path.isfile(self.clusters):
            raise DataError(f"{self.clusters}: no such file (clusters: an MMseqs2 TSV, representative TAB member)")

    def identity(self) -> dict[str, object]:
        """What the assignment depends on, for cache keys: the files by path, size and mtime."""
        return {"valid_fraction": self.valid_fraction, "test_fraction": self.test_fraction,
                "ood_accessions": file_identity(self.ood_accessions), "ood_regex": self.ood_regex,
                "clusters": file_identity(self.clusters)}


def file_identity(path: str | None) -> list[object] | None:
    """(real path, size, mtime in ns) of a settings file, for cache keys and store attributes; None for None."""
    if path is None:
        return None
    stat = os.stat(path)
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


class SplitAssigner:
    """Split codes (indices into SPLITS) for chunks of records, by `SplitSpec`."""

    def __init__(self, spec: SplitSpec) -> None:
        self.spec = spec
        self.ood_regex = re.compile(spec.ood_regex.encode("latin-1")) if spec.ood_regex is not None else None
        self.ood_accessions: frozenset[bytes] = frozenset()
        if spec.ood_accessions is not None:
            self.ood_accessions = frozenset(_read_accession_list(Path(spec.ood_accessions)))

    def assign(self, hashes: np.ndarray, accessions: Sequence[bytes] | None = None,
               titles: Sequence[bytes] | None = None) -> np.ndarray:
        """uint8 [n] split codes. `accessions` and `titles` are needed only for the OOD rules."""
        u = hash_to_unit(hashes)
        codes = np.full(len(hashes), TRAIN, dtype=np.uint8)
        codes[u < self.spec.valid_fraction + self.spec.test_fraction] = TEST
        codes[u < self.spec.valid_fraction] = VALID
        if self.ood_accessions:
            if accessions is None:
                raise ValueError("accessions are needed to apply ood_accessions")
            codes[np.fromiter((a in self.ood_accessions for a in accessions), dtype=bool, count=len(hashes))] = OOD
        if self.ood_regex is not None:
            if titles is None:
                raise ValueError("titles are needed to apply ood_regex")
            search = self.ood_regex.search
            codes[np.fromiter((search(t) is not None for t in titles), dtype=bool, count=len(hashes))] = OOD
        return codes


def _read_accession_list(path: Path) -> list[bytes]:
    accessions = []
    with open(path, "rb") as handle:
        for line in handle:
            word = line.split(b"#", 1)[0].strip()
            if word:
                accessions.append(word)
    if not accessions:
        raise DataError(f"{path}: ood_accessions file lists no accessions")
    return accessions
