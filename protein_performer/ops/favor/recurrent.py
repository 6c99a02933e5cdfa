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

__all__ = ["FavorState", "absorb_key", "favor_causal_step"]


class FavorState(NamedTuple):
    """Causal FAVOR+ state after t tokens.

    kv: [B, H, m, D] sum of phi(k_j) v_j^T; k_sum: [B, H, m] sum of phi(k_j); both relative to
    ``offset`` [B, H], the running max key logit (softmax kernel; zeros for ReLU).
    """

    kv: Tensor
    k_sum: Tensor
    offset: Tensor


def absorb_key(state: FavorState, logits: Tensor, v: Tensor) -> FavorState:
    """Add one key (softmax-kernel feature logits [B, H, m], value [B, H, D]) to a state, moving it to the
    new running offset max(offset, max logits) first (a factor <= 1)."""
    offset = torch.maximum(state.offset, logits.amax(dim=-1))
    key = torch.exp(logits - offset[..., None])
    shrink = decay(offset, state.offset)
    kv = torch.addcmul(state.kv * shrink[..., None, None], key[..., :, None], v[..., None, :])
    return FavorState(kv, state.k_sum * shrink[..., None] + key, offset)


def favor_causal_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    projection: Tensor,
    state: FavorState | None = None,
    *,
    kernel: Kernel = "softmax",
    oprf_a: Tensor | None = None,
) -> tuple[Tensor, FavorState]:
    """One token of causal FAVOR+: the output at position t given the state of tokens < t.

    Args:
        q_t, k_t, v_t: [batch, heads, head_dim], the new token.
        projection: [nb_features, head_dim], the same as for the parallel pass.
        state: returned by the previous step; None before the first token.
        kernel: "softmax" or "relu".
        oprf_a: FAVOR++'s coefficient A ([batch, heads] or [heads]), the same at every step; None: FAVOR+.

    Returns:
        (out_t [batch, heads, head_dim] in v_t's dtype, new state). Feeding a sequence token by token
        reproduces ``favor_attention(..., causal=True)``.
    """
    check_favor("favor_causal_step", q_t[:, :, None], k_t[:, :, None], v_t[:, :, None], projection, kernel, None,
                oprf_a)
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
            state = FavorState(state.kv + key[..., :, None] * v[..., None, :], state.k_sum + key,
                               torch.zeros_like(state.offset))
        else:
            a = None if oprf_a is None else oprf_a.detach().to(dtype)
            query = softmax_kernel_features(q, w, is_query=True, oprf_a=a)[:, :, 0]  # (B, H, m)
            state = absorb_key(state, softmax_logits(k, w, a)[:, :, 0], v)
        kv, k_sum, offset = state
        numerator = (query[..., None, :] @ kv).squeeze(-2)  # (B, H, D)
        denominator = (query * k_sum).sum(dim=-1)
        out = safe_divide(numerator, denominator)
    return out.to(v_t.dtype), FavorState(kv, k_sum, offset)
