"""Suite-wide settings: offline, deterministic, and never reading outside the repository."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the suite may reach the network: wandb writes offline runs only.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
# One intra-op thread per process (this process, notebook kernels, DDP workers). The suite is mostly small
# tensors, where a second OpenMP thread only adds synchronisation; on 2 cores it made the suite slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR
