"""The HDF5 token store: FASTA in, tokens grouped by split out, written in constant memory.

Layout (format_version 2). One group per split in SPLITS (train, valid, test, ood), each with
    tokens             uint8  [T_s]     residues of all the split's records, concatenated (no specials)
    offsets            int64  [N_s + 1] record j is tokens[offsets[j]:offsets[j + 1]]; offsets[0] = 0
    accessions         uint8  [A_s]     accession bytes, concatenated
    accession_offsets  int64  [N_s + 1] accession j is accessions[accession_offsets[j]:...[j + 1]]
    token_counts       int64  [V]       how often each Alphabet token occurs in `tokens` (new in format 2)
and attributes: the group's `records` and `residues`; at the root the format, the Alphabet's tokens,
the split settings, the inputs (path, size, mtime) and the summary (see StoreSummary).

Records keep their input order within a split. A split is contiguous on disk, so a data loader reads
any range of its records with two slices, whatever the other splits hold. Datasets are chunked
(256 KiB) and compressed; accessions are bytes plus offsets rather than HDF5 variable-length
strings, which are several times slower to write and to read in bulk.

`TokenStore` reads a store: a global index runs over train, then valid, test and ood. The writer,
`build_token_store` (streaming FASTA chunks into the layout in constant memory), is store_writer.py,
which builds on this module (never the other way round).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from protein_performer.data.alphabet import Alphabet
from protein_performer.data.errors import DataError
from protein_performer.data.fasta import PathInput
from protein_performer.data.splits import SPLITS

__all__ = ["TokenStore", "StoreSummary", "input_identity", "FORMAT_VERSION", "COMPRESSIONS", "HDF5_SUFFIXES"]

FORMAT = "protein_performer.token_store"
FORMAT_VERSION = 2  # written by this version
READABLE_VERSIONS = (1, 2)  # 1: no token_counts (counted from a bounded sample on request)
_SAMPLE_WINDOWS = 64  # an old store's token counts: this many evenly spaced windows of a split...
_SAMPLE_WINDOW_TOKENS = 1 << 16  # ... of this many tokens each (4 Mi tokens at most, read in well under a second)

log = logging.getLogger(__name__)
COMPRESSIONS = ("scaleoffset", "gzip", "lzf", "none")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")  # output names accepted without any_suffix=True


@dataclass
class StoreSummary:
    """What preprocessing found, printed at the end and stored as the store's root attributes."""

    records: int = 0  # records stored (all splits)
    residues: int = 0  # tokens stored (all splits)
    skipped_empty: int = 0  # records whose sequence was empty (after removing gaps and stops)
    unknown: int = 0  # characters stored as <unk>
    split_records: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    split_residues: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    length_min: int = 0
    length_max: int = 0
    length_mean: float = 0.0
    length_quantiles: dict[str, int] = field(default_factory=dict)  # p10 p50 p90 p99 (residues)
    longer_than_1024: int = 0
    input_files: int = 0
    input_bytes: int = 0
    seconds: float = 0.0

    def format(self) -> str:
        """A small table for the terminal."""
        rate = self.input_bytes / 1e6 / self.seconds if self.seconds else 0.0
        quantiles = " ".join(f"{k}={v:,}" for k, v in self.length_quantiles.items())
        lines = [
            f"records      {self.records:>14,}   (skipped, empty sequence: {self.skipped_empty:,})",
            f"residues     {self.residues:>14,}   (<unk>: {self.unknown:,})",
            f"length       min={self.length_min:,} mean={self.length_mean:,.1f} {quantiles} max={self.length_max:,}"
            f"  (>1024: {self.longer_than_1024:,})",
        ]
        for name in SPLITS:
            lines.append(f"  {name:<6}     {self.split_records[name]:>14,} records {self.split_residues[name]:>16,} residues")
        lines.append(f"input        {self.input_files:,} file(s), {self.input_bytes / 1e6:,.1f} MB in "
                     f"{self.seconds:,.2f} s ({rate:,.1f} MB/s, {self.records / max(self.seconds, 1e-9):,.0f} records/s)")
        return "\n".join(lines)

    def to_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        for key, value in asdict(self).items():
            attrs[f"summary_{key}"] = json.dumps(value) if isinstance(value, dict) else value
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Any) -> StoreSummary:
        values = {}
        for name in cls.__dataclass_fields__:
            value = attrs[f"summary_{name}"]
            values[name] = json.loads(value) if isinstance(value, str) else value.item()
        return cls(**values)


