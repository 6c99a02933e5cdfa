"""Models people can share: a directory (or Hugging Face Hub repository) that `from_pretrained` loads.

    model.save_pretrained("my-model")                        # config.json, model.safetensors, README.md
    model = ProteinPerformer.from_pretrained("my-model")     # or "<user>/<repo>" on the Hub
    model.push_to_hub("<user>/<repo>")                       # needs a Hub login and the network

The directory holds:
- config.json: the PerformerConfig's fields, plus "config_version" (CONFIG_VERSION) and "alphabet" (the
  token list the ids mean). A config without a version (or with fields added since) loads as a checkpoint's
  saved config does, through PerformerConfig.from_dict and its legacy defaults.
- model.safetensors: every weight and persistent buffer, the FAVOR+ random-feature projections as last
  trained included; a tied LM head is stored once. Loading reads tensors only: nothing is unpickled.
- README.md: a model card (protein_performer.model_card; `protein-performer-export` writes the full one).

Every problem with a directory is a CheckpointError naming the file (one line, exit 2 in the commands).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin, ModelCard


__all__ = ["CONFIG_FILE", "CONFIG_VERSION", "WEIGHTS_FILE", "PretrainedMixin", "is_pretrained_dir", "load_pretrained"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Bump when config.json's meaning changes (not when PerformerConfig gains a field with a default:
# from_dict fills those). Version 1: PerformerConfig fields + "config_version" + "alphabet".
CONFIG_VERSION = 1
_NOT_CONFIG_KEYS = ("config_version", "alphabet")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # <user>/<name>: a Hub repository


def is_pretrained_dir(path: str | Path) -> bool:
    """True when `path` is a directory written by save_pretrained (it has a config.json)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


class PretrainedMixin(ModelHubMixin):
    """save_pretrained / from_pretrained / push_to_hub for ProteinPerformer (safetensors only)."""

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        from protein_performer.data import Alphabet

        config = {"config_version": CONFIG_VERSION, **self.config.to_dict(), "alphabet": list(Alphabet().tokens)}
        _write_atomically(save_directory / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
        _write_atomically(save_directory / WEIGHTS_FILE,
                          lambda tmp: save_model(self, str(tmp), metadata={"format": "pt"}))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The README.md of a saved model; `training` (model_card.training_summary) adds how it was trained."""
        from protein_performer.model_card import render_model_card

        return ModelCard(render_model_card(self, kwargs.get("training"), name=kwargs.get("name", "this model")))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, map_location: str | torch.device = "cpu",
                        allow_non_finite: bool = False, **hub_kwargs: Any):
        """A model in eval mode from a save_pretrained directory or a Hub repository id.

        hub_kwargs: revision, cache_dir, token, local_files_only, ... (huggingface_hub.snapshot_download),
        used only for a repository id. Raises CheckpointError naming the file that is missing or damaged.
        """
        return load_pretrained(pretrained_model_name_or_path, map_location, allow_non_finite=allow_non_finite,
                               model_class=cls, **hub_kwargs)[0]


def load_pretrained(source: str | Path, map_location: str | torch.device = "cpu", *, allow_non_finite: bool = False,
                    model_class: type | None = None, **hub_kwargs: Any):
    """(model in eval mode, Alphabet) from a save_pretrained directory or a Hub repository id."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from protein_performer.checkpoint import CheckpointError, check_state_fits, non_finite_tensors
    from protein_performer.config import PerformerConfig
    from protein_performer.data import Alphabet
    from protein_performer.model import ProteinPerformer

    directory = _local_directory(source, hub_kwargs)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                                  "(written by save_pretrained or protein-performer-export)")
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: damaged, not JSON ({error}); copy the model directory again") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{config_path}: not a model config (a JSON {type(values).__name__}, not an object)")
    version = values.get("config_version", 0)  # 0: written before config.json carried a version
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise CheckpointError(f"{config_path}: config_version {version!r} is newer than this version of "
                              f"protein_performer reads ({CONFIG_VERSION}); upgrade protein-performer")
    alphabet = Alphabet()
    saved_tokens = values.get("alphabet")
    if saved_tokens is not None and list(saved_tokens) != list(alphabet.tokens):
        raise CheckpointError(f"{config_path}: the model was trained with tokens {saved_tokens}, but this version's "
                              f"Alphabet is {alphabet.tokens}; its token ids would mean different residues")
    try:
        config = PerformerConfig.from_dict({k: v for k, v in values.items() if k not in _NOT_CONFIG_KEYS})
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{config_path}: not a config this version can build ({error})") from None

    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights_path}: damaged or truncated safetensors file ({error}); copy the model "
                              "directory again") from None
    if not allow_non_finite:
        bad = non_finite_tensors(state)
        if bad:
            raise CheckpointError(f"{weights_path}: {len(bad)} weight tensor(s) hold NaN or infinite values "
                                  f"(first: {bad[0]})")
    model = (model_class or ProteinPerformer)(config)
    expected = model.state_dict()
    _fill_tied(state, expected)
    check_state_fits(weights_path, expected, state, f"the config in {config_path}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), alphabet


def _fill_tied(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Add the names safetensors stored once (a tied LM head and its embedding share one tensor)."""
    by_storage: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    for names in by_storage.values():
        present = [name for name in names if name in state]
        if present and len(names) > 1:
            for name in names:
                state.setdefault(name, state[present[0]])


def _local_directory(source: str | Path, hub_kwargs: dict[str, Any]) -> Path:
    """`source` itself when it is a directory, else a Hub repository id downloaded (or found in the cache)."""
    from protein_performer.checkpoint import CheckpointError

    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or not _HUB_ID.fullmatch(str(source)):
        raise CheckpointError(f"{source}: not a model directory (no such directory) nor a Hub repository id "
                              "(<user>/<name>)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=str(source), allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "README.md"],
                                      **hub_kwargs))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{source}: no such local directory, and the Hub repository could not be "
                              f"fetched ({first})") from None


def _write_atomically(path: Path, write) -> None:
    """write(tmp) to a temporary name beside `path`, then rename: no half-written file under its real name."""
    tmp = path.with_name(f".{path.name}.tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~umask)  # an ordinary file, whatever mode the writer gave its temporary
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
