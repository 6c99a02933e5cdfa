"""Export a training checkpoint as a model people can share: `protein-performer-export checkpoint=... output=...`.

    python -m protein_performer.export checkpoint=outputs/<date>/<time>/checkpoints/last.ckpt output=my-model
    protein-performer-export checkpoint=<ckpt> output=<dir>          # the installed command

Writes <dir>/config.json, <dir>/model.safetensors and <dir>/README.md, a model card built only from the
checkpoint (architecture, attention settings, data and splits, steps and tokens seen, final perplexities
beside the frequency baseline). The directory loads with `ProteinPerformer.from_pretrained(<dir>)`,
`load_model(<dir>)` and `protein-performer-embed checkpoint=<dir>`; `model.push_to_hub("<user>/<name>")`
publishes it. Options: conf/export.yaml. A bad checkpoint or output is one line and exit status 2; the
directory is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from protein_performer.errors import UserError, describe_os_error, make_output_directory, run_command
from protein_performer.resources import conf_dir

__all__ = ["ExportError", "export_checkpoint", "main"]

USAGE = "python -m protein_performer.export checkpoint=<last.ckpt> output=<directory>"


class ExportError(UserError):
    """An export that cannot be done: the message names the file or key."""


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write `output` (config.json, model.safetensors, README.md) from a training checkpoint; return it."""
    from protein_performer.checkpoint import model_from_checkpoint, read_checkpoint
    from protein_performer.model_card import training_summary

    output = Path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists; choose another output or pass overwrite=true")
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output}: is a file, not a model directory; choose another output")
    make_output_directory(output, ExportError)
    path, saved = read_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(path, saved)
    summary = training_summary(saved)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    except OSError as error:
        raise ExportError(f"cannot write in {output.parent}: {describe_os_error(error)}") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        model.save_pretrained(staging, model_card_kwargs={"training": summary, "name": output.name})
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def export(cfg: DictConfig) -> Path:
    missing = [key for key in ("checkpoint", "output") if OmegaConf.is_missing(cfg, key) or not cfg[key]]
    if missing:
        raise ExportError(f"{' and '.join(missing)} must be given: {USAGE}")
    output = export_checkpoint(cfg.checkpoint, cfg.output, overwrite=cfg.overwrite)
    print(f"exported {cfg.checkpoint} -> {output} (config.json, model.safetensors, README.md)")
    return output


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="export")
def main(cfg: DictConfig) -> None:
    """``python -m protein_performer.export checkpoint=... output=...`` (see conf/export.yaml)."""
    run_command("export", lambda: export(cfg), interrupted_note="nothing was written")


if __name__ == "__main__":
    main()