def input_identity(paths: Iterable[Path]) -> list[list[Any]]:
    """(real path, size, mtime in ns) per input: what a cached store was built from."""
    identity = []
    for path in paths:
        stat = os.stat(path)
        identity.append([os.path.realpath(path), stat.st_size, stat.st_mtime_ns])
    return identity


class TokenStore:
    """Read access to a token store written by `build_token_store`.

    `len(store)`, `store.tokens(i)` (uint8 residues), `store.accession(i)`, `store.split(i)` use a
    global index running over the train, valid, test and ood records, in that order. Bulk readers
    (`offsets`, `read_tokens`) work within one split, as data loaders do.

    The HDF5 file is opened on first use in each process (h5py handles must not cross a fork), so a
    TokenStore can be handed to DataLoader workers; pickling drops the handle.
    """

    def __init__(self, path: PathInput) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such token store (build one with python -m protein_performer.preprocess "
                            "input=<fasta> output=<file.h5>)")
        self._file: h5py.File | None = None
        self._datasets: dict[tuple[str, str], h5py.Dataset] = {}
        self._pid = -1
        h5 = self._h5()
        if h5.attrs.get("format") != FORMAT:
            raise DataError(f"{self.path}: not a protein_performer token store")
        version = int(h5.attrs.get("format_version", -1))
        if version not in READABLE_VERSIONS:
            raise DataError(f"{self.path}: token store format {version}, this version reads "
                            f"{' and '.join(map(str, READABLE_VERSIONS))}; rebuild it with python -m protein_performer.preprocess")
        self.format_version = version
        tokens = json.loads(h5.attrs["alphabet"])
        if tokens != Alphabet().tokens:
            raise DataError(f"{self.path}: built with a different alphabet ({' '.join(tokens)}); rebuild it")
        self.split_sizes: dict[str, int] = {name: int(h5[name]["offsets"].shape[0]) - 1 for name in SPLITS}
        self.split_residues: dict[str, int] = {name: int(h5[name].attrs["residues"]) for name in SPLITS}
        self._split_starts = np.cumsum([0, *self.split_sizes.values()])
        self._token_counts: dict[str, np.ndarray] | None = None

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            # Read-only; "best-effort" locking: a shared filesystem that refuses HDF5's file locks (some
            # NFS and Lustre mounts) would otherwise fail every open. A store is complete and never
            # written once it has its name (builds write a temporary and rename it), so readers need no lock.
            self._file = h5py.File(self.path, "r", locking="best-effort")
            self._datasets = {}
            self._pid = os.getpid()
        return self._file

    def _dataset(self, split: str, name: str) -> h5py.Dataset:
        # Kept open: each h5py.Dataset has its own chunk cache, so reopening one per read would
        # decompress the same chunk again for every offset looked up.
        h5 = self._h5()
        key = (split, name)
        if key not in self._datasets:
            self._datasets[key] = h5[split][name]
        return self._datasets[key]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_datasets": {}, "_pid": -1}

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._datasets = {}

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._split_starts[-1])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name} {size:,}" for name, size in self.split_sizes.items())
        return f"TokenStore({str(self.path)!r}: {len(self):,} records: {sizes})"

    @property
    def summary(self) -> StoreSummary:
        return StoreSummary.from_attrs(self._h5().attrs)

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (format, alphabet, inputs, split_spec, summary_*...)."""
        return dict(self._h5().attrs)

    def record_counts(self) -> dict[str, int]:
        """Records per split ({'train': n, 'valid': ..., 'test': ..., 'ood': ...}), recorded at build time."""
        return dict(self.split_sizes)

    @property
    def token_counts(self) -> dict[str, np.ndarray]:
        """Per split, int64 [len(Alphabet())]: how often each token occurs in the split's residues.

        Recorded when the store was built (format 2), so reading them costs nothing. A format-1 store
        has none: its counts are estimated from a bounded sample of each split (`_SAMPLE_WINDOWS`
        evenly spaced windows, scaled to the split's residues) and a warning says so, once.
        """
        if self._token_counts is None:
            h5 = self._h5()
            if all("token_counts" in h5[name] for name in SPLITS):
                self._token_counts = {name: h5[name]["token_counts"][:].astype(np.int64) for name in SPLITS}
            else:
                log.warning("%s: a format-%d token store records no token counts; estimating them from a sample of "
                            "at most %d tokens per split (rebuild the store for exact counts)", self.path,
                            self.format_version, _SAMPLE_WINDOWS * _SAMPLE_WINDOW_TOKENS)
                self._token_counts = {name: self._sampled_token_counts(name) for name in SPLITS}
        return self._token_counts

    def _sampled_token_counts(self, split: str) -> np.ndarray:
        """Token counts of a split estimated from evenly spaced windows, scaled to its residues (exact if small)."""
        vocab = len(Alphabet())
        total = self.split_residues[split]
        if total <= _SAMPLE_WINDOWS * _SAMPLE_WINDOW_TOKENS:
            return np.bincount(self.read_tokens(split, 0, total), minlength=vocab)[:vocab].astype(np.int64)
        starts = np.linspace(0, total - _SAMPLE_WINDOW_TOKENS, _SAMPLE_WINDOWS).astype(np.int64)
        sample = np.zeros(vocab, dtype=np.int64)
        for start in starts.tolist():
            sample += np.bincount(self.read_tokens(split, start, start + _SAMPLE_WINDOW_TOKENS), minlength=vocab)[:vocab]
        return np.rint(sample * (total / sample.sum())).astype(np.int64)

    def locate(self, i: int) -> tuple[str, int]:
        """(split name, index within the split) of global index i."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for a store of {len(self)} records")
        i %= len(self)
        code = int(np.searchsorted(self._split_starts, i, side="right")) - 1
        return SPLITS[code], i - int(self._split_starts[code])

    def split(self, i: int) -> str:
        return self.locate(i)[0]

    def tokens(self, i: int) -> np.ndarray:
        """Residue token ids of record i, uint8 [length] (no <cls>/<eos>)."""
        name, j = self.locate(i)
        begin, end = self.offsets(name, j, j + 1)
        return self.read_tokens(name, int(begin), int(end))

    def length(self, i: int) -> int:
        name, j = self.locate(i)
        begin, end = self.offsets(name, j, j + 1)
        return int(end - begin)

    def accession(self, i: int) -> str:
        name, j = self.locate(i)
        begin, end = self._dataset(name, "accession_offsets")[j:j + 2]
        return self._dataset(name, "accessions")[begin:end].tobytes().decode("latin-1")

    def accessions(self, split: str) -> list[str]:
        """All accessions of one split, in store order (loads them: meant for small splits and tests)."""
        data = self._dataset(split, "accessions")[:].tobytes()
        bounds = self._dataset(split, "accession_offsets")[:]
        return [data[a:b].decode("latin-1") for a, b in zip(bounds[:-1], bounds[1:])]

    def offsets(self, split: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token offsets of records start..stop of a split: int64 [stop - start + 1], absolute."""
        stop = self.split_sizes[split] if stop is None else stop
        return self._dataset(split, "offsets")[start:stop + 1]

    def offset(self, split: str, j: int) -> int:
        """offsets[j] of a split: where its record j starts in the split's tokens."""
        return int(self._dataset(split, "offsets")[j])

    def read_tokens(self, split: str, begin: int, end: int) -> np.ndarray:
        """Tokens begin..end of a split's concatenated residues, uint8 [end - begin]."""
        return self._dataset(split, "tokens")[begin:end]

