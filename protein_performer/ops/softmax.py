"""Exact softmax attention: the O(L^2) baseline every approximation is measured against.

All tensors are ``[batch, heads, length, head_dim]``. Queries and keys arrive unscaled; the softmax
temperature ``1/sqrt(head_dim)`` is applied here. ``key_padding_mask`` is bool ``[batch, length]``,
True at padding (the ``nn.MultiheadAttention`` convention). A query that can see no key at all (every
key padded, or padded and in its future) gets a zero output row, never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from protein_performer.ops._checks import check_key_padding_mask

__all__ = ["softmax_attention", "softmax_attention_weights"]


def _check_qk(q: Tensor, k: Tensor, key_padding_mask: Tensor | None, where: str) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"{where}: q and k must be [batch, heads, length, head_dim], got {tuple(q.shape)} and "
            f"{tuple(k.shape)}; split heads before calling (e.g. x.view(B, L, H, D).transpose(1, 2))."
        )
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{where}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch/heads/dim.")
    check_key_padding_mask(where, key_padding_mask, k.shape[0], k.shape[2])


def _allowed(
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


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Exact attention softmax(q k^T / sqrt(d)) v through ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q, k, v: [batch, heads, length, head_dim].
        causal: query i sees keys j <= i only.
        key_padding_mask: bool [batch, length], True at padded keys.

    Returns:
        [batch, heads, length, head_dim]; rows that see no key are zero.
    """
    _check_qk(q, k, key_padding_mask, "softmax_attention")
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    allowed = _allowed(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    # Older torch versions return NaN for rows with no visible key; pin them to zero.
    sees_nothing = ~allowed.any(dim=-1, keepdim=True)
    return out.masked_fill(sees_nothing, 0.0)


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
        causal, key_padding_mask: as in :func:`softmax_attention`.

    Returns:
        [batch, heads, q_length, k_length]; each row sums to 1 (or is zero if it sees no key).
    """
    _check_qk(q, k, key_padding_mask, "softmax_attention_weights")
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    allowed = _allowed(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    if allowed is None:
        return scores.softmax(dim=-1)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
