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
