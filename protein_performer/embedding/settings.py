"""The options of an embedding run, in one dataclass, and their check against the model.

`EmbedSettings` is what a user sets (the command line's keys, `embed`'s and `embed_fasta`'s keyword
arguments); `EmbedSettings.resolve(model)` checks it against the model and gives `ResolvedSettings`,
what the forward pass and the writer use (non-negative layers, a window stride, a torch device, an
autocast dtype). Every problem is an `EmbedError` that names the option.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from protein_performer.errors import UserError

__all__ = ["INCLUDE_KINDS", "PRECISIONS", "STORAGE_DTYPES", "EmbedError", "EmbedSettings", "ResolvedSettings",
           "length_limit"]

INCLUDE_KINDS = ("mean", "per_residue", "cls")
# precision option -> autocast dtype (None = plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
STORAGE_DTYPES = ("float32", "float16")


class EmbedError(UserError):
    """A problem with the inputs or settings: the command line prints it and exits with status 2."""


@dataclass(frozen=True)
class EmbedSettings:
    """How proteins are embedded (conf/embed.yaml maps onto these fields one to one).

    Attributes:
        layers: hidden states to keep; 0 = token embeddings, i = after block i, -1 = after the final
            LayerNorm.
        include: any of "mean" ([D] per protein), "per_residue" ([length, D]), "cls" ([D]).
        max_tokens: padded tokens per batch (rows x longest row); a larger protein is a batch alone.
        window: embed proteins longer than this many residues as overlapping windows averaged per
            residue; None = whole proteins.
        window_stride: residues between window starts; None = window // 2.
        device: "cpu", "cuda", "cuda:1", or None/"auto" (CUDA when available).
        precision: "32", "bf16" or "16" (autocast); results are float32.
        dtype: files only: storage type, "float32" or "float16" (half the disk).
        chunk_size: files only: records read at a time and sorted by length together.
        overwrite: files only: replace an existing output (otherwise that is an error).
        progress: a tqdm bar on stderr; None = for files, not for proteins in memory.
    """

    layers: tuple[int, ...] = (-1,)
    include: tuple[str, ...] = ("mean",)
    max_tokens: int = 16_384
    window: int | None = None
    window_stride: int | None = None
    device: str | torch.device | None = None
    precision: str = "32"
    dtype: str = "float32"
    chunk_size: int = 100_000
    overwrite: bool = False
    progress: bool | None = None

    @classmethod
    def with_options(cls, settings: EmbedSettings | None = None, **options: Any) -> EmbedSettings:
        """`settings` (default: the defaults) with some fields replaced, e.g. ``layers=[0, -1]``."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown embedding option(s) {unknown}; the options are {sorted(names)}")
        if "layers" in options:
            options["layers"] = tuple(options["layers"])
        if "include" in options:
            options["include"] = tuple(options["include"])
        return dataclasses.replace(settings if settings is not None else cls(), **options)

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> EmbedSettings:
        """From the command line's keys (plain values): a scalar `layers=-1` or `include=mean` is a one-element
        list, and a key that is no option is an EmbedError naming it."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise EmbedError(f"unknown key(s) {unknown} in the embed config; the options are {sorted(names)}")
        values = dict(options)
        for key in ("layers", "include"):
            if key in values and not isinstance(values[key], (list, tuple)):
                values[key] = [values[key]]
        if "precision" in values:
            values["precision"] = str(values["precision"])  # precision=32 arrives as an int
        return cls.with_options(**values)

    def show_progress(self, *, for_file: bool) -> bool:
        return for_file if self.progress is None else bool(self.progress)

    def check_file_options(self) -> None:
        """The options only a file needs."""
        if self.dtype not in STORAGE_DTYPES:
            raise EmbedError(f"dtype={self.dtype!r}: choose one of {list(STORAGE_DTYPES)}")
        if not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise EmbedError(f"chunk_size must be a positive number of records, got {self.chunk_size!r}")

    def resolve(self, model: nn.Module) -> ResolvedSettings:
        """Check the options against the model; every problem becomes an EmbedError naming the option."""
        n_layers = model.config.n_layers
        layers = list(self.layers)
        if not layers:
            raise EmbedError("layers is empty; give at least one layer, e.g. layers=[-1]")
        bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, (int, np.integer))
               or not -(n_layers + 1) <= layer <= n_layers]
        if bad:
            raise EmbedError(f"layers {bad} out of range for this {n_layers}-layer model: use 0..{n_layers} "
                             f"(0 = token embeddings, {n_layers} = after the final LayerNorm) or -1..-{n_layers + 1}")
        include = list(self.include)
        unknown = [kind for kind in include if kind not in INCLUDE_KINDS]
        if not include or unknown:
            raise EmbedError(f"include={include} must be a non-empty subset of {list(INCLUDE_KINDS)}")
        max_tokens = self.max_tokens
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise EmbedError(f"max_tokens must be a positive integer (padded tokens per batch), got {max_tokens!r}")
        precision = str(self.precision)
        if precision not in PRECISIONS:
            raise EmbedError(f"precision={self.precision!r}: choose one of {list(PRECISIONS)}")
        return ResolvedSettings(
            layers=tuple(sorted({int(layer) % (n_layers + 1) for layer in layers})),
            include=tuple(kind for kind in INCLUDE_KINDS if kind in include), max_tokens=max_tokens,
            window=self.window, stride=self._stride(length_limit(model)), device=_device(self.device),
            autocast=PRECISIONS[precision])

    def _stride(self, limit: int | None) -> int | None:
        window, window_stride = self.window, self.window_stride
        if window is None:
            if window_stride is not None:
                raise EmbedError("window_stride is set but window is not; set window=<residues> too, "
                                 "or drop window_stride")
            return None
        if not isinstance(window, int) or window <= 0:
            raise EmbedError(f"window must be a positive number of residues or null, got {window!r}")
        if limit is not None and window + 2 > limit:
            raise EmbedError(f"window={window} residues + <cls> + <eos> exceeds this model's max_length={limit}; "
                             f"use window<={limit - 2}")
        stride = window // 2 if window_stride is None else window_stride
        if not isinstance(stride, int) or not 0 < stride <= window:
            raise EmbedError(f"window_stride must be in 1..window={window}, got {window_stride!r}")
        return stride


@dataclass(frozen=True)
class ResolvedSettings:
    """EmbedSettings checked against one model: what the forward pass and the writer read."""

    layers: tuple[int, ...]  # non-negative, sorted
    include: tuple[str, ...]  # in INCLUDE_KINDS order
    max_tokens: int
    window: int | None  # residues per window; None = whole proteins
    stride: int | None  # residues between window starts
    device: torch.device
    autocast: torch.dtype | None


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


def length_limit(model: nn.Module) -> int | None:
    """Longest token row the model accepts, or None when any length works (from the attention registry:
    a learned position table and a full favor_rpe bias have max_length entries)."""
    return model.config.longest_input
