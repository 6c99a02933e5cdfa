"""keep_freed_memory: large blocks are reused after free instead of being mapped (and faulted) anew."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from protein_performer.runtime import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
def cycle():
    block = np.empty(64 << 20, dtype=np.uint8)  # 64 MiB: above glibc's largest mmap threshold
    block[::4096] = 1  # touch every page
    del block
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_are_reused_without_page_faults():
    # Five fresh 64 MiB mappings fault at least once per page, and pages are at most 2 MiB
    # (transparent huge pages): >= 160 faults. Reused memory is already mapped: next to none.
    least = 5 * (64 << 20) // (2 << 20)
    assert page_faults("default") >= least  # stock glibc: every block is a fresh mapping
    assert page_faults("keep") < least // 10  # kept: the same memory is handed out again
