"""Embedding proteins: windows, token-budget batches and the forward pass; `embed` for proteins in memory.

Each protein is fed as in training, <cls> residues <eos>, and whole: a Performer's attention is linear
in length, so a protein longer than the training window costs time in proportion, not a crop
(``window=<residues>`` embeds overlapping windows instead and averages them per residue). Proteins
are packed longest first into batches of at most ``max_tokens`` padded tokens (`budget_batches`, the
same batcher as training), so little compute goes to padding.

Gap characters ('-', '.') are dropped, as in training: per-residue rows follow the ungapped sequence,
and a warning says so when the input holds any.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from protein_performer import __version__
from protein_performer.data import Alphabet, budget_batches, frame
from protein_performer.embedding.results import Embeddings, offsets_of
from protein_performer.embedding.settings import EmbedError, EmbedSettings, ResolvedSettings, length_limit
from protein_performer.errors import raise_if_interrupted

__all__ = ["embed", "check_records", "forward_batch", "plan_batches", "windows", "has_gaps", "warn_gaps",
           "Progress"]

log = logging.getLogger(__name__)

# One protein's result: {kind: {layer: float32 array}}; mean and cls are [D], per_residue [length, D].
ProteinResult = dict[str, dict[int, np.ndarray]]


def windows(length: int, settings: ResolvedSettings) -> list[tuple[int, int]]:
    """Residue ranges [start, end) that one protein is fed as: one, or overlapping windows covering it."""
    if settings.window is None or length <= settings.window:
        return [(0, length)]
    assert settings.stride is not None
    starts = list(range(0, length - settings.window, settings.stride)) + [length - settings.window]
    return [(start, start + settings.window) for start in starts]


def plan_batches(lengths: Sequence[int], settings: ResolvedSettings) -> list[list[int]]:
    """Positions into `lengths` (residues), grouped into batches of at most max_tokens padded tokens.

    Longest first, ties in input order: the plan depends only on the lengths, so a resumed run
    rebuilds the very batches of the interrupted one. A protein larger than the budget alone is a
    batch of its own (it is embedded whole, never cut).
    """
    if not len(lengths):
        return []
    spans = [windows(length, settings) for length in lengths]
    rows = np.array([len(protein) for protein in spans], dtype=np.int64)
    width = np.array([max(end - start for start, end in protein) + 2 for protein in spans], dtype=np.int64)
    return [batch.tolist() for batch in budget_batches(width, settings.max_tokens, rows, oversize="alone")]


@torch.no_grad()
def forward_batch(model: nn.Module, alphabet: Alphabet, proteins: Sequence[np.ndarray],
                  settings: ResolvedSettings) -> list[ProteinResult]:
    """Embed a batch of proteins (token ids from ``alphabet.encode``, uint8 [length] each).

    Returns one {kind: {layer: float32 array}} per protein: mean and cls are [D], per_residue is
    [length, D]. Windows of one protein are averaged per residue, and their <cls> vectors averaged.
    A safe point for SIGTERM and Ctrl-C (protein_performer.errors).
    """
    raise_if_interrupted()
    starts: list[int] = []  # per row: its first residue in the flat `tokens` below
    takes: list[int] = []
    spans: list[list[tuple[int, int, int]]] = []  # per protein: (row, start, end) of each window
    first = 0
    for residues in proteins:
        protein_spans = []
        for start, end in windows(len(residues), settings):
            protein_spans.append((len(takes), start, end))
            starts.append(first + start)
            takes.append(end - start)
        spans.append(protein_spans)
        first += len(residues)
    ids = frame(alphabet, np.concatenate(proteins), np.asarray(starts), np.asarray(takes))
    input_ids = torch.from_numpy(ids)  # (rows, width)
    padding_mask = input_ids == alphabet.pad_idx
    # Without padding, skip the mask: attention kernels take their fastest path without one.
    padding_mask = padding_mask.to(settings.device) if padding_mask.any() else None
    input_ids = input_ids.to(settings.device)
    autocast = (torch.autocast(settings.device.type, dtype=settings.autocast) if settings.autocast is not None
                else contextlib.nullcontext())
    with autocast:
        hidden = model(input_ids, padding_mask, repr_layers=settings.layers).hidden_states
    hidden = {layer: states.float().cpu() for layer, states in hidden.items()}  # {layer: (rows, width, D)}
    return [_protein_result(hidden, len(residues), protein_spans, settings)
            for residues, protein_spans in zip(proteins, spans)]


def _protein_result(hidden: dict[int, torch.Tensor], length: int, spans: list[tuple[int, int, int]],
                    settings: ResolvedSettings) -> ProteinResult:
    out: ProteinResult = {kind: {} for kind in settings.include}
    for layer in settings.layers:
        states = hidden[layer]
        if len(spans) == 1:
            row, start, end = spans[0]
            # Copies, so that results do not keep the whole padded batch alive.
            per_residue = states[row, 1:end - start + 1].clone()  # (L, D): drop <cls>, stop before <eos>
            cls = states[row, 0].clone()
        else:
            total = torch.zeros(length, states.shape[-1])
            count = torch.zeros(length, 1)
            for row, start, end in spans:
                total[start:end] += states[row, 1:end - start + 1]
                count[start:end] += 1
            per_residue = total / count
            cls = torch.stack([states[row, 0] for row, _, _ in spans]).mean(0)
        if "mean" in out:
            out["mean"][layer] = per_residue.mean(0).numpy()
        if "per_residue" in out:
            out["per_residue"][layer] = per_residue.numpy()
        if "cls" in out:
            out["cls"][layer] = cls.numpy()
    return out


class Progress:
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


_GAPS = frozenset("-.")


def has_gaps(sequence: str) -> bool:
    return not _GAPS.isdisjoint(sequence)


def warn_gaps(gapped: int, total: int, first: str) -> None:
    log.warning("%d of %d proteins hold gap characters ('-' or '.'), first %s; gaps are dropped (as in training), "
                "so per_residue row i is the i-th residue that is not a gap, and lengths count residues only",
                gapped, total, first)


def check_records(ids: Sequence[str], lengths: Sequence[int], model: nn.Module, settings: ResolvedSettings,
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
    limit = length_limit(model)
    if limit is not None and settings.window is None:
        too_long = [i for i, length in enumerate(lengths) if length + 2 > limit]
        if too_long:
            raise EmbedError(
                f"{at(too_long[0])}: {ids[too_long[0]]!r} has {lengths[too_long[0]]} residues, but this model "
                f"(position={model.config.position!r}, attention={model.config.attention!r}) takes at most "
                f"{limit - 2} residues + <cls> + <eos>; {len(too_long)} protein(s) are that long. Set "
                f"window=<residues> (at most {limit - 2}) to embed them as overlapping windows")


def embed(model: nn.Module, alphabet: Alphabet, sequences: Sequence[str] | Mapping[str, str],
          settings: EmbedSettings | None = None, **options: Any) -> Embeddings:
    """Embed proteins held in memory.

    Args:
        model: a ProteinPerformer (e.g. from ``load_model``); it is moved to the device and put in eval mode.
        sequences: residue strings (ids "0", "1", ...) or {id: residues}.
        settings: EmbedSettings (default: its defaults; the file-only fields are not used here).
        options: fields of EmbedSettings to replace, e.g. ``layers=[0, -1], include=["mean", "cls"]``.

    Returns:
        :class:`Embeddings` in input order, arrays in numpy.
    """
    settings = EmbedSettings.with_options(settings, **options)
    if isinstance(sequences, Mapping):
        ids, texts = [str(key) for key in sequences], list(sequences.values())
    elif isinstance(sequences, str):
        raise TypeError("embed takes a list of sequences (or {id: sequence}), got a single string; wrap it in a list")
    else:
        texts = list(sequences)
        ids = [str(i) for i in range(len(texts))]
    resolved = settings.resolve(model)
    residues = [alphabet.encode(text) for text in texts]
    lengths = [len(tokens) for tokens in residues]
    check_records(ids, lengths, model, resolved, lambda i: f"sequences[{i}]")
    gapped = [i for i, text in enumerate(texts) if has_gaps(text)]
    if gapped:
        warn_gaps(len(gapped), len(texts), f"sequences[{gapped[0]}]")
    model.to(resolved.device).eval()

    results: list[ProteinResult | None] = [None] * len(residues)
    bar = Progress(len(residues), 0, settings.show_progress(for_file=False))
    try:
        for batch in plan_batches(lengths, resolved):
            for i, out in zip(batch, forward_batch(model, alphabet, [residues[i] for i in batch], resolved)):
                results[i] = out
            bar.update(len(batch), sum(lengths[i] for i in batch))
    finally:
        bar.close()

    lengths_array = np.asarray(lengths, dtype=np.int64)
    arrays: dict[str, dict[int, np.ndarray]] = {}
    for kind in resolved.include:
        stack = np.concatenate if kind == "per_residue" else np.stack
        arrays[kind] = {layer: stack([out[kind][layer] for out in results if out is not None])
                        for layer in resolved.layers}
    return Embeddings(ids=ids, lengths=lengths_array, offsets=offsets_of(lengths_array), arrays=arrays,
                      n_layers=model.config.n_layers,
                      attrs={"config": json.dumps(model.config.to_dict()), "layers": list(resolved.layers),
                             "include": list(resolved.include), "package_version": __version__})
