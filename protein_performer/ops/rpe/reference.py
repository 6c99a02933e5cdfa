"""The dense O(L^2) reference of favor_rpe: the row-normalised matrix every fast path applies to V.

A_ij = c_ij phi(q_i).phi(k_j) / sum_j' c_ij' phi(q_i).phi(k_j'), c_ij = exp(b_(j-i)), with the
features of FAVOR+ (`ops.favor.features`): one shared key offset bidirectionally, the running offset M_j
causally (read with exp(M_j - M_i), as the dense path does).
"""
from __future__ import annotations

import torch
from torch import Tensor

from protein_performer.ops._checks import check_key_padding_mask, check_projection, check_self_attention
from protein_performer.ops.favor.features import favor_features
from protein_performer.ops.rpe.bias import WindowedBias, check_windowed_bias, expand_windowed_bias, relative_weights
from protein_performer.ops.stabilise import decay

__all__ = ["check_rpe", "implied_rpe_attention", "rpe_features"]


def check_rpe(where: str, q: Tensor, k: Tensor, v: Tensor | None, projection: Tensor,
              rpe_bias: Tensor | WindowedBias, key_padding_mask: Tensor | None) -> None:
    check_self_attention(where, q, k, v)
    check_projection(where, projection, q.shape[-1])
    heads, length = q.shape[1], q.shape[2]
    if isinstance(rpe_bias, WindowedBias):
        check_windowed_bias(where, rpe_bias, heads)
    elif not isinstance(rpe_bias, Tensor) or rpe_bias.shape != (heads, 2 * length - 1):
        shape = tuple(rpe_bias.shape) if isinstance(rpe_bias, Tensor) else type(rpe_bias).__name__
        raise ValueError(
            f"{where}: rpe_bias must be [heads, 2L - 1] = {(heads, 2 * length - 1)} (the full form) or a "
            f"WindowedBias, got {shape}; a full bias sized for a longer max_length is cut with "
            "slice_rpe_bias(rpe_bias, L)."
        )
    check_key_padding_mask(where, key_padding_mask, k.shape[0], length)


def rpe_features(
    q: Tensor, k: Tensor, projection: Tensor, key_padding_mask: Tensor | None, *, running: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """FAVOR+ softmax-kernel features (:func:`favor_features`), both zero at padding (padded queries get zero rows, as in
    ``favor_attention``); call with autocast off.

    Returns:
        phi_q [B, H, L, m], row-stabilised; phi_k [B, H, L, m]; key_offset [B, H, L] or None.
        ``running=False``: keys share one offset, the max over the valid keys (key_offset None).
        ``running=True`` (causal): key j is exp(logit_j - M_j) with M_j the running max over valid
        keys j' <= j (detached), returned as key_offset; the reader rescales by exp(M_j - M_i).
    """
    f = favor_features(q, k, None, projection, "softmax", running, key_padding_mask)
    return f.query, f.key, f.key_offset


def implied_rpe_attention(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    rpe_bias: Tensor | WindowedBias,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The row-normalised [L, L] matrix that :func:`favor_rpe_attention` applies to V, materialised.

    A_ij = c_ij phi(q_i).phi(k_j) / sum_j' c_ij' phi(q_i).phi(k_j'): the dense O(L^2) reference of the
    FFT, dense and windowed paths, and attention maps for short sequences. ``rpe_bias`` takes either
    form of :func:`favor_rpe_attention`; a WindowedBias is expanded to every offset first.

    Returns:
        [batch, heads, length, length] in float32 (float64 for float64 input); rows sum to 1 (zero rows
        for padded queries and for queries that see no key).
    """
    check_rpe("implied_rpe_attention", q, k, None, projection, rpe_bias, key_padding_mask)
    L = q.shape[2]
    if isinstance(rpe_bias, WindowedBias):
        rpe_bias = expand_windowed_bias(rpe_bias, L)
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q, phi_k, key_offset = rpe_features(q, k, projection, key_padding_mask, running=causal)
        c = relative_weights(rpe_bias, causal, phi_q.dtype)  # (H, 2L - 1)
        positions = torch.arange(L, device=q.device)
        offsets = positions[None, :] - positions[:, None] + L - 1  # (L, L): (j - i) + L - 1
        scores = (phi_q @ phi_k.transpose(-1, -2)) * c[:, offsets]  # (B, H, L, L)
        if key_offset is not None:  # causal: the same running-offset rescaling as the dense path
            scores = scores * decay(key_offset[..., :, None], key_offset[..., None, :])
        denominator = scores.sum(dim=-1, keepdim=True)
        return scores / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
