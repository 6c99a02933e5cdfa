"""Causal windowed favor_rpe one token at a time (generation): the last w keys plus the far prefix state."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from protein_performer.ops._checks import compute_dtype
from protein_performer.ops.favor.features import softmax_kernel_features, softmax_logits
from protein_performer.ops.rpe.bias import WindowedBias, check_windowed_bias, windowed_weights
from protein_performer.ops.stabilise import safe_divide

__all__ = ["WindowedState", "favor_rpe_causal_step"]


class WindowedState(NamedTuple):
    """Causal windowed favor_rpe after t tokens.

    keys: [B, H, <= w, m] features of the last (up to) w keys, key j relative to its own running
    offset; values: [B, H, <= w, D]; key_offsets: [B, H, <= w] those offsets M_j.
    far_kv: [B, H, m, D + 1] sum of phi(k_j) [v_j, 1]^T over keys j <= t - w, relative to far_offset
    [B, H] (the running offset of the newest of them; -inf before any).
    """

    keys: Tensor
    values: Tensor
    key_offsets: Tensor
    far_kv: Tensor
    far_offset: Tensor


def favor_rpe_causal_step(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, projection: Tensor, rpe_bias: WindowedBias,
    state: WindowedState | None = None,
) -> tuple[Tensor, WindowedState]:
    """One token of causal windowed favor_rpe: the output at position t given the state of tokens < t.

    Args:
        q_t, k_t, v_t: [batch, heads, head_dim], the new token.
        projection: [nb_features, head_dim], as for the parallel pass.
        rpe_bias: the :class:`WindowedBias` of the parallel pass.
        state: returned by the previous step; None before the first token.

    Returns:
        (out_t [batch, heads, head_dim] in v_t's dtype, new state): the band's last w keys plus the
        far prefix, O(w m + m D) memory per head. Feeding a sequence token by token reproduces
        ``favor_rpe_attention(..., rpe_bias, causal=True)``.
    """
    check_windowed_bias("favor_rpe_causal_step", rpe_bias, q_t.shape[1])
    with torch.autocast(device_type=q_t.device.type, enabled=False):
        dtype = compute_dtype(q_t)
        q, k, v, projection = q_t.to(dtype), k_t.to(dtype), v_t.to(dtype), projection.to(dtype)
        B, H, D = v.shape
        m = projection.shape[0]
        window = rpe_bias.window
        if state is None:
            state = WindowedState(v.new_zeros(B, H, 0, m), v.new_zeros(B, H, 0, D), v.new_zeros(B, H, 0),
                                  v.new_zeros(B, H, m, D + 1), v.new_full((B, H), -math.inf))
        query = softmax_kernel_features(q[:, :, None], projection, is_query=True)[:, :, 0]  # (B, H, m)
        logits = softmax_logits(k[:, :, None], projection)[:, :, 0]  # (B, H, m)
        previous = state.key_offsets[..., -1] if state.key_offsets.shape[-1] else torch.full_like(logits[..., 0],
                                                                                                   -math.inf)
        offset = torch.maximum(previous, logits.amax(dim=-1))  # M_t
        keys = torch.cat([state.keys, torch.exp(logits - offset[..., None])[:, :, None]], dim=2)
        values = torch.cat([state.values, v[:, :, None]], dim=2)
        key_offsets = torch.cat([state.key_offsets, offset[..., None]], dim=2)
        far_kv, far_offset = state.far_kv, state.far_offset
        if keys.shape[2] > window:  # key t - w leaves the band for the far state
            leaving = torch.cat([values[:, :, 0], values.new_ones(B, H, 1)], dim=-1)  # (B, H, D + 1)
            new_offset = key_offsets[:, :, 0]
            shrink = torch.exp((far_offset - new_offset).clamp(max=0.0))
            far_kv = far_kv * shrink[..., None, None] + keys[:, :, 0, :, None] * leaving[:, :, None, :]
            far_offset = new_offset
            keys, values, key_offsets = keys[:, :, 1:], values[:, :, 1:], key_offsets[:, :, 1:]
        c = windowed_weights(rpe_bias, True, dtype)  # (H, 2w + 1)
        band = c[:, 1 + window - keys.shape[2] : 1 + window]  # offsets -(n-1) .. 0, oldest first
        weights = (keys @ query[..., None])[..., 0] * band * torch.exp(key_offsets - offset[..., None])  # (B, H, n)
        augmented = torch.cat([values, values.new_ones(B, H, values.shape[2], 1)], dim=-1)
        total = (weights[:, :, None, :] @ augmented)[:, :, 0]  # (B, H, D + 1)
        far_read = c[:, 0] * torch.exp((far_offset - offset).clamp(max=0.0))  # (B, H); far_kv = 0 before any
        total = total + far_read[..., None] * (query[:, :, None, :] @ far_kv)[:, :, 0]
        out = safe_divide(total[..., :D], total[..., D])
    return out.to(v_t.dtype), WindowedState(keys, values, key_offsets, far_kv, far_offset)
