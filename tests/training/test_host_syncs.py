"""A training step never waits on the host: counted on the CPU as a proxy for the GPU.

A TorchDispatchMode sees every aten op. Two kinds make a GPU step wait or copy from the host:
`aten._local_scalar_dense` (`.item()`, `float()`, `bool()`, `int()` of a tensor: a device-to-host read)
and `aten.lift_fresh` (a tensor built from Python data, e.g. `torch.tensor(list)`, then copied to the
device). They are counted inside the closure the optimizer runs (forward, backward, the
before-optimizer-step hooks and gradient clipping) over real Lightning training steps with the default
callbacks. The optimizer's own update is left out: its step counters live on the host on every device.
"""
from __future__ import annotations

import traceback
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from protein_performer.train import compose_config, train

from .runs import tiny_overrides

HOST_OPS = ("aten._local_scalar_dense", "aten.lift_fresh")
STEPS = 5


class HostReads(TorchDispatchMode):
    """Counts HOST_OPS by (op, innermost project or Lightning frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in HOST_OPS:
            frames = [f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
                      for frame in traceback.extract_stack()[:-1]
                      if "protein_performer" in frame.filename or "pytorch_lightning" in frame.filename]
            self.seen[(name, frames[-1] if frames else "?")] += 1
        return func(*args, **(kwargs or {}))


class CountClosures(pl.Callback):
    """Runs the optimizer's closure of every step under HostReads; one Counter per optimizer step."""

    def __init__(self) -> None:
        self.per_step: list[Counter[tuple[str, str]]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        step = optimizer.step

        def counted_step(closure=None, **kwargs):
            def counted_closure():
                mode = HostReads()
                with mode:
                    result = closure()
                self.per_step.append(mode.seen)
                return result
            return step(closure=counted_closure, **kwargs)

        optimizer.step = counted_step


@pytest.mark.parametrize(("attention", "objective", "extra"), [
    ("favor", "mlm", []),
    ("softmax", "clm", []),  # padded batches: the causal path without a mask
    ("favor_rpe", "clm", ["attention.rpe_max_distance=16", "attention.rpe_exact_distance=4"]),  # windowed
    # issue 21's options: causal FAVOR++ (its running statistic is updated every step) and the exact band
    ("favor", "clm", ["attention.features=oprf", "attention.coupling=simplex", "attention.exact_window=8"]),
], ids=["favor", "softmax-causal", "favor_rpe-windowed", "favor-oprf-window-causal"])
def test_training_steps_read_nothing_from_the_device(attention, objective, extra, store_cache, tmp_path):
    cfg = compose_config(tiny_overrides(store_cache, f"attention={attention}", f"objective={objective}", *extra,
                                        f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
                                        "trainer.log_every_n_steps=2", "logger=csv", "test=false"), tmp_path)
    counter = CountClosures()
    train(cfg, [counter])
    assert len(counter.per_step) == STEPS
    first, *later = counter.per_step
    # Lightning builds its metric accumulators from Python floats at the first self.log of each name
    assert all(where.startswith("pytorch_lightning/") for _, where in first), first
    assert all(not step for step in later), later
