"""Process-wide settings for long training and inference runs, chosen by where the run computes.

`configure_process(accelerator)` applies what suits the device: on CUDA, TF32 tensor cores for
float32 matmuls (`use_tensor_cores`); on the CPU, glibc malloc that keeps freed memory
(`keep_freed_memory`), which on a GPU run would only keep host memory from being returned.

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

__all__ = ["configure_process", "keep_freed_memory", "runs_on_cuda", "use_tensor_cores"]

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


def runs_on_cuda(accelerator: str) -> bool:
    """Whether a Lightning `accelerator` setting ("cpu", "gpu", "cuda", "auto", ...) computes on CUDA."""
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator != "auto":
        return False
    import torch  # here, not at the top: keep_freed_memory is meant to run before torch is imported

    return torch.cuda.is_available()


def use_tensor_cores(precision: str = "high") -> None:
    """Let float32 matmuls use TF32 tensor cores (torch.set_float32_matmul_precision).

    FAVOR+ and the RPE/Combiner ops deliberately run their feature matmuls in float32 even under
    bf16 autocast (exp() of bf16 logits loses the estimator); without TF32 those ~20% of the model's
    FLOPs would run off the tensor cores. "high" = TF32 (10-bit mantissa, fp32 range and accumulation);
    "highest" keeps full fp32.
    """
    import torch

    torch.set_float32_matmul_precision(precision)


def configure_process(accelerator: str, *, keep_freed: bool = True, float32_matmul_precision: str = "high") -> bool:
    """Process-wide settings for a run on `accelerator`; returns whether it runs on CUDA.

    CUDA: float32 matmuls at `float32_matmul_precision` (TF32 by default). CPU: `keep_freed_memory`
    if `keep_freed` (CUDA tensors live in PyTorch's own caching allocator, so there it would only
    keep host memory from being returned).
    """
    on_cuda = runs_on_cuda(accelerator)
    if on_cuda:
        use_tensor_cores(float32_matmul_precision)
    elif keep_freed:
        keep_freed_memory()
    return on_cuda
