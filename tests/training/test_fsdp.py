"""FSDP parts that run without a GPU: the composed trainer=fsdp config, its mixed precision, and the
module's optimiser groups and gradient clipping after wrapping with torch's FSDP (2 ranks over gloo).

Lightning's FSDPStrategy refuses a CPU accelerator, so the module is wrapped the way the strategy
wraps it (one FSDP unit per Block, use_orig_params=True, the strategy's MixedPrecision) and Lightning's
hooks are called on it directly.
"""
from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_lightning.plugins.precision import FSDPPrecision
from pytorch_lightning.utilities import GradClipAlgorithmType

from protein_performer.data import Alphabet
from protein_performer.model import PerformerConfig
from protein_performer.train import compose_config
from protein_performer.training.distributed import fsdp_strategy
from protein_performer.training.module import ProteinLM, parameter_groups

MAX_NORM = 0.5


def _strategy(precision: str):
    strategy = fsdp_strategy()
    strategy.precision_plugin = FSDPPrecision(precision)
    return strategy


@pytest.mark.filterwarnings("ignore:FSDP with `bf16-true`")
def test_fsdp_bf16_mixed_reduces_gradients_and_keeps_buffers_in_fp32_as_ddp_does():
    config = _strategy("bf16-mixed").mixed_precision_config
    assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (torch.float32,) * 3
    true_bf16 = _strategy("bf16-true").mixed_precision_config  # asked for: left as Lightning sets it
    assert true_bf16.param_dtype == torch.bfloat16


def test_composed_fsdp_trainer_clips_by_norm_through_the_module(tmp_path):
    cfg = compose_config(["trainer=fsdp"], tmp_path)
    assert cfg.trainer.gradient_clip_val == 0.5 and cfg.trainer.gradient_clip_algorithm == "norm"
    assert cfg.trainer.strategy._target_ == "protein_performer.training.distributed.fsdp_strategy"
    # Lightning's FSDP plugin refuses norm clipping; ProteinLM must not hand it over (checked after
    # wrapping in _rank below), and the strategy the config builds is ours.
    assert type(_strategy("bf16-mixed")).__name__ == "ProteinFSDPStrategy"


def _tiny_module() -> ProteinLM:
    alphabet = Alphabet()
    config = PerformerConfig(vocab_size=len(alphabet), d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0,
                             attention="favor", nb_features=16, max_length=64, pad_idx=alphabet.pad_idx)
    torch.manual_seed(0)
    return ProteinLM(config.to_dict(), "mlm")


def _rank(rank: int, world_size: int, port: int, results) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from protein_performer.nn import Block

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        module = _tiny_module()
        before = [[name for name, p in module.named_parameters() if any(p is q for q in group["params"])]
                  for group in parameter_groups(module, 0.1)]
        strategy = _strategy("bf16-mixed")
        wrapped = FullyShardedDataParallel(module, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                                           mixed_precision=strategy.mixed_precision_config,
                                           device_id=torch.device("cpu"))
        # What Lightning hands the module after wrapping: its FSDP root and the precision plugin.
        module.trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapped), estimated_stepping_batches=100,
                                         precision_plugin=strategy.precision_plugin, gradient_clip_val=MAX_NORM,
                                         gradient_clip_algorithm=GradClipAlgorithmType.NORM)
        optimizer = module.configure_optimizers()["optimizer"]
        after = [[name.replace("_fsdp_wrapped_module.", "") for name, p in module.named_parameters()
                  if any(p is q for q in group["params"])] for group in optimizer.param_groups]

        generator = torch.Generator().manual_seed(rank)
        ids = torch.randint(4, 24, (2, 24), generator=generator)
        labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.3, ids, -100)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # Lightning's forward context for bf16-mixed
            logits = wrapped(ids, None)  # through the FSDP root, as Lightning redirects training_step
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        (loss * 1000).backward()  # a norm far above MAX_NORM

        def global_norm() -> float:
            squares = torch.stack([p.grad.double().square().sum() for p in module.parameters()
                                   if p.grad is not None]).sum()
            dist.all_reduce(squares)
            return float(squares.sqrt())

        unclipped = global_norm()
        try:
            module.configure_gradient_clipping(optimizer, MAX_NORM, GradClipAlgorithmType.NORM)
            clipped = global_norm()
        except Exception as error:  # e.g. Lightning's FSDP plugin refusing norm clipping
            clipped = repr(error)
        projection = module.model.blocks[0].attention.projection
        results.put((rank, before, after, unclipped, clipped, str(projection.dtype)))
    except Exception as error:  # reported to the parent, which fails the test with it
        results.put((rank, repr(error)))
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_wrapped_module_keeps_decay_groups_and_clips_the_global_norm():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank, args=(rank, 2, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    reports = sorted((results.get(timeout=120) for _ in processes), key=lambda r: r[0])
    for process in processes:
        process.join(timeout=60)
    for report in reports:
        assert len(report) == 6, f"rank {report[0]} failed: {report[1]}"
    (_, before, after, unclipped, clipped, projection_dtype) = reports[0]
    assert len(before[0]) == 9 and len(before[1]) == 19  # matrices / vectors of the tiny model
    assert [sorted(group) for group in after] == [sorted(group) for group in before]
    assert [report[2] for report in reports] == [after, after]
    assert projection_dtype == "torch.float32"  # bf16-mixed: the random features stay fp32, as under DDP
    assert unclipped > 10 * MAX_NORM
    assert clipped == pytest.approx(MAX_NORM, rel=1e-4), clipped
    assert reports[1][4] == clipped  # both ranks clipped to the same global norm
