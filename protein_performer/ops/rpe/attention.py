"""Kernelized attention with relative positional encoding (Luo et al., "Stable, Fast and Accurate:
Kernelized Attention with Relative Positional Encoding", NeurIPS 2021).

    z_i = phi(q_i) . sum_j c_ij phi(k_j) v_j^T  /  phi(q_i) . sum_j c_ij phi(k_j),   c_ij = exp(b_(j-i))

All tensors are ``[batch, heads, length, head_dim]``; a projection is ``[nb_features, head_dim]``;
``key_padding_mask`` is bool ``[batch, length]``, True at padding. The bias ``rpe_bias`` is
``[heads, 2L - 1]`` and entry ``(j - i) + L - 1`` holds b_(j-i); a bias learned for a longer maximum
length is cut to the current length with :func:`slice_rpe_bias`. Causal attention sets c_ij = 0 for
j > i, so only the first L entries (offsets <= 0) are read.

Three exact algorithms for the weighted sums N_i = sum_j c_(j-i) phi(q_i).phi(k_j) [v_j, 1] (the
trailing 1 gives the denominator), each an autograd function in its own module:
- a windowed bias (`ops.rpe.window`): FAVOR+ prefix/suffix states plus a blocked band, O(L w (m + D));
- a full bias by FFT (`ops.rpe.fft`): O(m (D + 1) L log L), the paper's algorithm, float64 convolutions;
- a full bias by dense blocks (`ops.rpe.dense`): O(L^2 (m + D)) GEMMs, causal in floating point too.
``toeplitz="auto"`` picks between the last two by a flop model per device type
(:func:`~protein_performer.ops.rpe.fft.use_fft`) for bidirectional attention, and always picks dense
for causal attention. Either full-bias path is one to two orders of magnitude more work than plain
FAVOR+ (O(L m D)). The reference of all three is `ops.rpe.reference.implied_rpe_attention`.

Stabilisers (`ops.stabilise`). exp(b) is shifted by the max of b per head (over the offsets the mode
reads): a constant per head cancels in the ratio and keeps c <= 1. Query features are divided by their
own row max; bidirectional keys share one max over the valid keys; causal keys (window and dense paths)
carry the running offset M_j, read by query i with exp(M_j - M_i) <= 1, so nothing query i reads
depends on a key after i. Padded keys are exactly invisible: zeroed (``masked_fill``) and excluded from
the key offsets; padded queries get zero output rows, as in ``favor_attention``.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from protein_performer.ops._checks import compute_dtype
from protein_performer.ops.rpe.bias import WindowedBias, relative_weights, windowed_weights
from protein_performer.ops.rpe.dense import toeplitz_dense
from protein_performer.ops.rpe.fft import FFT_DTYPE, toeplitz_fft, use_fft
from protein_performer.ops.rpe.reference import check_rpe, rpe_features
from protein_performer.ops.rpe.window import default_block_size, windowed_attention_product
from protein_performer.ops.stabilise import masked

__all__ = ["Toeplitz", "favor_rpe_attention"]

Toeplitz = Literal["auto", "fft", "dense"]


def favor_rpe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    rpe_bias: Tensor | WindowedBias,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    toeplitz: Toeplitz = "auto",
    block_size: int | None = None,
) -> Tensor:
    """FAVOR+ attention with relative positional encoding (module docstring).

    Args:
        q, k, v: [batch, heads, length, head_dim] (q, k unscaled; the features apply 1/sqrt(d)); v may
            be narrower or wider than q and k.
        projection: [nb_features, head_dim], as for :func:`~protein_performer.ops.favor_attention`.
        rpe_bias: in log space (c = exp(b)), differentiable, in one of two forms:
            - a :class:`~protein_performer.ops.rpe.bias.WindowedBias` (band [heads, 2w - 1], far
              [heads, 2]): free within |j - i| < w, one value per direction beyond. Exact FAVOR+
              prefix/suffix states plus a blocked band, O(L w (m + D)); any length.
            - a full bias [heads, 2L - 1], b_(j-i) at index (j - i) + L - 1, by FFT or dense blocks
              (``toeplitz``). Cut a longer learned bias with :func:`slice_rpe_bias`.
        causal: query i sees keys j <= i only.
        key_padding_mask: bool [batch, length], True at padded keys. Padded positions are also
            dropped as queries (zero output rows), as in ``favor_attention``.
        toeplitz: full bias only: "fft" (O(L log L m D), the paper's algorithm), "dense" (O(L^2 (m + D))
            by blocks) or "auto" (bidirectional: the cheaper one by the flop model of q's device type,
            :func:`~protein_performer.ops.rpe.fft.use_fft`; causal: always dense). All agree in exact
            arithmetic; only dense is causal in floating point.
        block_size: windowed bias only: queries per block of the band product; None = the window
            w clamped to [16, 128]. The result does not depend on it.

    Returns:
        [batch, heads, length, v's head_dim] in v's dtype (features in float32, or float64 for
        float64 input); equals ``implied_rpe_attention(q, k, projection, rpe_bias, ...) @ v``. A query
        that sees no key gets a zero row. ``rpe_bias = 0`` gives ``favor_attention``.
    """
    check_rpe("favor_rpe_attention", q, k, v, projection, rpe_bias, key_padding_mask)
    if toeplitz not in ("auto", "fft", "dense"):
        raise ValueError(f"favor_rpe_attention: toeplitz must be 'auto', 'fft' or 'dense', got {toeplitz!r}.")
    windowed = isinstance(rpe_bias, WindowedBias)
    if windowed and toeplitz != "auto":
        raise ValueError(
            f"favor_rpe_attention: toeplitz={toeplitz!r} applies to a full [heads, 2L - 1] bias; a WindowedBias "
            "has one algorithm (leave toeplitz='auto')."
        )
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"favor_rpe_attention: block_size must be a positive integer or None, got {block_size!r}.")
    B, H, L, D = v.shape
    with torch.autocast(device_type=q.device.type, enabled=False):
        by_fft = not windowed and (
            toeplitz == "fft" or (toeplitz == "auto" and use_fft(L, projection.shape[0], D + 1, causal, q.device.type)))
        dtype = compute_dtype(q)
        # Zeroed at padding first, so junk there reaches no output and no gradient (0 * NaN would).
        q, k, value = (masked(x, key_padding_mask) for x in (q, k, v.to(dtype)))
        # A column of ones turns the same product into the denominator (padded keys have phi_k = 0).
        w = torch.cat([value, value.new_ones(B, H, L, 1)], dim=-1)  # (B, H, L, D + 1)
        if windowed:  # features built inside, straight into the block layout
            block = default_block_size(rpe_bias.window) if block_size is None else block_size
            c = windowed_weights(rpe_bias, causal, dtype)
            product = windowed_attention_product(q.to(dtype), k.to(dtype), w, c, projection.to(dtype),
                                                 key_padding_mask, causal, block)
        else:
            # The dense path reads causal keys through running offsets; the FFT needs one shared offset.
            phi_q, phi_k, key_offset = rpe_features(q, k, projection, key_padding_mask, running=causal and not by_fft)
            m = phi_q.shape[-1]
            args = (phi_q.reshape(B * H, L, m), phi_k.reshape(B * H, L, m), w.reshape(B * H, L, D + 1))
            if by_fft:
                product = toeplitz_fft(*args, relative_weights(rpe_bias, causal, FFT_DTYPE))
            else:
                offset = None if key_offset is None else key_offset.reshape(B * H, L)
                product = toeplitz_dense(*args, relative_weights(rpe_bias, causal, dtype), offset, causal)
        product = product.view(B, H, L, D + 1)
        numerator, denominator = product[..., :D], product[..., D]
        # A zero denominator (no visible key) comes with a zero numerator: return a zero row, not NaN.
        out = numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))[..., None]
    return out.to(v.dtype)
