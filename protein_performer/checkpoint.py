"""Load a trained ProteinPerformer from a Lightning checkpoint, for inference, without Hydra or Lightning."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from protein_performer.data import Alphabet
from protein_performer.model import PerformerConfig, ProteinPerformer

MODEL_PREFIX = "model."  # ProteinLM holds the network as `self.model`


def load_model(checkpoint_path: str | Path, map_location: str | torch.device = "cpu"
               ) -> tuple[ProteinPerformer, Alphabet]:
    """(model in eval mode, its Alphabet) from a checkpoint written by `protein_performer.train`.

    checkpoint_path: a .ckpt file, or a training run directory (its checkpoints/last.ckpt is used).
    map_location: device for the weights, as in torch.load.
    The architecture comes from the checkpoint's hyper_parameters["model_config"] (a plain dict of
    PerformerConfig fields); the random-feature projections are buffers in the state dict, so FAVOR+
    outputs are those of the trained model, and eval mode never redraws them.
    """
    path = _resolve(Path(checkpoint_path))
    # Lightning checkpoints hold plain containers, numbers, strings and tensors only; weights_only=True
    # refuses anything else, so loading a checkpoint cannot execute code.
    checkpoint: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    if "model_config" not in hparams:
        raise ValueError(f"{path}: no hyper_parameters['model_config']; load_model reads checkpoints written by "
                         "protein_performer.train (ProteinLM), not bare state dicts")
    config = PerformerConfig.from_dict(hparams["model_config"])
    alphabet = Alphabet()
    saved_tokens = hparams.get("alphabet_tokens")
    if saved_tokens is not None and list(saved_tokens) != list(alphabet.tokens):
        raise ValueError(f"{path}: the model was trained with tokens {saved_tokens}, but this version's Alphabet is "
                         f"{alphabet.tokens}; its token ids would mean different residues. Use the package "
                         "version the checkpoint was trained with.")

    state = {key[len(MODEL_PREFIX):]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith(MODEL_PREFIX)}
    model = ProteinPerformer(config)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), alphabet


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{path} is a directory without checkpoints/last.ckpt; pass a .ckpt file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; training runs save theirs under "
                                "<run dir>/checkpoints/ (last.ckpt and best-step*.ckpt)")
    return path
