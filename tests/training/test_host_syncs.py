"""A training step never waits on the host: counted on the CPU as a proxy for the GPU.

A TorchDispatchMode sees every aten op. Two kinds make a GPU step wait or copy from the host:
`aten._local_scalar_dense` (`.item()`, `float()`, `bool()`, `int()` of a tensor: a device-to-host read)
and `aten.lift_fresh` (a tensor built from Python data, e.g. `torch.tensor(list)`, then copied to the
device). They are counted over whole training batches (from the batch-start hooks to the batch-end
hooks: forward, backward, the before-optimizer-step hooks, clipping, the callbacks' batch-end hooks)
of real Lightning runs with the default callbacks. The optimizer's own update is left out: its step
counters live on the host on every device, so reading them forces no sync.
"""
from __future__ import annotations

import traceback
from collections import Counter

import pytest
import pytorch_lightning as pl
from torch.utils._python_dispatch import TorchDispatchMode

from protein_performer.train import compose_config, train

from .runs import tiny_overrides

HOST_OPS = ("aten._local_scalar_dense", "aten.lift_fresh")
STEPS, LOG_EVERY = 7, 3
WATCHED = ("protein_performer", "pytorch_lightning", "torch/optim")


class HostReads(TorchDispatchMode):
    """Counts HOST_OPS by the innermost frame of this project, Lightning or torch.optim that ran them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in HOST_OPS:
            frames = [frame for frame in traceback.extract_stack()[:-1]
                      if any(part in frame.filename for part in WATCHED)]
            where = (f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno} in {frames[-1].name}"
                     if frames else "?")
            if "torch/optim/" not in where:  # the optimizer's update (its host-side step counters)
                self.seen[f"{func.overloadpacket} at {where}"] += 1
        return func(*args, **(kwargs or {}))


class CountBatches(pl.Callback):
    """Every training batch under HostReads, from its start hooks to its end hooks (this callback is
    the last: it starts after the configured ones' start hooks and stops after their end hooks)."""

    def __init__(self) -> None:
        self.per_batch: list[tuple[int, Counter[str]]] = []  # (global_step after the batch, what was seen)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode = HostReads()
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mode.__exit__(None, None, None)
        self.per_batch.append((trainer.global_step, self.mode.seen))


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
                                        f"trainer.log_every_n_steps={LOG_EVERY}", "logger=csv", "test=false"),
                         tmp_path)
    counter = CountBatches()
    train(cfg, [counter])
    assert len(counter.per_batch) == STEPS
    (_, first), *later = counter.per_batch
    # Lightning builds its metric accumulators from Python floats at the first self.log of each name
    assert all(" at pytorch_lightning/" in event for event in first), first
    for step, seen in later:
        if step % LOG_EVERY:
            assert not seen, f"step {step}: {dict(seen)}"
        else:  # a logging step: the divergence guard reads its device flag, once
            assert list(seen.elements()) == [next(iter(seen))] and "in check" in next(iter(seen)), dict(seen)
