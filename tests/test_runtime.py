"""keep_freed_memory: large blocks are reused after free instead of being mapped (and faulted) anew."""
from __future__ import annotations

import json
import logging
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


@pytest.mark.parametrize("accelerator,cuda_present,on_cuda", [
    ("cpu", True, False), ("gpu", False, True), ("cuda", False, True), ("auto", True, True), ("auto", False, False),
])
def test_gpu_runs_get_tf32_and_cpu_runs_the_allocator_setting(accelerator, cuda_present, on_cuda, monkeypatch):
    import torch

    from protein_performer import runtime

    kept = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: kept.append(True) or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_present)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert runtime.configure_process(accelerator) == on_cuda
        assert torch.get_float32_matmul_precision() == ("high" if on_cuda else "highest")
        assert kept == ([] if on_cuda else [True])
    finally:
        torch.set_float32_matmul_precision(before)


def test_train_configures_the_process_for_its_trainer(tmp_path, monkeypatch):
    """The train command passes its trainer's accelerator and the two settings of conf/train.yaml."""
    from protein_performer import train
    from protein_performer.train import compose_config

    calls = []

    class Stop(Exception):
        pass

    def configure_process(accelerator, **settings):
        calls.append((accelerator, settings))
        raise Stop

    monkeypatch.setattr(train, "configure_process", configure_process)
    for trainer, accelerator in [("gpu", "gpu"), ("ddp", "gpu"), ("fsdp", "gpu"), ("cpu", "cpu")]:
        with pytest.raises(Stop):
            train.train(compose_config([f"trainer={trainer}", "logger=none"], tmp_path))
        assert calls[-1] == (accelerator, {"keep_freed": True, "float32_matmul_precision": "high"})


# ---- bf16 on CPUs without bf16 arithmetic ------------------------------------------------------------------

AVX2_FLAGS = "fpu sse2 avx avx2 fma"  # an AVX2-only x86 CPU
AVX512_FLAGS = "fpu sse2 avx avx2 avx512f avx512bw avx512_vnni"  # AVX-512 without its BF16 extension


@pytest.mark.parametrize("cpuinfo,native", [
    (f"processor\t: 0\nflags\t\t: {AVX2_FLAGS}\n", False),
    (f"processor\t: 0\nflags\t\t: {AVX512_FLAGS}\n", False),
    (f"processor\t: 0\nflags\t\t: {AVX512_FLAGS} avx512_bf16\n", True),
    (f"processor\t: 0\nflags\t\t: {AVX2_FLAGS} amx_tile amx_bf16\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm with the BF16 extension
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n", False),
], ids=["avx2", "avx512", "avx512_bf16", "amx_bf16", "arm-bf16", "arm"])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native, tmp_path, monkeypatch):
    from protein_performer import runtime

    (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(runtime, "CPUINFO", str(tmp_path / "cpuinfo"))
    assert runtime.cpu_has_native_bf16() is native


def test_unknown_cpu_features_give_no_answer(tmp_path, monkeypatch):
    from protein_performer import runtime

    monkeypatch.setattr(runtime, "CPUINFO", str(tmp_path / "missing"))
    assert runtime.cpu_has_native_bf16() is None
    assert runtime.slow_bf16_warning("bf16-mixed", "cpu") is None  # no warning on a guess


@pytest.mark.parametrize("precision,accelerator,native,warns", [
    ("bf16-mixed", "cpu", False, True),
    ("bf16-true", "cpu", False, True),
    ("bf16", "cpu", False, True),
    ("bf16-mixed", "auto", False, True),  # auto on a machine without CUDA or MPS: the CPU
    ("bf16-mixed", "cpu", True, False),
    ("32-true", "cpu", False, False),
    ("16-mixed", "cpu", False, False),
    ("bf16-mixed", "gpu", False, False),
], ids=lambda value: str(value))
def test_bf16_on_a_cpu_without_it_warns_and_names_the_fix(precision, accelerator, native, warns, monkeypatch):
    import torch

    from protein_performer import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    warning = runtime.slow_bf16_warning(precision, accelerator)
    if warns:
        assert f"trainer.precision={precision}" in warning and "Use trainer.precision=32-true" in warning
    else:
        assert warning is None


def test_train_warns_before_a_bf16_run_on_a_cpu_without_bf16(tmp_path, monkeypatch, caplog):
    from protein_performer import runtime, train
    from protein_performer.train import compose_config

    class Stop(Exception):
        pass

    def configure_process(accelerator, **settings):
        raise Stop

    monkeypatch.setattr(train, "configure_process", configure_process)
    for native, expected in [(False, 1), (True, 0)]:
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="protein_performer.train"), pytest.raises(Stop):
            train.train(compose_config(["trainer=cpu", "trainer.precision=bf16-mixed", "logger=none"], tmp_path))
        warnings = [r.getMessage() for r in caplog.records if "trainer.precision=32-true" in r.getMessage()]
        assert len(warnings) == expected, caplog.text
