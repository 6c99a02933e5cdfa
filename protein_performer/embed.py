"""Embeddings of proteins from a trained checkpoint: a FASTA in, a columnar HDF5 file out.

    python -m protein_performer.embed checkpoint=<last.ckpt> input=<proteins.fasta[.gz]> output=<out.h5>

Each protein is fed as in training, <cls> residues <eos>, and whole: a Performer's attention is linear
in length, so a protein longer than the training window costs time in proportion, not a crop
(``window=<residues>`` embeds overlapping windows instead and averages them per residue). Proteins
are sorted by length within chunks of the input and packed into batches of at most ``max_tokens``
padded tokens, so little compute goes to padding.

The file is columnar, so millions of proteins stay one read away:

    ids                   [N]            accession, or the header's first word (utf-8)
    lengths               [N]            residues per protein
    offsets               [N + 1]        protein i is rows offsets[i]:offsets[i+1] of per_residue/*
    mean/<layer>          [N, D]         mean over residues
    per_residue/<layer>   [sum(lengths), D]
    cls/<layer>           [N, D]         the <cls> position
    attrs: checkpoint, config (model config, JSON), layers, n_layers, include, package_version, ...

Layers are stored under their non-negative index (0 = token embeddings, n_layers = after the final
LayerNorm); :class:`Embeddings` also accepts negative ones. The file is built as ``<output>.partial``
and renamed when complete; a run that stops part-way (error, SIGTERM, Ctrl-C, SIGKILL) keeps the
partial file on purpose: run the same command again and it resumes, skipping the proteins the partial
file already holds (a partial file from other settings or input is refused, never mixed in).

Gap characters ('-', '.') are dropped, as in training: per_residue rows follow the ungapped sequence,
and the command warns when the input holds any. A checkpoint with NaN or infinite weights is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from protein_performer import __version__
from protein_performer.data import Alphabet, expand_inputs, read_fasta
from protein_performer.errors import UserError, describe_os_error, make_output_directory, run_command
from protein_performer.resources import conf_dir
from protein_performer.runtime import keep_freed_memory

__all__ = [
    "INCLUDE_KINDS",
    "EmbedError",
    "Embeddings",
    "LayerArrays",
    "ProteinEmbedding",
    "embed",
    "embed_fasta",
    "load_embeddings",
    "main",
    "run",
    "run_cli",
]

log = logging.getLogger(__name__)

INCLUDE_KINDS = ("mean", "per_residue", "cls")
FORMAT_VERSION = 1
# precision option -> autocast dtype (None = plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
STORAGE_DTYPES = ("float32", "float16")
_DONE = "_done"  # per-protein bool dataset that exists only in the partial file


class EmbedError(UserError):
    """A problem with the inputs or settings: the command line prints it and exits with status 2."""


# ----------------------------------------------------------------------------------------------------
# Reading results: one class for in-memory results and for files.


class LayerArrays(Mapping[int, Any]):
    """{layer: array} that also takes negative layers (-1 = n_layers, the final LayerNorm's output).

    Values are numpy arrays, or h5py datasets for ``load_embeddings(..., lazy=True)`` (slice them).
    """

    def __init__(self, arrays: dict[int, Any], n_layers: int) -> None:
        self._arrays = arrays
        self._n_layers = n_layers

    def __getitem__(self, layer: int) -> Any:
        key = layer % (self._n_layers + 1) if -(self._n_layers + 1) <= layer < 0 else layer
        if key not in self._arrays:
            raise KeyError(f"layer {layer} was not embedded; available layers: {sorted(self._arrays)}")
        return self._arrays[key]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._arrays))

    def __len__(self) -> int:
        return len(self._arrays)


@dataclass
class ProteinEmbedding:
    """One protein's embeddings: {layer: [D]} means and cls vectors, {layer: [length, D]} per residue."""

    id: str
    length: int
    mean: dict[int, np.ndarray] = field(default_factory=dict)
    per_residue: dict[int, np.ndarray] = field(default_factory=dict)
    cls: dict[int, np.ndarray] = field(default_factory=dict)


class Embeddings:
    """Embeddings of N proteins, columnar: arrays for all at once, or one protein by id.

    Attributes:
        ids: [N] protein ids.  lengths: [N] residues.  offsets: [N + 1] row ranges in per_residue.
        mean, cls: {layer: [N, D]};  per_residue: {layer: [sum(lengths), D]} (LayerArrays; empty if not
            embedded).
        layers: embedded layers (non-negative).  n_layers: blocks of the model.
        attrs: provenance (checkpoint, model config, settings, package version).

    ``emb["P69905"]`` gives a :class:`ProteinEmbedding`; ``emb.residues("P69905", -1)`` one [L, D] array.
    """

    def __init__(self, *, ids: Sequence[str], lengths: np.ndarray, offsets: np.ndarray,
                 arrays: dict[str, dict[int, Any]], n_layers: int, attrs: dict[str, Any],
                 file: h5py.File | None = None) -> None:
        self.ids = list(ids)
        self.lengths = lengths
        self.offsets = offsets
        self.n_layers = n_layers
        self.attrs = attrs
        self.mean = LayerArrays(arrays.get("mean", {}), n_layers)
        self.per_residue = LayerArrays(arrays.get("per_residue", {}), n_layers)
        self.cls = LayerArrays(arrays.get("cls", {}), n_layers)
        self.layers = tuple(sorted({layer for kind in arrays.values() for layer in kind}))
        self._index = {protein_id: i for i, protein_id in enumerate(self.ids)}
        self._file = file

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, protein_id: object) -> bool:
        return protein_id in self._index

    def __repr__(self) -> str:
        kinds = [kind for kind in INCLUDE_KINDS if len(getattr(self, kind))]
        return f"Embeddings({len(self)} proteins, layers={list(self.layers)}, include={kinds})"

    def index(self, protein_id: str) -> int:
        """Row of `protein_id` in ids, lengths, mean/* and cls/*."""
        try:
            return self._index[protein_id]
        except KeyError:
            raise KeyError(f"no protein with id {protein_id!r} in these embeddings ({len(self)} proteins)") from None

    def residues(self, protein_id: str, layer: int = -1) -> np.ndarray:
        """Per-residue embeddings [length, D] of one protein at `layer`."""
        i = self.index(protein_id)
        return np.asarray(self.per_residue[layer][self.offsets[i]:self.offsets[i + 1]])

    def __getitem__(self, protein_id: str) -> ProteinEmbedding:
        i = self.index(protein_id)
        return ProteinEmbedding(
            id=protein_id,
            length=int(self.lengths[i]),
            mean={layer: np.asarray(self.mean[layer][i]) for layer in self.mean},
            per_residue={layer: self.residues(protein_id, layer) for layer in self.per_residue},
            cls={layer: np.asarray(self.cls[layer][i]) for layer in self.cls},
        )

    def close(self) -> None:
        """Close the file behind lazy arrays (no-op otherwise)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Embeddings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_embeddings(path: str | os.PathLike, *, lazy: bool = False) -> Embeddings:
    """Open an embeddings file written by ``python -m protein_performer.embed``.

    Args:
        lazy: keep mean/per_residue/cls as h5py datasets read on access (for files larger than memory);
            close the result (or use it in a ``with``) when done. Default: read everything into numpy.
    """
    path = Path(path)
    if not path.exists():
        partial = _partial_path(path)
        hint = (f" (an unfinished run left {partial}; run the embed command again to finish it)"
                if partial.exists() else "")
        raise FileNotFoundError(f"no embeddings file at {path}{hint}")
    file = h5py.File(path, "r")
    try:
        if file.attrs.get("format") != "protein_performer.embeddings":
            raise ValueError(f"{path} is not an embeddings file written by protein_performer.embed")
        arrays: dict[str, dict[int, Any]] = {}
        for kind in INCLUDE_KINDS:
            if kind in file:
                arrays[kind] = {int(name): (dataset if lazy else dataset[()]) for name, dataset in file[kind].items()}
        attrs = {key: _attr_value(value) for key, value in file.attrs.items()}
        result = Embeddings(
            ids=[s.decode() if isinstance(s, bytes) else s for s in file["ids"][()]],
            lengths=file["lengths"][()], offsets=file["offsets"][()], arrays=arrays,
            n_layers=int(file.attrs["n_layers"]), attrs=attrs, file=file if lazy else None)
    except BaseException:
        file.close()
        raise
    if not lazy:
        file.close()
    return result


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------------
# Settings, batching and the forward pass shared by the in-memory and the file paths.


@dataclass(frozen=True)
class _Settings:
    layers: tuple[int, ...]  # non-negative, sorted
    include: tuple[str, ...]
    max_tokens: int
    window: int | None  # residues per window; None = whole proteins
    stride: int | None  # residues between window starts
    device: torch.device
    autocast: torch.dtype | None


def _settings(model: nn.Module, *, layers: Sequence[int], include: Sequence[str], max_tokens: int,
              window: int | None, window_stride: int | None, device: str | torch.device | None,
              precision: str) -> _Settings:
    """Validate the options against the model; every problem becomes an EmbedError naming the option."""
    config = model.config
    n_layers = config.n_layers
    layers = list(layers)
    if not layers:
        raise EmbedError("layers is empty; give at least one layer, e.g. layers=[-1]")
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, (int, np.integer))
           or not -(n_layers + 1) <= layer <= n_layers]
    if bad:
        raise EmbedError(f"layers {bad} out of range for this {n_layers}-layer model: use 0..{n_layers} "
                         f"(0 = token embeddings, {n_layers} = after the final LayerNorm) or -1..-{n_layers + 1}")
    resolved = sorted({int(layer) % (n_layers + 1) for layer in layers})
    include = list(include)
    unknown = [kind for kind in include if kind not in INCLUDE_KINDS]
    if not include or unknown:
        raise EmbedError(f"include={include} must be a non-empty subset of {list(INCLUDE_KINDS)}")
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise EmbedError(f"max_tokens must be a positive integer (padded tokens per batch), got {max_tokens!r}")
    str_precision = str(precision)
    if str_precision not in PRECISIONS:
        raise EmbedError(f"precision={precision!r}: choose one of {list(PRECISIONS)}")
    limit = _length_limit(model)
    if window is not None:
        if not isinstance(window, int) or window <= 0:
            raise EmbedError(f"window must be a positive number of residues or null, got {window!r}")
        if limit is not None and window + 2 > limit:
            raise EmbedError(f"window={window} residues + <cls> + <eos> exceeds this model's max_length={limit}; "
                             f"use window<={limit - 2}")
        stride = window // 2 if window_stride is None else window_stride
        if not isinstance(stride, int) or not 0 < stride <= window:
            raise EmbedError(f"window_stride must be in 1..window={window}, got {window_stride!r}")
    elif window_stride is not None:
        raise EmbedError("window_stride is set but window is not; set window=<residues> too, or drop window_stride")
    else:
        stride = None
    return _Settings(layers=tuple(resolved), include=tuple(kind for kind in INCLUDE_KINDS if kind in include),
                     max_tokens=max_tokens, window=window, stride=stride, device=_device(device),
                     autocast=PRECISIONS[str_precision])


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise EmbedError(f"device={device!r} is not a torch device; use cpu, cuda, cuda:<i> or auto") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EmbedError(f"device={device!r} but CUDA is not available here; use device=cpu or device=auto")
    return resolved


def _length_limit(model: nn.Module) -> int | None:
    """Longest token row the model accepts, or None when any length works.

    Rotary positions, FAVOR+ and a windowed favor_rpe bias extend to any length; a learned position
    table and a full favor_rpe bias (rpe_max_distance null) have max_length entries.
    """
    config = model.config
    if config.position == "learned" or (config.attention == "favor_rpe" and config.rpe_max_distance is None):
        return config.max_length
    return None


def _windows(length: int, settings: _Settings) -> list[tuple[int, int]]:
    """Residue ranges [start, end) that one protein is fed as: one, or overlapping windows covering it."""
    if settings.window is None or length <= settings.window:
        return [(0, length)]
    assert settings.stride is not None
    starts = list(range(0, length - settings.window, settings.stride)) + [length - settings.window]
    return [(start, start + settings.window) for start in starts]


def _cost(length: int, settings: _Settings) -> tuple[int, int]:
    """(rows, tokens per row) that a protein of `length` residues takes in a batch."""
    windows = _windows(length, settings)
    return len(windows), max(end - start for start, end in windows) + 2


def _plan_batches(lengths: Sequence[int], settings: _Settings) -> list[list[int]]:
    """Positions into `lengths`, grouped into batches of at most max_tokens padded tokens.

    Shortest first, ties in input order: the plan depends only on the lengths, so a resumed run
    rebuilds the very batches of the interrupted one. A protein larger than the budget alone is a
    batch of its own (it is embedded whole, never cut).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    rows = width = 0
    for i in order:
        n_rows, n_tokens = _cost(lengths[i], settings)
        if current and (rows + n_rows) * max(width, n_tokens) > settings.max_tokens:
            batches.append(current)
            current, rows, width = [], 0, 0
        current.append(i)
        rows += n_rows
        width = max(width, n_tokens)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def _forward_batch(model: nn.Module, alphabet: Alphabet, proteins: Sequence[np.ndarray],
                   settings: _Settings) -> list[dict[str, dict[int, np.ndarray]]]:
    """Embed a batch of proteins (token ids from ``alphabet.encode``, uint8 [length] each).

    Returns one {kind: {layer: float32 array}} per protein: mean and cls are [D], per_residue is
    [length, D]. Windows of one protein are averaged per residue, and their <cls> vectors averaged.
    """
    rows: list[np.ndarray] = []
    spans: list[list[tuple[int, int, int]]] = []  # per protein: (row, start, end) of each window
    for residues in proteins:
        protein_spans = []
        for start, end in _windows(len(residues), settings):
            protein_spans.append((len(rows), start, end))
            rows.append(residues[start:end])
        spans.append(protein_spans)
    width = max(len(row) for row in rows) + 2
    input_ids = torch.full((len(rows), width), alphabet.pad_idx, dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, 0] = alphabet.cls_idx
        input_ids[r, 1:len(row) + 1] = torch.from_numpy(row.astype(np.int64))
        input_ids[r, len(row) + 1] = alphabet.eos_idx
    padding_mask = input_ids == alphabet.pad_idx  # (rows, width)
    # Without padding, skip the mask: attention kernels take their fastest path without one.
    padding_mask = padding_mask.to(settings.device) if padding_mask.any() else None
    input_ids = input_ids.to(settings.device)
    autocast = (torch.autocast(settings.device.type, dtype=settings.autocast) if settings.autocast is not None
                else contextlib.nullcontext())
    with autocast:
        hidden = model(input_ids, padding_mask, repr_layers=settings.layers).hidden_states
    hidden = {layer: states.float().cpu() for layer, states in hidden.items()}  # {layer: (rows, width, D)}

    results = []
    for residues, protein_spans in zip(proteins, spans):
        out: dict[str, dict[int, np.ndarray]] = {kind: {} for kind in settings.include}
        for layer in settings.layers:
            states = hidden[layer]
            if len(protein_spans) == 1:
                row, start, end = protein_spans[0]
                # Copies, so that results do not keep the whole padded batch alive.
                per_residue = states[row, 1:end - start + 1].clone()  # (L, D): drop <cls>, stop before <eos>
                cls = states[row, 0].clone()
            else:
                total = torch.zeros(len(residues), states.shape[-1])
                count = torch.zeros(len(residues), 1)
                for row, start, end in protein_spans:
                    total[start:end] += states[row, 1:end - start + 1]
                    count[start:end] += 1
                per_residue = total / count
                cls = torch.stack([states[row, 0] for row, _, _ in protein_spans]).mean(0)
            if "mean" in out:
                out["mean"][layer] = per_residue.mean(0).numpy()
            if "per_residue" in out:
                out["per_residue"][layer] = per_residue.numpy()
            if "cls" in out:
                out["cls"][layer] = cls.numpy()
        results.append(out)
    return results


