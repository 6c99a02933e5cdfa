"""Helpers of the training tests: overrides for a tiny model on short crops of the bundled real sample."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


# Small enough that a run of a few dozen steps takes seconds on 2 shared cores; real sequences.
TINY = [
    "model=tiny",
    "data=sample",
    "data.max_length=64",
    "data.tokens_per_batch=512",
    "data.num_workers=0",
    "callbacks.progress_bar.refresh_rate=0",
    "+trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.limit_val_batches=4",
    "+trainer.limit_test_batches=4",
    "optim.warmup_steps=5",
]


SAMPLE = Path(__file__).resolve().parents[2] / "data" / "uniprot_sample.fasta"


def tiny_overrides(cache: Path, *extra: str, trainer: str = "cpu") -> list[str]:
    """Overrides for a tiny, fast run whose token-store cache lives in `cache` (any working directory)."""
    return [f"trainer={trainer}", *TINY, f"data.fasta={SAMPLE}", f"data.cache_dir={cache}", *extra]


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m protein_performer.train <args>` in a fresh process, offline; fails loudly with its output."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "protein_performer.train", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"train exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result
