"""python -m protein_performer.embed: overrides, the file it writes, one-line errors with status 2."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose as compose_config
from hydra import initialize_config_dir
from omegaconf import DictConfig

import protein_performer.embed as embed_module
from protein_performer.embed import load_embeddings, run_cli
from protein_performer.resources import conf_dir

CONF_DIR = conf_dir()


def run_module(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protein_performer.embed", *overrides,
                           f"hydra.run.dir={cwd / 'hydra'}"],
                          capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose_config("embed", overrides=list(overrides))


def test_command_line_writes_the_file(checkpoint, fasta, tmp_path):
    result = run_module(f"checkpoint={checkpoint}", f"input={fasta}", f"output={tmp_path / 'cli.h5'}",
                        "layers=[0,-1]", "include=[mean,cls]", "max_tokens=3000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "res/s" in result.stderr and "seq/s" in result.stderr
    loaded = load_embeddings(tmp_path / "cli.h5")
    assert len(loaded) == 25 and loaded.layers == (0, 2)
    assert len(loaded.cls) == 2 and len(loaded.per_residue) == 0
    assert loaded.attrs["checkpoint"] == str(checkpoint.resolve())


def test_entry_point_exits_with_the_error_status(checkpoint, fasta, tmp_path, capsys):
    """@hydra.main lets SystemExit through, so the status run_cli returns is the process's exit status."""
    cfg = compose(f"checkpoint={tmp_path / 'missing.ckpt'}", f"input={fasta}", f"output={tmp_path / 'x.h5'}")
    with pytest.raises(SystemExit) as exit_info:
        embed_module.main.__wrapped__(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.ckpt" in err and "Traceback" not in err
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["input={fasta}", "output={out}"], r"checkpoint=\.\.\. is required"),
        (["checkpoint={ckpt}", "input={fasta}", "output={fasta}"], "already exists"),
        (["checkpoint={ckpt}", "input={tmp}/nope.fasta", "output={out}"], "nope.fasta: no such file"),
        (["checkpoint={ckpt}", "input={fasta}", "output={out}", "layers=7"], r"layers \[7\] out of range"),
        (["checkpoint={ckpt}", "input={fasta}", "output={fasta}/out.h5"], "is a file, not a directory"),
    ],
    ids=["missing-key", "output-exists", "missing-input", "bad-layer", "output-under-a-file"],
)
def test_command_line_errors_are_one_line_with_status_2(checkpoint, fasta, tmp_path, capsys, overrides, message):
    values = {"fasta": fasta, "out": tmp_path / "out.h5", "ckpt": checkpoint, "tmp": tmp_path}
    cfg = compose(*(override.format(**values) for override in overrides))
    assert run_cli(cfg) == 2
    err = capsys.readouterr().err
    assert err.startswith("embed: error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.partial").exists()


def test_command_line_takes_scalars_for_one_element_lists(checkpoint, fasta, tmp_path):
    cfg = compose(f"checkpoint={checkpoint}", f"input={fasta}", f"output={tmp_path / 'one.h5'}", "layers=0",
                  "include=cls", "progress=false")
    assert run_cli(cfg) == 0
    loaded = load_embeddings(tmp_path / "one.h5")
    assert loaded.layers == (0,) and len(loaded.cls) == 1 and len(loaded.mean) == 0


def test_bf16_on_a_cpu_without_it_warns_and_names_the_fix(checkpoint, fasta, tmp_path, capsys, monkeypatch):
    from protein_performer import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    cfg = compose(f"checkpoint={checkpoint}", f"input={fasta}", f"output={tmp_path / 'bf16.h5'}", "precision=bf16",
                  "device=cpu", "progress=false")
    assert embed_module.run_cli(cfg) == 0
    assert "embed: warning: precision=bf16 on a CPU without bf16 arithmetic" in capsys.readouterr().err
    assert "Use precision=32 on this machine" in runtime.slow_bf16_warning("bf16", "cpu", "precision", "32")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert embed_module.run_cli(compose(f"checkpoint={checkpoint}", f"input={fasta}", "precision=bf16", "device=cpu",
                                        f"output={tmp_path / 'native.h5'}", "progress=false")) == 0
    assert "warning" not in capsys.readouterr().err
