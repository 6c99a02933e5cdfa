"""Exact softmax attention, materialised: the O(L^2) matrix softmax(q k^T / sqrt(d)) and its masks.

The reference of :func:`~protein_performer.ops.softmax.attention.softmax_attention` (SDPA) and the
attention maps of short sequences.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from protein_performer.ops._checks import check_key_padding_mask

__all__ = ["allowed_keys", "check_query_key", "silent_queries", "softmax_attention_weights"]


def check_query_key(q: Tensor, k: Tensor, key_padding_mask: Tensor | None, where: str) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"{where}: q and k must be [batch, heads, length, head_dim], got {tuple(q.shape)} and "
            f"{tuple(k.shape)}; split heads before calling (e.g. x.view(B, L, H, D).transpose(1, 2))."
        )
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{where}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch/heads/dim.")
    check_key_padding_mask(where, key_padding_mask, k.shape[0], k.shape[2])


def allowed_keys(
    q_len: int, k_len: int, causal: bool, key_padding_mask: Tensor | None, device: torch.device
) -> Tensor | None:
    """Bool mask broadcastable to [batch, heads, q_len, k_len], True where a query may see a key."""
    allowed = None
    if causal:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        allowed = keep if allowed is None else keep & allowed
    return allowed


def silent_queries(allowed: Tensor, key_padding_mask: Tensor | None, q_len: int) -> Tensor:
    """Bool, broadcastable to [batch, heads, q_len, 1]: the queries whose rows are zero. Those that see no
    key, and in self-attention (q_len equal to the keys' length) the padded positions themselves."""
    silent = ~allowed.any(dim=-1, keepdim=True)
    if key_padding_mask is not None and q_len == key_padding_mask.shape[1]:
        silent = silent | key_padding_mask[:, None, :, None]
    return silent


def softmax_attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The materialised attention matrix softmax(q k^T / sqrt(d)), for attention maps of short sequences.

    Args:
        q, k: [batch, heads, length, head_dim].
        causal, key_padding_mask: as in :func:`~protein_performer.ops.softmax_attention`.

    Returns:
        [batch, heads, q_length, k_length]; each row sums to 1, except zero rows for queries that see no
        key and (self-attention) padded queries.
    """
    check_query_key(q, k, key_padding_mask, "softmax_attention_weights")
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    allowed = allowed_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    if allowed is None:
        return scores.softmax(dim=-1)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return weights.masked_fill(silent_queries(allowed, key_padding_mask, q.shape[2]), 0.0)
