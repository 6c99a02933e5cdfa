"""Causal FAVOR+ one token at a time (generation): a constant-size state, the parallel outputs."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from protein_performer.ops._checks import compute_dtype
from protein_performer.ops.favor.features import (
    Kernel,
    check_favor,
    relu_kernel_features,
    softmax_kernel_features,
    softmax_logits,
)
from protein_performer.ops.stabilise import decay, safe_divide

__all__ = ["FavorState", "favor_causal_step"]


class FavorState(NamedTuple):
    """Causal FAVOR+ state after t tokens.

    kv: [B, H, m, D] sum of phi(k_j) v_j^T; k_sum: [B, H, m] sum of phi(k_j); both relative to
    ``offset`` [B, H], the running max key logit (softmax kernel; zeros for ReLU).
    """

    kv: Tensor
    k_sum: Tensor
    offset: Tensor


def favor_causal_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    projection: Tensor,
    state: FavorState | None = None,
    *,
    kernel: Kernel = "softmax",
) -> tuple[Tensor, FavorState]:
    """One token of causal FAVOR+: the output at position t given the state of tokens < t.

    Args:
        q_t, k_t, v_t: [batch, heads, head_dim], the new token.
        projection: [nb_features, head_dim], the same as for the parallel pass.
        state: returned by the previous step; None before the first token.
        kernel: "softmax" or "relu".

    Returns:
        (out_t [batch, heads, head_dim] in v_t's dtype, new state). Feeding a sequence token by token
        reproduces ``favor_attention(..., causal=True)``.
    """
    check_favor("favor_causal_step", q_t[:, :, None], k_t[:, :, None], v_t[:, :, None], projection, kernel, None)
    with torch.autocast(device_type=q_t.device.type, enabled=False):
        dtype = compute_dtype(q_t)
        q, k, v, w = q_t.to(dtype)[:, :, None], k_t.to(dtype)[:, :, None], v_t.to(dtype), projection.to(dtype)
        B, H, D = v.shape
        m = w.shape[0]
        if state is None:
            state = FavorState(v.new_zeros(B, H, m, D), v.new_zeros(B, H, m), v.new_full((B, H), float("-inf")))
        if kernel == "relu":
            query = relu_kernel_features(q, w)[:, :, 0]
            key = relu_kernel_features(k, w)[:, :, 0]
            offset = torch.zeros_like(state.offset)
            kv, k_sum = state.kv, state.k_sum
        else:
            query = softmax_kernel_features(q, w, is_query=True)[:, :, 0]  # (B, H, m)
            logits = softmax_logits(k, w)[:, :, 0]  # (B, H, m)
            offset = torch.maximum(state.offset, logits.amax(dim=-1))
            key = torch.exp(logits - offset[..., None])
            shrink = decay(offset, state.offset)
            kv, k_sum = state.kv * shrink[..., None, None], state.k_sum * shrink[..., None]
        kv = kv + key[..., :, None] * v[..., None, :]
        k_sum = k_sum + key
        numerator = (query[..., None, :] @ kv).squeeze(-2)  # (B, H, D)
        denominator = (query * k_sum).sum(dim=-1)
        out = safe_divide(numerator, denominator)
    return out.to(v_t.dtype), FavorState(kv, k_sum, offset)
