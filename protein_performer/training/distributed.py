"""Multi-device strategies that need Python objects a YAML file cannot name (conf/trainer/fsdp.yaml)."""
from __future__ import annotations

from typing import Any

from pytorch_lightning.strategies import FSDPStrategy

from protein_performer.nn import Block


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False,
                  **kwargs: Any) -> FSDPStrategy:
    """FSDP with one unit per Transformer Block, saving full (unsharded) checkpoints.

    sharding_strategy: "FULL_SHARD" (parameters, gradients and optimizer state sharded: least memory),
        "SHARD_GRAD_OP" (parameters kept whole between forward and backward: faster, more memory),
        "HYBRID_SHARD" (shard within a node, replicate across nodes: less inter-node traffic).
    activation_checkpointing: recompute each Block's activations in backward instead of storing them.
    kwargs: passed on to pytorch_lightning.strategies.FSDPStrategy.
    Full state dicts are gathered on rank 0 at save time, so `protein_performer.load_model` reads an
    FSDP checkpoint exactly like a single-device one.
    """
    return FSDPStrategy(
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type="full",
        **kwargs,
    )
