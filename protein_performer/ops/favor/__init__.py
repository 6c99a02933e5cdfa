"""FAVOR+: positive orthogonal random features, linear in length (and FAVOR++'s optimised features, simplex
coupling, an exact local band).

    features.py    random projections (orthogonal or simplex), softmax-kernel (positive, OPRF) and ReLU maps
    reference.py   the references: the dense implied [L, L] matrix, the plain-autograd linear pass
    linear.py      linear attention on features, bidirectional and chunked causal, hand-written backward
    attention.py   favor_attention: the fast path
    recurrent.py   favor_causal_step: one token at a time
    window.py      favor_window_attention: exact softmax on a local band, FAVOR+ beyond (+ reference, step)
    sorted_band.py favor_sorted_band_attention: the band taken in another order (tokens sorted by member position)
"""
from protein_performer.ops.favor.attention import favor_attention
from protein_performer.ops.favor.features import (
    COUPLINGS,
    FEATURE_MAPS,
    RELU_EPS,
    Kernel,
    gaussian_orthogonal_random_matrix,
    oprf_coefficient,
    oprf_statistic,
    relu_kernel_features,
    softmax_kernel_features,
)
from protein_performer.ops.favor.linear import DEFAULT_CHUNK_SIZE
from protein_performer.ops.favor.recurrent import FavorState, favor_causal_step
from protein_performer.ops.favor.reference import favor_attention_reference, implied_attention
from protein_performer.ops.favor.sorted_band import (
    favor_sorted_band_attention,
    implied_sorted_band_attention,
    sorted_band_support,
    take_tokens,
)
from protein_performer.ops.favor.window import (
    WindowState,
    favor_window_attention,
    favor_window_causal_step,
    implied_window_attention,
)
from protein_performer.ops.stabilise import SCAN_GROUP  # re-exported: favor's causal scan reads it from there

__all__ = [
    "COUPLINGS",
    "DEFAULT_CHUNK_SIZE",
    "FEATURE_MAPS",
    "FavorState",
    "Kernel",
    "RELU_EPS",
    "SCAN_GROUP",
    "WindowState",
    "favor_attention",
    "favor_attention_reference",
    "favor_causal_step",
    "favor_sorted_band_attention",
    "favor_window_attention",
    "favor_window_causal_step",
    "gaussian_orthogonal_random_matrix",
    "implied_attention",
    "implied_sorted_band_attention",
    "implied_window_attention",
    "oprf_coefficient",
    "oprf_statistic",
    "relu_kernel_features",
    "softmax_kernel_features",
    "sorted_band_support",
    "take_tokens",
]
