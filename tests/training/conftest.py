"""Fixtures of the training tests."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def store_cache(tmp_path_factory) -> Path:
    """One token-store cache for every run of the session (built by the first run that needs it)."""
    return tmp_path_factory.mktemp("store-cache")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on one intra-op thread: on a shared, oversubscribed CPU two threads wait on each
    other at every small op (measured: a 30-step run took 20 s with 2 threads, 3 s with 1).
    Module-scoped so that it is in force before module-scoped run fixtures start."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
