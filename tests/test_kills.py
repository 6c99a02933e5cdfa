"""A killed command leaves no process and no temporary file behind (SIGTERM now, SIGKILL by the next run).

Real commands in real processes: preprocess, and train building its data.fasta cache, are killed while
the FASTA reader child is parsing a generated FASTA of a few tens of MB (big enough to catch the build
mid-way; polling, not sleeps, finds that moment). Linux only: processes are found through /proc.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch

from protein_performer.train import compose_config

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "uniprot_sample.fasta"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

RECORDS, LENGTH = 100_000, 400  # 41 MB: about a second of building on the development machine


@pytest.fixture(scope="module")
def big_fasta(tmp_path_factory) -> Path:
    """Random residues in one-line records (generated: nothing this size belongs in the repository)."""
    rng = np.random.default_rng(0)
    residues = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)[rng.integers(0, 20, (RECORDS, LENGTH))]
    rows = np.full((RECORDS, LENGTH + 1), ord("\n"), dtype=np.uint8)
    rows[:, :LENGTH] = residues
    body = rows.tobytes()
    path = tmp_path_factory.mktemp("big") / "big.fasta"
    with open(path, "wb") as file:
        file.write(b"".join(b">P%07d\n%s" % (i, body[i * (LENGTH + 1):(i + 1) * (LENGTH + 1)])
                            for i in range(RECORDS)))
    return path


def children(pid: int) -> set[int]:
    """Every live descendant of `pid`."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo.extend(kids - found)
            found |= kids
    return {kid for kid in found if alive(kid)}


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has ended: only its exit status waits to be collected)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def start_and_catch_mid_build(command: list[str], temporaries: Path, cwd: Path,
                              at_least: int = 1) -> tuple[subprocess.Popen, set[int]]:
    """Start `command`; return it once its temporary store exists and `at_least` children run."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    kids: set[int] = set()

    def building() -> bool:
        nonlocal kids
        if process.poll() is not None:
            raise AssertionError(f"finished before it could be killed mid-build:\n{process.communicate()[1][-3000:]}")
        kids = children(process.pid)
        return len(kids) >= at_least and any(temporaries.glob("*.tmp"))

    try:
        wait_until(building, 120, "the build to start")
    except BaseException:
        process.kill()
        process.communicate()
        raise
    return process, kids


def kill_and_check(process: subprocess.Popen, kids: set[int], signum: int) -> str:
    """Send `signum`; assert the command ends and no child outlives it; its stderr."""
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    wait_until(lambda: not any(alive(kid) for kid in kids), 10, f"children {sorted(kids)} to end")
    if signum == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        assert ": error: interrupted by SIGTERM" in stderr.strip().splitlines()[-1], stderr[-3000:]
    else:
        assert process.returncode == -signum
    return stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_preprocess_leaves_no_process_and_no_temporary(big_fasta, tmp_path, signum):
    out = tmp_path / "out"
    command = ["-m", "protein_performer.preprocess", f"input={big_fasta}", f"output={out / 'store.h5'}",
               f"hydra.run.dir={tmp_path / 'run'}", "progress=false", "workers=2", "block_bytes=1048576"]
    process, kids = start_and_catch_mid_build(command, out, tmp_path, at_least=2)  # both workers run
    kill_and_check(process, kids, signum)
    assert not (out / "store.h5").exists()
    if signum == signal.SIGTERM:
        assert not list(out.glob("*.tmp")), "SIGTERM must remove the temporary store at once"
    else:
        assert list(out.glob("*.tmp")), "SIGKILL leaves a temporary (nothing runs); the next run removes it"
    # The next run in that directory (a small input, another store) removes the stale temporary.
    again = subprocess.run([sys.executable, "-m", "protein_performer.preprocess", f"input={SAMPLE}",
                            f"output={out / 'other.h5'}", f"hydra.run.dir={tmp_path / 'run2'}", "progress=false"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["other.h5"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_train_building_its_cache_leaves_no_process_and_no_temporary(big_fasta, tmp_path, signum):
    cache = tmp_path / "cache"
    command = ["-m", "protein_performer.train", "model=tiny", "trainer=cpu", "logger=none", f"data.fasta={big_fasta}",
               f"data.cache_dir={cache}", "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"]
    process, kids = start_and_catch_mid_build(command, cache, tmp_path)
    stderr = kill_and_check(process, kids, signum)
    if signum == signal.SIGTERM:
        assert "ckpt_path=" in stderr.strip().splitlines()[-1]  # says how to resume
        assert not list(cache.glob("*.tmp"))
    # The next run's cache build (its data module's prepare_data, as train calls it) cleans up.
    module = hydra.utils.instantiate(compose_config([f"data.fasta={big_fasta}", f"data.cache_dir={cache}"]).data)
    module.prepare_data()
    assert [p.name for p in cache.iterdir()] == [module.cache_path().name]


def test_sigterm_ends_embed_with_one_line_keeping_its_resumable_partial_file(big_fasta, tmp_path):
    """embed's <output>.partial is not a temporary but its resume point: SIGTERM keeps it, says so, exits 143."""
    from protein_performer.data import Alphabet
    from protein_performer.model import PerformerConfig
    from protein_performer.training.module import ProteinLM

    alphabet = Alphabet()
    config = PerformerConfig(vocab_size=len(alphabet), pad_idx=alphabet.pad_idx, d_model=32, n_layers=2, n_heads=2,
                             d_ff=64, attention="favor", nb_features=16)
    module = ProteinLM(config.to_dict(), alphabet_tokens=alphabet.tokens)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "m.ckpt")
    fasta = tmp_path / "some.fasta"
    with open(big_fasta, "rb") as source:
        fasta.write_bytes(source.read(2_000 * (LENGTH + 10)))  # 2,000 proteins: tens of seconds to embed
    command = ["-m", "protein_performer.embed", f"checkpoint={tmp_path / 'm.ckpt'}", f"input={fasta}",
               f"output={tmp_path / 'out.h5'}", f"hydra.run.dir={tmp_path / 'run'}", "progress=false"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, *command], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "out.h5.partial"
    try:
        wait_until(lambda: partial.exists() or process.poll() is not None, 120, "the partial file")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("embed: error: interrupted by SIGTERM") and "out.h5.partial" in last
    assert partial.exists() and not (tmp_path / "out.h5").exists()