class _Progress:
    """tqdm bar over proteins, with residues/s beside tqdm's own proteins/s."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=done, unit="seq", desc="embed", disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr)
        self.residues = 0
        self.start = time.perf_counter()

    def update(self, proteins: int, residues: int) -> None:
        self.residues += residues
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.residues / elapsed:,.0f} res/s", refresh=False)
        self.bar.update(proteins)

    def close(self) -> None:
        self.bar.close()


def embed(
    model: nn.Module,
    alphabet: Alphabet,
    sequences: Sequence[str] | Mapping[str, str],
    *,
    layers: Sequence[int] = (-1,),
    include: Sequence[str] = ("mean",),
    max_tokens: int = 16_384,
    window: int | None = None,
    window_stride: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "32",
    progress: bool = False,
) -> Embeddings:
    """Embed proteins held in memory.

    Args:
        model: a ProteinPerformer (e.g. from ``load_model``); it is moved to `device` and put in eval mode.
        sequences: residue strings (ids "0", "1", ...) or {id: residues}.
        layers: hidden states to keep; 0 = token embeddings, i = after block i, -1 = after the final
            LayerNorm.
        include: any of "mean" ([D] per protein), "per_residue" ([length, D]), "cls" ([D]).
        max_tokens: padded tokens per batch (rows x longest row); a larger protein is a batch alone.
        window: embed proteins longer than this many residues as overlapping windows (stride
            `window_stride`, default window // 2) averaged per residue; None = whole proteins.
        device: "cpu", "cuda", "cuda:1", or None/"auto" (CUDA when available).
        precision: "32", "bf16" or "16" (autocast); results are float32.

    Returns:
        :class:`Embeddings` in input order, arrays in numpy.
    """
    if isinstance(sequences, Mapping):
        ids, texts = [str(key) for key in sequences], list(sequences.values())
    elif isinstance(sequences, str):
        raise TypeError("embed takes a list of sequences (or {id: sequence}), got a single string; wrap it in a list")
    else:
        texts = list(sequences)
        ids = [str(i) for i in range(len(texts))]
    settings = _settings(model, layers=layers, include=include, max_tokens=max_tokens, window=window,
                         window_stride=window_stride, device=device, precision=precision)
    residues = [alphabet.encode(text) for text in texts]
    lengths = [len(tokens) for tokens in residues]
    _check_records(ids, lengths, model, settings, lambda i: f"sequences[{i}]")
    gapped = [i for i, text in enumerate(texts) if _has_gaps(text)]
    if gapped:
        _warn_gaps(len(gapped), len(texts), f"sequences[{gapped[0]}]")
    model.to(settings.device).eval()

    results: list[dict[str, dict[int, np.ndarray]] | None] = [None] * len(residues)
    bar = _Progress(len(residues), 0, progress)
    try:
        for batch in _plan_batches(lengths, settings):
            for i, out in zip(batch, _forward_batch(model, alphabet, [residues[i] for i in batch], settings)):
                results[i] = out
            bar.update(len(batch), sum(lengths[i] for i in batch))
    finally:
        bar.close()

    lengths_array = np.asarray(lengths, dtype=np.int64)
    arrays: dict[str, dict[int, np.ndarray]] = {}
    for kind in settings.include:
        stack = np.concatenate if kind == "per_residue" else np.stack
        arrays[kind] = {layer: stack([out[kind][layer] for out in results if out is not None])
                        for layer in settings.layers}
    return Embeddings(ids=ids, lengths=lengths_array, offsets=_offsets(lengths_array), arrays=arrays,
                      n_layers=model.config.n_layers,
                      attrs={"config": json.dumps(model.config.to_dict()), "layers": list(settings.layers),
                             "include": list(settings.include), "package_version": __version__})


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _check_records(ids: Sequence[str], lengths: Sequence[int], model: nn.Module, settings: _Settings,
                   at: Callable[[int], str]) -> None:
    """Fail before any work on duplicate ids, empty proteins, or proteins the model cannot take whole.

    `at(i)` says where record i is, for messages (file and line, or list index).
    """
    if not ids:
        raise EmbedError("no sequences to embed")
    first: dict[str, int] = {}
    duplicates = []
    for i, protein_id in enumerate(ids):
        if protein_id in first:
            duplicates.append(f"{protein_id!r} ({at(first[protein_id])} and {at(i)})")
        else:
            first[protein_id] = i
    if duplicates:
        shown = ", ".join(duplicates[:5]) + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        raise EmbedError(f"duplicate ids {shown}; ids must be unique so results can be looked up "
                         "by id: deduplicate the input or rename the records")
    for i, length in enumerate(lengths):
        if length == 0:
            raise EmbedError(f"{at(i)}: {ids[i]!r} has no residues; remove the record")
    limit = _length_limit(model)
    if limit is not None and settings.window is None:
        too_long = [i for i, length in enumerate(lengths) if length + 2 > limit]
        if too_long:
            raise EmbedError(
                f"{at(too_long[0])}: {ids[too_long[0]]!r} has {lengths[too_long[0]]} residues, but this model "
                f"(position={model.config.position!r}, attention={model.config.attention!r}) takes at most "
                f"{limit - 2} residues + <cls> + <eos>; {len(too_long)} protein(s) are that long. Set "
                f"window=<residues> (at most {limit - 2}) to embed them as overlapping windows")


# ----------------------------------------------------------------------------------------------------
# FASTA -> HDF5, resumable.


@dataclass
class _Scan:
    """What the first pass over the input learns: ids, lengths, and where each record is."""

    ids: list[str]
    lengths: np.ndarray  # int64 [N], residues after encoding (gaps and a final '*' dropped)
    lines: np.ndarray  # int64 [N], line of each header in its file
    files: np.ndarray  # int32 [N], index into paths
    paths: list[Path]
    unknown: int  # characters that became <unk>
    gapped: int = 0  # records holding gap characters ('-', '.'), which encoding drops
    first_gapped: int = -1  # index of the first of them

    def at(self, i: int) -> str:
        return f"{self.paths[self.files[i]]}:{self.lines[i]} (record {i + 1})"

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for protein_id in self.ids:
            digest.update(protein_id.encode() + b"\0")
        digest.update(self.lengths.astype("<i8").tobytes())
        return digest.hexdigest()


def _scan(paths: list[Path], alphabet: Alphabet) -> _Scan:
    ids, lengths, lines, files = [], [], [], []
    unknown = gapped = 0
    first_gapped = -1
    file_index = {path: i for i, path in enumerate(paths)}
    for record in read_fasta(paths):
        if _has_gaps(record.sequence):
            gapped += 1
            first_gapped = len(ids) if first_gapped < 0 else first_gapped
        tokens, n_unknown = alphabet.encode_with_unknown_count(record.sequence)
        ids.append(record.accession)
        lengths.append(len(tokens))
        lines.append(record.line)
        files.append(file_index[record.path])
        unknown += n_unknown
    return _Scan(ids=ids, lengths=np.asarray(lengths, dtype=np.int64), lines=np.asarray(lines, dtype=np.int64),
                 files=np.asarray(files, dtype=np.int32), paths=paths, unknown=unknown, gapped=gapped,
                 first_gapped=first_gapped)


_GAPS = frozenset("-.")


def _has_gaps(sequence: str) -> bool:
    return not _GAPS.isdisjoint(sequence)


def _warn_gaps(gapped: int, total: int, first: str) -> None:
    log.warning("%d of %d proteins hold gap characters ('-' or '.'), first %s; gaps are dropped (as in training), "
                "so per_residue row i is the i-th residue that is not a gap, and lengths count residues only",
                gapped, total, first)


def _partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _chunks(paths: list[Path], alphabet: Alphabet, size: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(index of the first record, token ids of up to `size` records), in input order."""
    chunk: list[np.ndarray] = []
    start = 0
    for i, record in enumerate(read_fasta(paths)):
        chunk.append(alphabet.encode(record.sequence))
        if len(chunk) == size:
            yield start, chunk
            start, chunk = i + 1, []
    if chunk:
        yield start, chunk


def embed_fasta(
    model: nn.Module,
    alphabet: Alphabet,
    input: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    layers: Sequence[int] = (-1,),
    include: Sequence[str] = ("mean",),
    max_tokens: int = 16_384,
    window: int | None = None,
    window_stride: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "32",
    dtype: str = "float32",
    chunk_size: int = 100_000,
    checkpoint: str = "",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Embed every protein of a FASTA into the columnar HDF5 file `output` (see the module docstring).

    Two passes over the input: the first reads ids and lengths (duplicate ids, empty records and
    proteins too long for the model fail here, before any work); the second embeds chunks of
    `chunk_size` records, sorted by length inside each chunk, writing each protein at its place in
    file order. Work goes to ``<output>.partial`` and is committed batch by batch; an interrupted run
    started again with the same input and settings skips the proteins already committed.

    Args:
        input: FASTA, plain or gzipped; or a glob or list of them, read in order. Ids are accessions
            (UniProt/UniRef headers) or the header's first word.
        dtype: storage type of the embeddings, "float32" or "float16" (half the disk).
        checkpoint: recorded in the file's attributes.
        overwrite: replace an existing `output` (otherwise that is an error).
        Others: as in :func:`embed`.

    Returns:
        the path of the finished file.
    """
    output = Path(output)
    settings = _settings(model, layers=layers, include=include, max_tokens=max_tokens, window=window,
                         window_stride=window_stride, device=device, precision=precision)
    if dtype not in STORAGE_DTYPES:
        raise EmbedError(f"dtype={dtype!r}: choose one of {list(STORAGE_DTYPES)}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise EmbedError(f"chunk_size must be a positive number of records, got {chunk_size!r}")
    if output.exists() and not overwrite:
        raise EmbedError(f"output {output} already exists; delete it, choose another output, or set overwrite=true")

    paths = expand_inputs(input)
    for path in paths:
        if output.resolve() == path.resolve():
            raise EmbedError(f"output {output} is also an input; writing it would destroy the FASTA: "
                             "choose another output")
    make_output_directory(output, EmbedError)
    scan = _scan(paths, alphabet)
    _check_records(scan.ids, scan.lengths.tolist(), model, settings, scan.at)
    if scan.gapped:
        _warn_gaps(scan.gapped, len(scan.ids), scan.at(scan.first_gapped))
    if scan.unknown:
        log.warning("%d residue characters of %s are not amino-acid codes and are embedded as <unk>",
                    scan.unknown, ", ".join(map(str, paths)))
    attrs = {
        "format": "protein_performer.embeddings",
        "format_version": FORMAT_VERSION,
        "checkpoint": str(checkpoint),
        "config": json.dumps(model.config.to_dict()),
        "layers": np.asarray(settings.layers, dtype=np.int64),
        "n_layers": model.config.n_layers,
        "include": json.dumps(list(settings.include)),
        "input": json.dumps([str(path.resolve()) for path in paths]),
        "input_fingerprint": scan.fingerprint(),
        "settings": json.dumps({"window": settings.window, "window_stride": settings.stride,
                                "precision": str(precision), "dtype": dtype}),
        "package_version": __version__,
    }
    partial = _partial_path(output)
    model.to(settings.device).eval()
    offsets = _offsets(scan.lengths)
    try:
        with _open_partial(partial, scan, attrs, model.config.d_model, settings, dtype) as file:
            # No progress record: the previous run finished but stopped before renaming.
            done = file[_DONE][()] if _DONE in file else np.ones(len(scan.ids), dtype=bool)
            bar = _Progress(len(scan.ids), int(done.sum()), progress)
            try:
                for start, chunk in _chunks(paths, alphabet, chunk_size):
                    chunk_done = done[start:start + len(chunk)]
                    if chunk_done.all():
                        continue
                    for batch in _plan_batches([len(s) for s in chunk], settings):
                        todo = [i for i in batch if not chunk_done[i]]
                        if not todo:
                            continue
                        outputs = _forward_batch(model, alphabet, [chunk[i] for i in todo], settings)
                        _write_batch(file, [start + i for i in todo], outputs, offsets, settings)
                        bar.update(len(todo), sum(len(chunk[i]) for i in todo))
            finally:
                bar.close()
            if _DONE in file:
                del file[_DONE]
        os.replace(partial, output)
    except OSError as error:  # disk full, permissions, a file system gone away: name the file
        raise EmbedError(f"{partial}: writing the embeddings failed: {describe_os_error(error)}; the proteins "
                         "done so far are kept: fix the cause and run the same command again") from None
    return output


@contextlib.contextmanager
def _open_partial(partial: Path, scan: _Scan, attrs: dict[str, Any], d_model: int, settings: _Settings,
                  dtype: str) -> Iterator[h5py.File]:
    """Open the partial file of an interrupted run with the same input and settings, or start one."""
    if partial.exists():
        try:
            file = h5py.File(partial, "r+")
        except OSError:
            log.warning("%s is unreadable (the run was probably killed while writing); starting over", partial)
            partial.unlink()
        else:
            mismatched = [key for key, value in attrs.items()
                          if key != "package_version" and not np.array_equal(file.attrs.get(key), value)]
            if mismatched:
                file.close()
                raise EmbedError(f"{partial} was left by a run with other settings ({', '.join(mismatched)}); "
                                 "delete it to start over, or run again with that run's input and settings "
                                 "to finish it")
            if _DONE in file:
                log.info("resuming %s: %d of %d proteins already embedded", partial,
                         int(file[_DONE][()].sum()), len(scan.ids))
            with file:
                yield file
            return
    with h5py.File(partial, "w") as file:
        _create_layout(file, scan, attrs, d_model, settings, dtype)
        yield file


def _create_layout(file: h5py.File, scan: _Scan, attrs: dict[str, Any], d_model: int, settings: _Settings,
                   dtype: str) -> None:
    n = len(scan.ids)
    file.attrs.update(attrs)
    file.create_dataset("ids", data=np.asarray(scan.ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
    file.create_dataset("lengths", data=scan.lengths)
    file.create_dataset("offsets", data=_offsets(scan.lengths))
    total = int(scan.lengths.sum())
    for kind in settings.include:
        group = file.create_group(kind)
        rows = total if kind == "per_residue" else n
        # About 1 MiB chunks: big enough for fast bulk reads, small enough for cheap scattered writes.
        chunk_rows = max(1, min(rows, (1 << 20) // (d_model * np.dtype(dtype).itemsize)))
        for layer in settings.layers:
            group.create_dataset(str(layer), shape=(rows, d_model), dtype=dtype, chunks=(chunk_rows, d_model))
    file.create_dataset(_DONE, data=np.zeros(n, dtype=bool))
    file.flush()


def _write_batch(file: h5py.File, indices: list[int], outputs: list[dict[str, dict[int, np.ndarray]]],
                 offsets: np.ndarray, settings: _Settings) -> None:
    """Write one batch at the proteins' places in file order, then mark them done: a crash before the
    final flush leaves them undone, so they are embedded again on resume."""
    order = np.argsort(indices)  # h5py writes rows given in increasing order
    rows = np.asarray(indices)[order]
    for kind in settings.include:
        for layer in settings.layers:
            dataset = file[kind][str(layer)]
            if kind == "per_residue":
                for i, out in zip(indices, outputs):
                    dataset[offsets[i]:offsets[i + 1]] = out[kind][layer]
            else:
                dataset[rows] = np.stack([outputs[j][kind][layer] for j in order])
    file.flush()
    file[_DONE][rows] = True
    file.flush()


# ----------------------------------------------------------------------------------------------------
# Command line.


def run(cfg: DictConfig) -> Path:
    """Load the checkpoint named in `cfg` and embed its input FASTA (the body of the command line)."""
    from protein_performer.checkpoint import load_model

    for key in ("checkpoint", "input", "output"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise EmbedError(f"{key}=... is required: python -m protein_performer.embed "
                             "checkpoint=<ckpt> input=<fasta or .gz> output=<file.h5>")
    checkpoint = Path(cfg.checkpoint)
    options = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(options, dict)

    def as_list(value: Any) -> list:  # `layers=-1` and `include=mean` mean one-element lists
        return list(value) if isinstance(value, list) else [value]

    model, alphabet = load_model(checkpoint, map_location="cpu")  # CheckpointError: damaged, non-finite, ...
    return embed_fasta(
        model, alphabet, cfg.input, cfg.output,
        layers=as_list(options["layers"]), include=as_list(options["include"]), max_tokens=options["max_tokens"],
        window=options["window"], window_stride=options["window_stride"], device=options["device"],
        precision=str(options["precision"]), dtype=options["dtype"], chunk_size=options["chunk_size"],
        checkpoint=str(checkpoint.resolve()), overwrite=options["overwrite"], progress=options["progress"])


def run_cli(cfg: DictConfig) -> int:
    """`run` with the command line's error style (protein_performer.errors); the exit status.

    Expected problems (input, settings, checkpoint, file system, out of memory) are one line on stderr and
    status 2; SIGTERM and Ctrl-C one line and 143 or 130. Work already committed to the partial file is
    kept: running the same command again resumes it.
    """
    def body() -> Path:
        try:
            return run(cfg)
        except torch.cuda.OutOfMemoryError:
            raise EmbedError(f"out of memory with max_tokens={cfg.max_tokens}; lower it (or set window=<residues> "
                             f"for very long proteins) and run again: the proteins done are kept in "
                             f"{cfg.output}.partial") from None

    try:
        output = run_command("embed", body, interrupted_note=f"the proteins embedded so far are kept in "
                             f"{cfg.output}.partial: run the same command again to resume")
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 1
    print(f"embed: wrote {output}", file=sys.stderr)
    return 0


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="embed")
def main(cfg: DictConfig) -> None:
    """``python -m protein_performer.embed checkpoint=... input=... output=...`` (see conf/embed.yaml)."""
    keep_freed_memory()  # long inputs allocate large feature tensors per layer: reuse, don't page-fault
    status = run_cli(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
