"""One checkpoint reader: every damaged or foreign file is named with what is wrong; resumes are checked."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protein_performer import load_model
from protein_performer.checkpoint import CheckpointError, check_resume, read_checkpoint, saved_run_settings
from protein_performer.data import Alphabet
from protein_performer.errors import UserError
from protein_performer.model import PerformerConfig
from protein_performer.training.module import ProteinLM


def tiny_config(**changes) -> PerformerConfig:
    alphabet = Alphabet()
    values = dict(vocab_size=len(alphabet), pad_idx=alphabet.pad_idx, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                  attention="favor", nb_features=16)
    return PerformerConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as training writes it (weights under `model.`, the config in hyper_parameters)."""
    module = ProteinLM(tiny_config().to_dict(), alphabet_tokens=Alphabet().tokens)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 7}, path)
    return path


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


DAMAGED = {
    "empty": (lambda ckpt: b"", r"empty\.ckpt: empty file \(0 bytes\), not a checkpoint"),
    "truncated": (lambda ckpt: ckpt.read_bytes()[:4000], r"truncated\.ckpt: truncated checkpoint \(4,000 bytes"),
    "random": (lambda ckpt: b"\x13\x37" + bytes(range(256)) * 8, r"random\.ckpt: not a PyTorch checkpoint"),
    "text": (lambda ckpt: b"step,loss\n1,3.2\n", r"text\.ckpt: not a PyTorch checkpoint"),
    "damaged-pickle": (lambda ckpt: b"\x80\x04\x95garbage", r"damaged-pickle\.ckpt: damaged"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_checkpoint_is_named_with_what_is_wrong(case, checkpoint, tmp_path):
    content, message = DAMAGED[case]
    path = write(tmp_path / f"{case}.ckpt", content(checkpoint))
    for load in (read_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=message) as info:
            load(path)
        assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)
        assert isinstance(info.value, UserError)  # the commands print it as one line, exit status 2


def test_foreign_files_are_refused_without_running_their_code(tmp_path):
    torch.save({"state_dict": {}, "hyper_parameters": {"model_config": {}}, "x": Path("x")}, tmp_path / "objects.ckpt")
    with pytest.raises(CheckpointError, match=r"objects\.ckpt: holds Python objects.*refusing") as info:
        read_checkpoint(tmp_path / "objects.ckpt")
    assert "weights_only=False" not in str(info.value)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"bare\.pt: a PyTorch file but not a training checkpoint"):
        read_checkpoint(tmp_path / "bare.pt")
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"other\.ckpt: no hyper_parameters\['model_config'\]"):
        read_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"missing\.ckpt does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"directory without checkpoints/last\.ckpt"):
        read_checkpoint(tmp_path)


def test_incompatible_version_and_unfitting_weights_are_explained(checkpoint, tmp_path):
    saved = torch.load(checkpoint, weights_only=True)
    newer = {**saved, "hyper_parameters": {**saved["hyper_parameters"],
                                           "model_config": {**saved["hyper_parameters"]["model_config"], "moe": 8}}}
    torch.save(newer, tmp_path / "newer.ckpt")
    with pytest.raises(CheckpointError, match=r"newer\.ckpt: written by an incompatible version.*moe"):
        load_model(tmp_path / "newer.ckpt")
    wider = ProteinLM(tiny_config(d_model=64, d_ff=128).to_dict())
    torch.save({**saved, "state_dict": wider.state_dict()}, tmp_path / "wider.ckpt")
    with pytest.raises(CheckpointError, match=r"wider\.ckpt: its weights do not fit the model config saved with it: "
                                              r"\d+ of another shape \(e\.g\. token_embedding\.weight \(30, 64\) vs "
                                              r"\(30, 32\), checkpoint vs model\)"):
        load_model(tmp_path / "wider.ckpt")


def test_non_finite_weights_are_refused_unless_allowed(checkpoint, tmp_path):
    saved = torch.load(checkpoint, weights_only=True)
    name = next(key for key in saved["state_dict"] if key.startswith("model.blocks.1.") and "norm" in key)
    saved["state_dict"][name].view(-1)[0] = float("inf")
    torch.save(saved, tmp_path / "diverged.ckpt")
    message = rf"diverged\.ckpt: 1 weight tensor\(s\) hold NaN or infinite values \(first: {name[6:]}\)"
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "diverged.ckpt")
    model, _ = load_model(tmp_path / "diverged.ckpt", allow_non_finite=True)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_is_refused_when_the_run_differs(checkpoint):
    path, saved = read_checkpoint(checkpoint)
    same = {"model": tiny_config().to_dict(), "objective": "mlm", "seed": 0, "data": {"max_length": 64}}
    assert check_resume(path, saved, same) == []  # no run_settings: model, objective and seed are compared
    other = {**same, "model": tiny_config(attention="favor_relu").to_dict(), "objective": "clm"}
    with pytest.raises(CheckpointError, match=r"model\.attention: 'favor' -> 'favor_relu'; objective: 'mlm' -> 'clm'"
                                              r" \(checkpoint -> this run\).*resume_check=false"):
        check_resume(path, saved, other)
    assert check_resume(path, saved, other, strict=False) == ["model.attention: 'favor' -> 'favor_relu'",
                                                             "objective: 'mlm' -> 'clm'"]
    with_settings = {**saved, "run_settings": same}
    assert saved_run_settings(with_settings) == same
    with pytest.raises(CheckpointError, match=r"data\.max_length: 64 -> 128"):
        check_resume(path, with_settings, {**same, "data": {"max_length": 128}})


def test_resume_from_an_older_version_ignores_settings_it_did_not_have(checkpoint):
    path, saved = read_checkpoint(checkpoint)
    run = {"model": tiny_config().to_dict(), "objective": "mlm", "seed": 0,
           "data": {"max_length": 64, "mask_probability": 0.15}}
    older_model = {key: value for key, value in run["model"].items() if not key.startswith("rpe_")}
    older = {**saved, "run_settings": {**run, "model": older_model, "data": {"max_length": 64}}}
    assert check_resume(path, older, run) == []  # fields added since take the values the old version had
    with pytest.raises(CheckpointError, match=r"data\.max_length: 64 -> 512"):
        check_resume(path, older, {**run, "data": {"max_length": 512, "mask_probability": 0.15}})
