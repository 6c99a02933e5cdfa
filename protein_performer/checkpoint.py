"""Checkpoints written by `protein_performer.train`: one reader for train (resume), embed and `load_model`.

`read_checkpoint` names the file and says what is wrong with it (missing, empty, truncated, not a
PyTorch checkpoint, not one of ours, from an incompatible version); `load_model` rebuilds the network
for inference without Hydra or Lightning and refuses non-finite weights; `check_resume` compares a
checkpoint's run settings (model config, objective, data sampling, seed) with a new run's.
Every problem is a CheckpointError: the commands print it as one line and exit with status 2.
"""
from __future__ import annotations

import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from protein_performer.data import Alphabet
from protein_performer.errors import UserError
from protein_performer.model import PerformerConfig, ProteinPerformer

__all__ = ["CheckpointError", "read_checkpoint", "load_model", "model_config_of", "check_resume",
           "check_weights_fit", "check_state_fits", "data_sampling_settings", "run_layout", "setting_differences",
           "non_finite_tensors", "model_from_checkpoint", "record_evaluation", "MODEL_PREFIX"]

MODEL_PREFIX = "model."  # ProteinLM holds the network as `self.model`
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle protocol 2+ stream


class CheckpointError(UserError):
    """A checkpoint that cannot be used: the message names the file and what is wrong with it."""


def read_checkpoint(checkpoint_path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict]:
    """(resolved path, checkpoint dict) of a checkpoint written by `protein_performer.train`.

    checkpoint_path: a .ckpt file, or a training run directory (its checkpoints/last.ckpt is used).
    Tensors are memory-mapped, not read, until used. Loading never executes code from the file
    (weights_only=True: Lightning checkpoints hold containers, numbers, strings and tensors only).
    Raises CheckpointError naming the file: missing, empty, truncated or damaged, not a PyTorch
    checkpoint, or not one written by protein_performer.train.
    """
    path = _resolve(Path(checkpoint_path))
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; the run that wrote it was probably "
                              "killed while saving: use another checkpoint of that run")
    with open(path, "rb") as handle:
        head = handle.read(4)
    zipped = head == _ZIP_MAGIC
    if not zipped and not head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (it starts with bytes {head!r}); pass a .ckpt file "
                              "written by protein_performer.train")
    if zipped and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: truncated checkpoint ({size:,} bytes, its end is missing); the copy or the "
                              "save was cut short: copy it again or use another checkpoint of that run")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "Unsupported global" in text:  # a class or function the safe loader will not import
            raise CheckpointError(f"{path}: holds Python objects other than tensors, numbers and plain containers, "
                                  "so it was not written by protein_performer.train; refusing to load it (loading "
                                  "it would run code stored in the file)") from None
        detail = next((line.strip() for line in text.splitlines() if line.strip().startswith("Unsupported")),
                      "unreadable pickle stream")
        raise CheckpointError(f"{path}: damaged checkpoint ({detail}); copy it again or use another checkpoint of "
                              "that run") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({first}); copy it again or use another "
                              "checkpoint of that run") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(f"{path}: a PyTorch file but not a training checkpoint (no state_dict); pass a .ckpt "
                              "written by protein_performer.train, not a bare state dict or tensor")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or "model_config" not in hparams:
        raise CheckpointError(f"{path}: no hyper_parameters['model_config']; it was not written by "
                              "protein_performer.train (ProteinLM)")
    return path, checkpoint


