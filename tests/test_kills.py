"""A killed command leaves no process and no temporary file behind (SIGTERM now, SIGKILL by the next run).

Real commands in real processes: preprocess, and train building its data.fasta cache, are killed while
the FASTA reader child is parsing a generated FASTA of a few tens of MB (big enough to catch the build
mid-way; polling, not sleeps, finds that moment). Linux only: processes are found through /proc.
"""
from __future__ import annotations

import json
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



MOMENTS = 20  # SIGTERMs at random moments, per command
AT_ONCE = 4  # commands running at the same time (2 cores: more only slows each one down)

# Imports the commands once, then forks each run from that state: a run is the real command in its own
# process (its own signal handlers, children and exit status), without paying ~6 s of CPU for imports
# twenty times. Protocol on stdin/stdout: a JSON [module, argv, stdout file, stderr file] -> the run's
# pid; "wait <pid>" -> its exit status (negative: killed by that signal, as subprocess reports it).
FORK_SERVER = r"""
import importlib, json, os, sys, traceback
modules = {name: importlib.import_module(name) for name in sys.argv[1:]}
print("ready", flush=True)
for line in sys.stdin:
    if line.startswith("wait "):
        _, status = os.waitpid(int(line.split()[1]), 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
        continue
    module, argv, out, err = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND), 1)  # out may be err: as a terminal shows them
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
        sys.argv = [module, *argv]
        code = 0
        try:
            modules[module].main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
"""


class ForkServer:
    def __init__(self, *modules: str) -> None:
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
        self.process = subprocess.Popen([sys.executable, "-c", FORK_SERVER, *modules], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout.readline().strip() == "ready"

    def _ask(self, line: str) -> int:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def start(self, module: str, argv: list[str], out: Path, err: Path) -> int:
        return self._ask(json.dumps([module, argv, str(out), str(err)]))

    def wait(self, pid: int) -> int:
        return self._ask(f"wait {pid}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def sigterm_at_random_moments(module: str, argv: list[str], tmp_path: Path, window: float,
                              seed: int) -> list[tuple[float, Path]]:
    """Run the command `module` `argv` (`{run}` in it: a fresh directory per run) MOMENTS times, each
    sent SIGTERM at a uniformly random moment within `window` seconds of its start, AT_ONCE at a time.
    Asserts for each: status 143, the one-line message last, no trace of an exception, no child left.
    Returns (moment, run directory) of each; a run that finished before its moment is replaced by
    another, so MOMENTS of them were really interrupted, and the window narrows to 0.8 of that moment,
    so that a machine where the command is faster than `window` still interrupts it MOMENTS times."""
    rng = np.random.default_rng(seed)
    server = ForkServer(module)
    done: list[tuple[float, Path]] = []
    finished_first = index = 0
    try:
        while len(done) < MOMENTS:
            batch = []
            for _ in range(min(AT_ONCE, MOMENTS - len(done))):
                run = tmp_path / f"run{index}"
                index += 1
                run.mkdir()
                moment = float(rng.uniform(0, window))
                pid = server.start(module, [part.replace("{run}", str(run)) for part in argv], run / "stdout.txt", run / "stderr.txt")
                batch.append((pid, run, moment, time.monotonic() + moment))
            kids: dict[int, set[int]] = {}
            for pid, run, moment, at in sorted(batch, key=lambda item: item[3]):
                time.sleep(max(at - time.monotonic(), 0))
                kids[pid] = children(pid)
                os.kill(pid, signal.SIGTERM)
            for pid, run, moment, _ in batch:
                status = server.wait(pid)
                stderr = (run / "stderr.txt").read_text()
                if status == 0:  # finished before its moment came: the command is shorter here than the
                    finished_first += 1  # window (a faster machine); narrow the window to below that moment
                    assert finished_first <= MOMENTS, f"the window ({window:.2f} s) is much longer than the command"
                    window = min(window, 0.8 * moment)
                    continue
                wait_until(lambda: not any(alive(kid) for kid in kids[pid]), 10, f"children {sorted(kids[pid])} to end")
                where = f"SIGTERM {moment:.2f} s into {run}:\n{stderr[-3000:]}"
                assert status == 128 + signal.SIGTERM, where
                assert "Traceback" not in stderr and "Exception ignored" not in stderr, where
                assert ": error: interrupted by SIGTERM" in stderr.strip().splitlines()[-1], where
                done.append((moment, run))
    finally:
        server.close()
    return done


def test_sigterm_at_any_moment_of_preprocess_ends_it_cleanly(big_fasta, tmp_path):
    fasta = tmp_path / "mid.fasta"
    with open(big_fasta, "rb") as source:
        fasta.write_bytes(source.read(RECORDS // 4 * (LENGTH + 10)))  # about a quarter second of building
    argv = [f"input={fasta}", "output={run}/store/store.h5", "hydra.run.dir={run}", "progress=false",
            "chunk_records=512"]
    for moment, run in sigterm_at_random_moments("protein_performer.preprocess", argv, tmp_path, window=1.0, seed=1):
        left = sorted(p.name for p in (run / "store").iterdir()) if (run / "store").exists() else []
        note = (run / "stderr.txt").read_text().strip().splitlines()[-1]
        assert left == [] and note.endswith("nothing was written") or left == ["store.h5"] and "kept" in note, \
            (moment, left, note)


def test_sigterm_at_any_moment_of_train_ends_it_cleanly(big_fasta, tmp_path):
    fasta = tmp_path / "mid.fasta"
    with open(big_fasta, "rb") as source:
        fasta.write_bytes(source.read(RECORDS // 10 * (LENGTH + 10)))
    argv = ["model=tiny", "trainer=cpu", "logger=none", f"data.fasta={fasta}", "data.cache_dir={run}/cache",
            "data.max_length=64", "data.tokens_per_batch=512", "data.num_workers=0", "trainer.max_steps=20",
            "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
            "trainer.num_sanity_val_steps=0", "test=false", "callbacks.progress_bar.refresh_rate=0",
            "hydra.run.dir={run}"]
    for moment, run in sigterm_at_random_moments("protein_performer.train", argv, tmp_path, window=3.0, seed=2):
        cache = run / "cache"
        assert not (cache.exists() and list(cache.glob("*.tmp"))), (moment, list(cache.iterdir()))

