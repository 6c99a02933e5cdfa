"""FAVOR+: positive orthogonal random features, linear in length.

    features.py    random projections, softmax-kernel and ReLU feature maps
    reference.py   the references: the dense implied [L, L] matrix, the plain-autograd linear pass
    linear.py      linear attention on features, bidirectional and chunked causal, hand-written backward
    attention.py   favor_attention: the fast path
    recurrent.py   favor_causal_step: one token at a time
"""
from protein_performer.ops.favor.attention import favor_attention
from protein_performer.ops.favor.features import (
    RELU_EPS,
    Kernel,
    gaussian_orthogonal_random_matrix,
    relu_kernel_features,
    softmax_kernel_features,
)
from protein_performer.ops.favor.linear import DEFAULT_CHUNK_SIZE
from protein_performer.ops.favor.recurrent import FavorState, favor_causal_step
from protein_performer.ops.favor.reference import favor_attention_reference, implied_attention
from protein_performer.ops.stabilise import SCAN_GROUP  # re-exported: favor's causal scan reads it from there

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FavorState",
    "Kernel",
    "RELU_EPS",
    "SCAN_GROUP",
    "favor_attention",
    "favor_attention_reference",
    "favor_causal_step",
    "gaussian_orthogonal_random_matrix",
    "implied_attention",
    "relu_kernel_features",
    "softmax_kernel_features",
]