def model_config_of(path: Path, checkpoint: Mapping[str, Any]) -> PerformerConfig:
    """The PerformerConfig saved in a checkpoint (CheckpointError if this version cannot build it)."""
    try:
        return PerformerConfig.from_dict(checkpoint["hyper_parameters"]["model_config"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: written by an incompatible version of protein_performer (its model config "
                              f"does not fit this version: {error}); use the version it was trained with "
                              f"(saved: {checkpoint.get('pytorch-lightning_version', '?')} Lightning)") from None


def record_evaluation(path: str | Path, evaluation: Mapping[str, Any]) -> None:
    """Add checkpoint["evaluation"] (final metrics, split sizes: what a model card reports) to a checkpoint file.

    Rewritten under a temporary name and renamed, so the file is never half-written; everything else in
    it (weights, optimizer and loop state) is kept as it was, so it resumes exactly as before.
    """
    path = Path(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["evaluation"] = dict(evaluation)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `state` that hold NaN or infinite values."""
    return [name for name, tensor in state.items()
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def load_model(checkpoint_path: str | Path, map_location: str | torch.device = "cpu", *,
               allow_non_finite: bool = False) -> tuple[ProteinPerformer, Alphabet]:
    """(model in eval mode, its Alphabet) from a checkpoint written by `protein_performer.train`, or an exported model.

    checkpoint_path: a .ckpt file, a training run directory (its checkpoints/last.ckpt is used), or a
    model directory written by save_pretrained / protein-performer-export (config.json + model.safetensors).
    map_location: device for the weights, as in torch.load.
    allow_non_finite: load weights holding NaN or inf (a diverged run) instead of refusing them.
    The architecture comes from the checkpoint's hyper_parameters["model_config"] (a plain dict of
    PerformerConfig fields); the random-feature projections are buffers in the state dict, so FAVOR+
    outputs are those of the trained model, and eval mode never redraws them.
    Raises CheckpointError (see read_checkpoint), also for weights that do not fit the saved config.
    """
    from protein_performer.pretrained import is_pretrained_dir, load_pretrained

    if is_pretrained_dir(checkpoint_path):
        return load_pretrained(checkpoint_path, map_location, allow_non_finite=allow_non_finite)
    path, checkpoint = read_checkpoint(checkpoint_path, map_location=map_location)
    return model_from_checkpoint(path, checkpoint, map_location, allow_non_finite=allow_non_finite)


def model_from_checkpoint(path: Path, checkpoint: Mapping[str, Any], map_location: str | torch.device = "cpu", *,
                          allow_non_finite: bool = False) -> tuple[ProteinPerformer, Alphabet]:
    """load_model's second half: the network of a checkpoint already read by read_checkpoint."""
    hparams = checkpoint["hyper_parameters"]
    config = model_config_of(path, checkpoint)
    alphabet = Alphabet()
    saved_tokens = hparams.get("alphabet_tokens")
    if saved_tokens is not None and list(saved_tokens) != list(alphabet.tokens):
        raise CheckpointError(f"{path}: the model was trained with tokens {saved_tokens}, but this version's Alphabet "
                              f"is {alphabet.tokens}; its token ids would mean different residues. Use the package "
                              "version the checkpoint was trained with.")

    state = {key[len(MODEL_PREFIX):]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith(MODEL_PREFIX)}
    if not allow_non_finite:
        bad = non_finite_tensors(state)
        if bad:
            raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values (first: {bad[0]}); "
                                  "training had diverged when this was saved: use an earlier checkpoint")
    model = ProteinPerformer(config)
    check_state_fits(path, model.state_dict(), state, "the model config saved with it")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), alphabet


def check_state_fits(path: Path, expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor],
                      against: str) -> None:
    """CheckpointError summarising missing, unexpected and mis-shaped weights (instead of one line each)."""
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    shapes = [f"{key} {tuple(saved[key].shape)} vs {tuple(expected[key].shape)}" for key in expected
              if key in saved and tuple(saved[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]}, checkpoint vs model)" if shapes else ""]
        raise CheckpointError(f"{path}: its weights do not fit {against}: "
                              + "; ".join(part for part in parts if part))


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path} is a directory without checkpoints/last.ckpt or config.json; pass a .ckpt "
                              "file, a training run directory or an exported model directory")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; training runs save theirs under "
                              "<run dir>/checkpoints/ (last.ckpt and best-step*.ckpt)")
    return path


# ----------------------------------------------------------------------------------------------------
# Resuming: the interrupted run and the new one must be the same run.


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def setting_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: saved -> current' for every dotted key whose value differs (keys missing on one side included)."""
    old, new = _flatten(saved), _flatten(current)
    absent = "<absent>"
    return [f"{key}: {old.get(key, absent)!r} -> {new.get(key, absent)!r}" for key in sorted(old.keys() | new.keys())
            if not _same(old.get(key, absent), new.get(key, absent))]


# ProteinDataModule arguments that say where the data is and how fast it is read, not what is sampled:
# a resumed run may change them (another machine, another cache directory). num_workers is one, but the
# epoch's batch plan is cut by ranks x workers, so it is also part of the run's layout (run_layout).
DATA_LOCATION_KEYS = frozenset({"fasta", "clusters", "store", "cache_dir", "num_workers", "pin_memory", "compression",
                                "background_reader", "build_timeout", "prepare_data_per_node"})


