"""protein-performer: long-context protein language models with FAVOR+ attention.

    from protein_performer import ProteinPerformer, load_model
    model, alphabet = load_model("outputs/<date>/<time>/checkpoints/last.ckpt")   # or an exported directory
    model = ProteinPerformer.from_pretrained("my-model")                         # directory or Hub repository

Public names are imported on first use, so `import protein_performer` stays cheap and a command such
as `python -m protein_performer.preprocess` does not import the model or Lightning.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PerformerConfig": "protein_performer.config",
    "ProteinPerformer": "protein_performer.model",
    "PerformerOutput": "protein_performer.model",
    "load_model": "protein_performer.checkpoint",
    "Alphabet": "protein_performer.data",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from protein_performer.checkpoint import load_model
    from protein_performer.data import Alphabet
    from protein_performer.config import PerformerConfig
    from protein_performer.model import PerformerOutput, ProteinPerformer


def _version() -> str:
    """The installed distribution's version (importlib.metadata costs 50 ms to import: only when asked)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("protein-performer")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = value = _version()
        return value
    if name not in _EXPORTS:
        raise AttributeError(f"module 'protein_performer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
