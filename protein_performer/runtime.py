"""Process-wide CPU settings for long training and inference runs.

glibc's malloc serves every block above a threshold (at most 32 MiB) with a fresh `mmap` and unmaps
it on free. A FAVOR+ layer at L=8192 allocates feature tensors of 64 MiB and more in every forward and
backward, so each step page-faults (and the kernel zeroes) several GB of new memory: at 8192 that was
about 30% of a FAVOR+ training step here (`benchmarks/train.py`). `keep_freed_memory()` makes malloc
take large blocks from its heap and keep what is freed for the next allocation, as PyTorch's CUDA
caching allocator does on the GPU and as jemalloc/tcmalloc setups do for CPU training. The cost is
that memory a run has used stays with the process until it exits.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc malloc keep and reuse freed memory (no per-block mmap, no trimming); idempotent.

    Returns True if the settings are in effect, False where they do not apply (not Linux/glibc).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success.
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    if not _applied:
        log.warning("mallopt refused the allocator settings; freed memory is returned to the OS as usual")
    return _applied
