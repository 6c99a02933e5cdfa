"""FAVOR+ with relative positional encoding (favor_rpe): kernelized attention weighted by exp(b_(j-i)).

    bias.py        the bias in its two forms (windowed, full) and the weights c = exp(b) the ops read
    reference.py   implied_rpe_attention: the dense O(L^2) reference of every path
    window.py      windowed bias: FAVOR+ far states plus a blocked band, O(L w (m + D))
    fft.py         full bias by FFT, O(m D L log L); the flop model that "auto" uses
    dense.py       full bias by dense blocks, O(L^2 (m + D)), causal in floating point
    attention.py   favor_rpe_attention: picks the path
    recurrent.py   favor_rpe_causal_step: windowed favor_rpe one token at a time
"""
from protein_performer.ops.rpe.attention import favor_rpe_attention
from protein_performer.ops.rpe.bias import WindowedBias, expand_windowed_bias, slice_rpe_bias
from protein_performer.ops.rpe.recurrent import WindowedState, favor_rpe_causal_step
from protein_performer.ops.rpe.reference import implied_rpe_attention

__all__ = ["WindowedBias", "WindowedState", "expand_windowed_bias", "favor_rpe_attention", "favor_rpe_causal_step",
           "implied_rpe_attention", "slice_rpe_bias"]
