"""Multi-device strategies that need Python objects a YAML file cannot name (conf/trainer/fsdp.yaml)."""
from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch.distributed.fsdp import MixedPrecision

from protein_performer.nn import Block


class ProteinFSDPStrategy(FSDPStrategy):
    """FSDPStrategy whose "-mixed" precisions mean what they mean under DDP.

    Lightning's FSDP plugin turns bf16-mixed (and 16-mixed) into FSDP MixedPrecision with parameters,
    gradient reduction and buffers all in the low precision: gradients are summed across ranks in
    bf16, and the FAVOR+ random-feature projection buffer is stored rounded to bf16. Under DDP the
    same setting keeps fp32 weights, buffers and gradient all-reduce, and only autocast runs the
    matmuls in bf16. Here FSDP keeps everything fp32 too (Lightning's autocast forward context still
    applies), so FSDP and DDP runs of one config train the same model. The cost is fp32 all-gathers,
    twice the bytes of bf16 ones. An explicit `mixed_precision=` argument, or a "-true" precision,
    is left as Lightning configures it.
    """

    @property
    def mixed_precision_config(self) -> MixedPrecision | None:
        config = super().mixed_precision_config
        if self.mixed_precision is not None or config is None or "mixed" not in str(self.precision_plugin.precision):
            return config
        return MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False,
                  **kwargs: Any) -> ProteinFSDPStrategy:
    """FSDP with one unit per Transformer Block, saving full (unsharded) checkpoints.

    sharding_strategy: "FULL_SHARD" (parameters, gradients and optimizer state sharded: least memory),
        "SHARD_GRAD_OP" (parameters kept whole between forward and backward: faster, more memory),
        "HYBRID_SHARD" (shard within a node, replicate across nodes: less inter-node traffic).
    activation_checkpointing: recompute each Block's activations in backward instead of storing them.
    kwargs: passed on to pytorch_lightning.strategies.FSDPStrategy.
    Full state dicts are gathered on rank 0 at save time, so `protein_performer.load_model` reads an
    FSDP checkpoint exactly like a single-device one. Mixed precision follows DDP's (see
    ProteinFSDPStrategy); gradient clipping by norm goes through FSDP's own clip_grad_norm_
    (ProteinLM.configure_gradient_clipping), so trainer.gradient_clip_val works as under DDP.
    """
    return ProteinFSDPStrategy(
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type="full",
        **kwargs,
    )
