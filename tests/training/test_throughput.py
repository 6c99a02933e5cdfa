"""The Throughput callback: tokens per second without a host sync per step."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from protein_performer.training import Throughput


def _run(callback: Throughput, batches) -> list:
    logged = []
    module = SimpleNamespace(log=lambda name, value, **settings: logged.append((name, value)))
    trainer = SimpleNamespace(world_size=2)
    callback.on_train_batch_start(trainer, module, batches[0], 0)
    for index, batch in enumerate(batches):
        callback.on_train_batch_end(trainer, module, None, batch, index)
    return logged


def test_throughput_reads_no_device_value_per_step():
    """Counts stay on the batch's device. On the meta device any read of a value (int(), .item(), a
    comparison in Python) raises, as a read of a CUDA value would wait for the GPU."""
    batch = {"input_ids": torch.empty(2, 8, dtype=torch.long, device="meta"),
             "padding_mask": torch.empty(2, 8, dtype=torch.bool, device="meta")}
    logged = _run(Throughput(window=2), [batch] * 3)
    assert [name for name, _ in logged] == ["train/tokens_per_sec"] * 3
    assert all(value.device.type == "meta" for _, value in logged)


def test_throughput_counts_real_tokens_of_every_rank():
    padded = torch.zeros(2, 8, dtype=torch.bool)
    padded[1, 5:] = True  # 13 real tokens
    batches = [{"input_ids": torch.zeros(2, 8, dtype=torch.long), "padding_mask": padded},
               {"input_ids": torch.zeros(2, 8, dtype=torch.long), "padding_mask": None}]  # 16, nothing padded
    callback = Throughput(window=5)
    logged = _run(callback, batches)
    seconds = callback._marks[-1][0] - callback._marks[0][0]
    assert callback.tokens_per_sec == float(logged[-1][1]) > 0
    assert abs(callback.tokens_per_sec - (13 + 16) * 2 / seconds) < 1e-3 * callback.tokens_per_sec


def test_tokens_seen_are_saved_for_all_ranks_and_restored_on_resume():
    padded = torch.zeros(2, 8, dtype=torch.bool)
    padded[1, 5:] = True  # 13 real tokens
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "padding_mask": padded}
    trainer = SimpleNamespace(world_size=2)
    callback = Throughput()
    _run(callback, [batch, batch])
    saved: dict = {}
    callback.on_save_checkpoint(trainer, None, saved)
    assert saved["tokens_seen"] == 2 * 13 * 2  # two batches of 13 on each of 2 ranks

    resumed = Throughput()
    resumed.on_load_checkpoint(trainer, None, saved)
    _run(resumed, [batch])
    again: dict = {}
    resumed.on_save_checkpoint(trainer, None, again)
    assert again["tokens_seen"] == 3 * 13 * 2

    unknown = Throughput()  # resumed from a checkpoint written before tokens were counted
    unknown.on_load_checkpoint(trainer, None, {})
    _run(unknown, [batch])
    later: dict = {}
    unknown.on_save_checkpoint(trainer, None, later)
    assert later["tokens_seen"] is None
