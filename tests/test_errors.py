"""Every command meets expected problems the same way: one line naming the file or key, exit status 2, no traceback.

Each test runs its command's cases as real processes, all at once (a command's start-up, mostly
importing torch and Lightning, dominates; run side by side they cost one start-up of wall time).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from protein_performer.checkpoint import non_finite_tensors

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "uniprot_sample.fasta"
TINY_TRAIN = ["model=tiny", "trainer=cpu", "logger=none", "data.max_length=64", "data.tokens_per_batch=512",
              "callbacks.progress_bar.refresh_rate=0", "+trainer.enable_model_summary=false",
              "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=2", "test=false"]


@dataclass
class Case:
    name: str
    args: list[str]
    message: str  # regular expression the error line must match


def run_cases(command: str, cases: list[Case], tmp_path: Path, status: int = 2) -> dict[str, str]:
    """Run every case at once; assert status, one error line matching its message, no traceback."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    processes = {}
    for case in cases:
        run_dir = tmp_path / "runs" / case.name
        processes[case.name] = subprocess.Popen(
            [sys.executable, "-m", f"protein_performer.{command}", *case.args, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failures, errors = [], {}
    for case in cases:
        _, stderr = processes[case.name].communicate(timeout=300)
        code = processes[case.name].returncode
        error_lines = [line for line in stderr.splitlines() if line.startswith(f"{command}: error: ")]
        problem = ("a traceback" if "Traceback" in stderr else
                   f"exit status {code}, not {status}" if code != status else
                   f"{len(error_lines)} error lines, not 1" if len(error_lines) != 1 else
                   "" if re.search(case.message, error_lines[0]) else f"no match for {case.message!r}")
        if problem:
            failures.append(f"{case.name}: {problem}\n{stderr[-2500:]}")
        errors[case.name] = error_lines[0] if error_lines else ""
    assert not failures, "\n\n".join(failures)
    return errors


def test_preprocess_errors_are_one_line_with_status_2(tmp_path):
    fasta = tmp_path / "proteins.fasta"
    fasta.write_bytes(SAMPLE.read_bytes()[:20_000])
    (tmp_path / "headers.fasta").write_text(">a\n>b\n")
    (tmp_path / "a-file").write_text("")
    cases = [
        Case("output-is-input", [f"input={fasta}", f"output={fasta}", "overwrite=true"],
             r"proteins\.fasta: this output is also an input"),
        Case("output-is-input-by-link", [f"input={fasta}", "output=link.h5", "overwrite=true"],
             r"link\.h5: this output is also an input"),
        Case("no-hdf5-suffix", [f"input={fasta}", "output=proteins.fa"], r"proteins\.fa: .*any_suffix=true"),
        Case("output-under-a-file", [f"input={fasta}", "output=a-file/out.h5"], r"a-file: is a file, not a directory"),
        Case("headers-only", ["input=headers.fasta", "output=out.h5"],
             r"headers\.fasta: no records with a non-empty sequence"),
        Case("unknown-compression", [f"input={fasta}", "output=out.h5", "compression=zstd"], r"compression"),
    ]
    (tmp_path / "link.h5").symlink_to(fasta)
    before = fasta.read_bytes()
    run_cases("preprocess", cases, tmp_path)
    assert fasta.read_bytes() == before, "the input FASTA must be untouched"
    assert not list(tmp_path.glob("*.h5.tmp")) and not (tmp_path / "out.h5").exists()


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as train writes it (weights under `model.`, hparams), for model=tiny, favor, mlm."""
    from protein_performer.data import Alphabet
    from protein_performer.model import config_from_hydra
    from protein_performer.train import compose_config
    from protein_performer.training.module import ProteinLM

    alphabet = Alphabet()
    cfg = compose_config(TINY_TRAIN)
    config = config_from_hydra(cfg.model, cfg.attention, vocab_size=len(alphabet), pad_idx=alphabet.pad_idx,
                               causal=False)
    module = ProteinLM(config.to_dict(), "mlm", alphabet_tokens=alphabet.tokens)
    path = tmp_path_factory.mktemp("trained") / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def test_train_errors_are_one_line_with_status_2(tmp_path, trained_checkpoint):
    (tmp_path / "headers.fasta").write_text(">a\n>b\n")
    data = [f"data.fasta={SAMPLE}", f"data.cache_dir={tmp_path / 'cache'}"]
    cases = [
        Case("headers-only-fasta", [*TINY_TRAIN, "data.fasta=headers.fasta", f"data.cache_dir={tmp_path / 'c2'}"],
             r"headers\.fasta: no records with a non-empty sequence"),
        Case("heads-do-not-divide-d-model", [*TINY_TRAIN, *data, "model.n_heads=3"],
             r"config: .*d_model=32 is not divisible by n_heads=3"),
        Case("resume-with-other-attention", [*TINY_TRAIN, *data, f"ckpt_path={trained_checkpoint}",
                                             "attention=favor_relu", "objective=clm"],
             r"last\.ckpt was trained with other settings.*model\.attention: 'favor' -> 'favor_relu'.*"
             r"objective: 'mlm' -> 'clm'.*resume_check=false"),
        Case("diverging", [*TINY_TRAIN, *data, "optim.lr=1e3", "optim.warmup_steps=0", "trainer.max_steps=20",
                           "trainer.val_check_interval=1"],
             r"training diverged at step (\d+): .*gradient norm (nan|inf).*last checkpoint \(.*last\.ckpt\)"),
    ]
    errors = run_cases("train", cases, tmp_path)
    # The divergence stopped before the bad update and saved nothing after it: last.ckpt is finite and older.
    step = int(re.search(r"diverged at step (\d+)", errors["diverging"])[1])
    last = torch.load(tmp_path / "runs" / "diverging" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] < step
    assert not non_finite_tensors(last["state_dict"])


def test_embed_errors_are_one_line_with_status_2(tmp_path, trained_checkpoint):
    fasta = tmp_path / "proteins.fasta"
    fasta.write_bytes(SAMPLE.read_bytes()[:5_000])
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["state_dict"]["model.token_embedding.weight"][3, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {}, "extra": Path("x")}, tmp_path / "pickled.ckpt")
    out = ["output=out.h5"]
    cases = [
        Case("non-finite-weights", ["checkpoint=nan.ckpt", f"input={fasta}", *out],
             r"nan\.ckpt: \d weight tensor\(s\) hold NaN or infinite values \(first: token_embedding\.weight\)"),
        Case("arbitrary-objects", ["checkpoint=pickled.ckpt", f"input={fasta}", *out],
             r"pickled\.ckpt: holds Python objects .* refusing to load it"),
        Case("missing-input", [f"checkpoint={trained_checkpoint}", "input=nope.fasta", *out],
             r"nope\.fasta: no such file"),
        Case("output-is-input", [f"checkpoint={trained_checkpoint}", f"input={fasta}", f"output={fasta}",
                                 "overwrite=true"], r"proteins\.fasta is also an input"),
    ]
    errors = run_cases("embed", cases, tmp_path)
    assert all("weights_only=False" not in line for line in errors.values())
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.partial").exists()


def test_export_errors_are_one_line_with_status_2(tmp_path, trained_checkpoint):
    (tmp_path / "taken").mkdir()
    (tmp_path / "a-file").write_text("")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cases = [
        Case("no-keys", [], r"checkpoint and output must be given"),
        Case("missing-checkpoint", ["checkpoint=nope.ckpt", "output=m"], r"checkpoint nope\.ckpt does not exist"),
        Case("empty-checkpoint", ["checkpoint=empty.ckpt", "output=m"], r"empty\.ckpt: empty file"),
        Case("output-exists", [f"checkpoint={trained_checkpoint}", "output=taken"], r"taken: already exists"),
        Case("output-under-a-file", [f"checkpoint={trained_checkpoint}", "output=a-file/m"],
             r"a-file: is a file, not a directory"),
    ]
    run_cases("export", cases, tmp_path)
    assert not (tmp_path / "m").exists() and not list((tmp_path / "taken").iterdir())
