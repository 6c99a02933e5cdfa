"""Pure attention math on tensors shaped [batch, heads, length, head_dim]: no parameters, no config.

One package per family, each with a naive O(L^2) reference beside its fast paths:

    softmax/    exact attention (SDPA) and its materialised matrix
    favor/      FAVOR+: features, reference, linear-time fast path, recurrent step
    rpe/        FAVOR+ with relative positions: bias forms, reference, window / FFT / dense paths, step
    combiner/   Combiner: the dense matrix from masks, the blocked fast path
    stabilise.py  the log-offset stabilisers and decayed scan FAVOR+ and favor_rpe share
"""
from protein_performer.ops.combiner import combiner_attention, combiner_attention_weights
from protein_performer.ops.favor import (
    FavorState,
    favor_attention,
    favor_causal_step,
    favor_sorted_band_attention,
    favor_window_attention,
    favor_window_causal_step,
    gaussian_orthogonal_random_matrix,
    implied_attention,
    implied_sorted_band_attention,
    implied_window_attention,
    oprf_coefficient,
    oprf_statistic,
    relu_kernel_features,
    softmax_kernel_features,
)
from protein_performer.ops.rpe import (
    WindowedBias,
    WindowedState,
    expand_windowed_bias,
    favor_rpe_attention,
    favor_rpe_causal_step,
    implied_rpe_attention,
    slice_rpe_bias,
)
from protein_performer.ops.softmax import softmax_attention, softmax_attention_weights

__all__ = [
    "FavorState",
    "favor_attention",
    "favor_causal_step",
    "favor_window_attention",
    "favor_window_causal_step",
    "implied_window_attention",
    "favor_sorted_band_attention",
    "implied_sorted_band_attention",
    "gaussian_orthogonal_random_matrix",
    "implied_attention",
    "oprf_coefficient",
    "oprf_statistic",
    "relu_kernel_features",
    "softmax_attention",
    "softmax_attention_weights",
    "softmax_kernel_features",
    "favor_rpe_attention",
    "implied_rpe_attention",
    "slice_rpe_bias",
    "WindowedBias",
    "WindowedState",
    "expand_windowed_bias",
    "favor_rpe_causal_step",
    "combiner_attention",
    "combiner_attention_weights",
]
