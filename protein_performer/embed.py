"""Embeddings of proteins from a trained checkpoint, the command line: a FASTA in, a columnar HDF5 file out.

    python -m protein_performer.embed checkpoint=<last.ckpt> input=<proteins.fasta[.gz]> output=<out.h5>

Options are conf/embed.yaml's keys (the fields of `EmbedSettings`). The work lives in
`protein_performer.embedding`: batching, windows and the forward pass (compute.py), the file layout,
its resumable writer and `load_embeddings` (store.py); this module parses, loads the checkpoint, calls
`embed_fasta` and reports. Its names (`embed`, `embed_fasta`, `load_embeddings`, ...) stay importable
from here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from protein_performer.embedding import (
    INCLUDE_KINDS,
    EmbedError,
    EmbedSettings,
    Embeddings,
    LayerArrays,
    ProteinEmbedding,
    embed,
    embed_fasta,
    load_embeddings,
)
from protein_performer.errors import records_signals, run_command
from protein_performer.resources import conf_dir
from protein_performer.runtime import keep_freed_memory, slow_bf16_warning

__all__ = [
    "INCLUDE_KINDS",
    "EmbedError",
    "EmbedSettings",
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

_LOCATIONS = ("checkpoint", "input", "output")


def run(cfg: DictConfig) -> Path:
    """Load the checkpoint named in `cfg` and embed its input FASTA (the body of the command line)."""
    from protein_performer.checkpoint import load_model

    for key in _LOCATIONS:
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise EmbedError(f"{key}=... is required: python -m protein_performer.embed "
                             "checkpoint=<ckpt> input=<fasta or .gz> output=<file.h5>")
    options = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(options, dict)
    settings = EmbedSettings.from_config({key: value for key, value in options.items() if key not in _LOCATIONS})
    slow_bf16 = slow_bf16_warning(settings.precision, str(settings.device or "auto"), option="precision", fix="32")
    if slow_bf16 is not None:
        print(f"embed: warning: {slow_bf16}", file=sys.stderr)
    checkpoint = Path(cfg.checkpoint)
    model, alphabet = load_model(checkpoint, map_location="cpu")  # CheckpointError: damaged, non-finite, ...
    return embed_fasta(model, alphabet, cfg.input, cfg.output, settings, checkpoint=str(checkpoint.resolve()))


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


@records_signals("embed")
@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="embed")
def main(cfg: DictConfig) -> None:
    """``python -m protein_performer.embed checkpoint=... input=... output=...`` (see conf/embed.yaml)."""
    keep_freed_memory()  # long inputs allocate large feature tensors per layer: reuse, don't page-fault
    status = run_cli(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
