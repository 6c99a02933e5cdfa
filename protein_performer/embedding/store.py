"""The embeddings file: a columnar HDF5 layout, its resumable writer `embed_fasta`, and `load_embeddings`.

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
A checkpoint with NaN or infinite weights is refused (by `load_model`, before any of this).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from torch import nn

from protein_performer import __version__
from protein_performer.data import Alphabet, expand_inputs, read_fasta
from protein_performer.embedding import compute
from protein_performer.embedding.results import Embeddings, offsets_of
from protein_performer.embedding.settings import INCLUDE_KINDS, EmbedError, EmbedSettings, ResolvedSettings
from protein_performer.errors import describe_os_error, make_output_directory

__all__ = ["FORMAT_VERSION", "embed_fasta", "load_embeddings", "partial_path"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FORMAT = "protein_performer.embeddings"
_DONE = "_done"  # per-protein bool dataset that exists only in the partial file


def embed_fasta(model: nn.Module, alphabet: Alphabet, input: str | os.PathLike | Sequence[str | os.PathLike],
                output: str | os.PathLike, settings: EmbedSettings | None = None, *, checkpoint: str = "",
                **options: Any) -> Path:
    """Embed every protein of a FASTA into the columnar HDF5 file `output` (see the module docstring).

    Two passes over the input: the first reads ids and lengths (duplicate ids, empty records and
    proteins too long for the model fail here, before any work); the second embeds chunks of
    `chunk_size` records, batched by length inside each chunk, writing each protein at its place in
    file order. Work goes to ``<output>.partial`` and is committed batch by batch; an interrupted run
    started again with the same input and settings skips the proteins already committed.

    Args:
        input: FASTA, plain or gzipped; or a glob or list of them, read in order. Ids are accessions
            (UniProt/UniRef headers) or the header's first word.
        settings: EmbedSettings (default: its defaults); `options` replace some of its fields, e.g.
            ``layers=[-1], include=["mean", "per_residue"], dtype="float16", overwrite=True``.
        checkpoint: recorded in the file's attributes.

    Returns:
        the path of the finished file.
    """
    output = Path(output)
    settings = EmbedSettings.with_options(settings, **options)
    resolved = settings.resolve(model)
    settings.check_file_options()
    if output.exists() and not settings.overwrite:
        raise EmbedError(f"output {output} already exists; delete it, choose another output, or set overwrite=true")

    paths = expand_inputs(input)
    for path in paths:
        if output.resolve() == path.resolve():
            raise EmbedError(f"output {output} is also an input; writing it would destroy the FASTA: "
                             "choose another output")
    make_output_directory(output, EmbedError)
    scan = _scan(paths, alphabet)
    compute.check_records(scan.ids, scan.lengths.tolist(), model, resolved, scan.at)
    if scan.gapped:
        compute.warn_gaps(scan.gapped, len(scan.ids), scan.at(scan.first_gapped))
    if scan.unknown:
        log.warning("%d residue characters of %s are not amino-acid codes and are embedded as <unk>",
                    scan.unknown, ", ".join(map(str, paths)))
    attrs = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint": str(checkpoint),
        "config": json.dumps(model.config.to_dict()),
        "layers": np.asarray(resolved.layers, dtype=np.int64),
        "n_layers": model.config.n_layers,
        "include": json.dumps(list(resolved.include)),
        "input": json.dumps([str(path.resolve()) for path in paths]),
        "input_fingerprint": scan.fingerprint(),
        "settings": json.dumps({"window": resolved.window, "window_stride": resolved.stride,
                                "precision": str(settings.precision), "dtype": settings.dtype}),
        "package_version": __version__,
    }
    partial = partial_path(output)
    model.to(resolved.device).eval()
    offsets = offsets_of(scan.lengths)
    try:
        with _open_partial(partial, scan, attrs, model.config.d_model, resolved, settings.dtype) as file:
            # No progress record: the previous run finished but stopped before renaming.
            done = file[_DONE][()] if _DONE in file else np.ones(len(scan.ids), dtype=bool)
            bar = compute.Progress(len(scan.ids), int(done.sum()), settings.show_progress(for_file=True))
            try:
                for start, chunk in _chunks(paths, alphabet, settings.chunk_size):
                    chunk_done = done[start:start + len(chunk)]
                    if chunk_done.all():
                        continue
                    for batch in compute.plan_batches([len(s) for s in chunk], resolved):
                        todo = [i for i in batch if not chunk_done[i]]
                        if not todo:
                            continue
                        outputs = compute.forward_batch(model, alphabet, [chunk[i] for i in todo], resolved)
                        _write_batch(file, [start + i for i in todo], outputs, offsets, resolved)
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
def _open_partial(partial: Path, scan: _Scan, attrs: dict[str, Any], d_model: int, settings: ResolvedSettings,
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


def _create_layout(file: h5py.File, scan: _Scan, attrs: dict[str, Any], d_model: int, settings: ResolvedSettings,
                   dtype: str) -> None:
    n = len(scan.ids)
    file.attrs.update(attrs)
    file.create_dataset("ids", data=np.asarray(scan.ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
    file.create_dataset("lengths", data=scan.lengths)
    file.create_dataset("offsets", data=offsets_of(scan.lengths))
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
                 offsets: np.ndarray, settings: ResolvedSettings) -> None:
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



def partial_path(output: Path) -> Path:
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
        if compute.has_gaps(record.sequence):
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



def load_embeddings(path: str | os.PathLike, *, lazy: bool = False) -> Embeddings:
    """Open an embeddings file written by ``python -m protein_performer.embed``.

    Args:
        lazy: keep mean/per_residue/cls as h5py datasets read on access (for files larger than memory);
            close the result (or use it in a ``with``) when done. Default: read everything into numpy.
    """
    path = Path(path)
    if not path.exists():
        partial = partial_path(path)
        hint = (f" (an unfinished run left {partial}; run the embed command again to finish it)"
                if partial.exists() else "")
        raise FileNotFoundError(f"no embeddings file at {path}{hint}")
    file = h5py.File(path, "r")
    try:
        if file.attrs.get("format") != _FORMAT:
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


