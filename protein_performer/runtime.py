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

`slow_bf16_warning(precision, accelerator)` catches bf16 asked of a CPU that has no bf16 arithmetic
(x86 without AVX512-BF16 or AMX-BF16, such as AVX2-only machines; Arm without the BF16 extension):
there oneDNN emulates every bf16 matmul, and a training step ran 20-30x slower than in float32.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["configure_process", "cpu_has_native_bf16", "keep_freed_memory", "runs_on_cpu", "runs_on_cuda",
           "slow_bf16_warning", "use_tensor_cores"]

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


CPUINFO = "/proc/cpuinfo"
# Its flags for bf16 arithmetic in hardware: x86 AVX512-BF16 and AMX-BF16, Arm's BF16 extension.
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def _cpuinfo_flags() -> frozenset[str] | None:
    """The CPU's feature flags (x86 `flags`, Arm `Features`) from CPUINFO, or None where it does not exist."""
    try:
        with open(CPUINFO) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return frozenset()


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes in bf16 in hardware; None when it cannot tell (no /proc/cpuinfo, e.g. macOS).

    torch.backends.cpu.get_cpu_capability() does not answer this: it names the vector width torch's own
    kernels use ("AVX2", "AVX512"), and reports "AVX512" on CPUs with and without AVX512-BF16 alike.
    """
    flags = _cpuinfo_flags()
    if not flags:
        return None
    return not flags.isdisjoint(_BF16_CPU_FLAGS)


def runs_on_cpu(accelerator: str) -> bool:
    """Whether a Lightning `accelerator` setting computes on the CPU ("auto": when no CUDA or MPS device exists)."""
    accelerator = str(accelerator).lower()
    if accelerator != "auto":
        return accelerator.split(":")[0] == "cpu"
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def slow_bf16_warning(precision: object, accelerator: str, option: str = "trainer.precision",
                      fix: str = "32-true") -> str | None:
    """A warning for a run that asks for bf16 (`trainer.precision` bf16-mixed, bf16-true, ...) on a CPU
    without bf16 arithmetic, naming the fix (`option`=`fix`); None when the run is not affected or the CPU
    is unknown. `accelerator` is a Lightning accelerator or a torch device ("cpu", "cuda:1", "auto")."""
    if not str(precision).lower().startswith("bf16") or not runs_on_cpu(accelerator):
        return None
    if cpu_has_native_bf16() is not False:
        return None
    return (f"{option}={precision} on a CPU without bf16 arithmetic (neither AVX512-BF16 nor AMX-BF16 "
            "among its flags): bf16 matmuls are emulated, which made training steps 20-30x slower than float32 "
            f"on an AVX2 machine. Use {option}={fix} on this machine.")
