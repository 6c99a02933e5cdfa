"""Modules that own weights and buffers and call `protein_performer.ops`, in reading order:
rotary -> attention -> feedforward -> block. The full model is `protein_performer.model`."""
from protein_performer.nn.attention import (
    ATTENTION_KINDS,
    RANDOM_FEATURE_KINDS,
    RECURRENT_KINDS,
    SelfAttention,
)
from protein_performer.nn.block import Block
from protein_performer.nn.feedforward import FeedForward
from protein_performer.nn.rotary import RotaryEmbedding, member_positions, rotate_half

__all__ = [
    "ATTENTION_KINDS",
    "RANDOM_FEATURE_KINDS",
    "RECURRENT_KINDS",
    "Block",
    "FeedForward",
    "RotaryEmbedding",
    "SelfAttention",
    "member_positions",
    "rotate_half",
]