def data_sampling_settings(datamodule_hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The data module's arguments that decide which batches a run sees (all but DATA_LOCATION_KEYS)."""
    return {key: OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
            for key, value in datamodule_hparams.items() if key not in DATA_LOCATION_KEYS and not key.startswith("_")}


def run_layout(world_size: int, workers: int) -> dict[str, int]:
    """How a run's data is divided (run_settings["layout"]): the epoch's batch plan depends on both."""
    return {"world_size": int(world_size), "workers": int(workers)}


def _describe_layout(layout: Mapping[str, Any]) -> str:
    return f"{layout.get('world_size')} rank(s) x {layout.get('workers')} data loader worker(s) per rank"


def saved_run_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint says about its run: `run_settings` (saved by train since this version), else the
    parts of hyper_parameters that say the same (model config, objective, seed, data module arguments)."""
    if isinstance(checkpoint.get("run_settings"), Mapping):
        return dict(checkpoint["run_settings"])
    hparams = checkpoint["hyper_parameters"]
    settings = {"model": dict(hparams["model_config"]), "objective": hparams.get("objective"),
                "seed": hparams.get("seed")}
    if isinstance(checkpoint.get("datamodule_hyper_parameters"), Mapping):
        settings["data"] = data_sampling_settings(checkpoint["datamodule_hyper_parameters"])
    return settings


def check_resume(path: Path, checkpoint: Mapping[str, Any], run_settings: Mapping[str, Any], *,
                 strict: bool = True) -> list[str]:
    """Refuse to resume from a checkpoint of another run; return the differences (empty if none).

    run_settings: {"model": PerformerConfig dict, "objective": ..., "seed": ..., "data": sampling settings,
        "layout": run_layout(...)}; a different layout (world size, workers) is refused in its own message.
    Only the keys the checkpoint knows are compared (a checkpoint from before `run_settings` has model,
    objective and seed only). strict=False (resume_check=false) lets a different run continue from the
    checkpoint as long as the weights fit the new model.
    """
    saved = saved_run_settings(checkpoint)
    if isinstance(saved.get("model"), Mapping):
        # Fields added since the checkpoint was written take the values its version had (from_dict knows them).
        try:
            saved["model"] = PerformerConfig.from_dict(dict(saved["model"])).to_dict()
        except (TypeError, ValueError):
            pass  # not a valid config today: compared as saved, so every difference is listed
    saved_layout = saved.pop("layout", None)
    current = {key: value for key, value in run_settings.items() if key in saved}
    if isinstance(saved.get("data"), Mapping) and isinstance(current.get("data"), Mapping):
        # A data argument the checkpoint does not name did not exist in the version that wrote it.
        current["data"] = {key: value for key, value in current["data"].items() if key in saved["data"]}
    differences = setting_differences(saved, current)
    if differences and strict:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise CheckpointError(f"ckpt_path={path} was trained with other settings, so resuming would not continue that "
                              f"run: {shown} (checkpoint -> this run). Resume with the checkpoint's settings, or pass "
                              "resume_check=false to continue from its weights anyway")
    layout = run_settings.get("layout")
    if isinstance(saved_layout, Mapping) and isinstance(layout, Mapping) and setting_differences(saved_layout, layout):
        if strict:
            raise CheckpointError(
                f"ckpt_path={path} was saved by a run of {_describe_layout(saved_layout)}; this run has "
                f"{_describe_layout(layout)}. The epoch's batches are divided by both, so the resumed run would skip "
                "the wrong batches (data dropped or repeated). Resume with the same trainer.devices x trainer.num_nodes "
                "and data.num_workers, or pass resume_check=false to continue approximately")
        differences += [f"layout.{d}" for d in setting_differences(saved_layout, layout)]
    return differences


def check_weights_fit(path: Path, checkpoint: Mapping[str, Any], module_state: Mapping[str, torch.Tensor],
                      differences: list[str]) -> None:
    """CheckpointError if the checkpoint's weights cannot be loaded into this run's module."""
    against = "this run's model" + (f" ({'; '.join(d for d in differences if d.startswith('model.'))})"
                                    if any(d.startswith("model.") for d in differences) else "")
    check_state_fits(path, module_state, checkpoint["state_dict"], against)
