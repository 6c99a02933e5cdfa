"""Fixtures of the training tests (the root conftest makes every process single-threaded and offline)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def store_cache(tmp_path_factory) -> Path:
    """One token-store cache for every run of the session (built by the first run that needs it)."""
    return tmp_path_factory.mktemp("store-cache")
