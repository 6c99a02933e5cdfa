"""Exact softmax attention: the O(L^2) baseline every approximation is measured against.

All tensors are ``[batch, heads, length, head_dim]``. Queries and keys arrive unscaled; the softmax
temperature ``1/sqrt(head_dim)`` is applied here. ``key_padding_mask`` is bool ``[batch, length]``,
True at padding (the ``nn.MultiheadAttention`` convention). Padding is invisible whatever it holds
(even inf or NaN): padded keys add nothing, and in self-attention (equal lengths) a padded position's
own output row is zero, as in every other kind. A query that can see no key at all (every key padded,
or padded and in its future) gets a zero output row, never NaN.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from protein_performer.ops.softmax.reference import allowed_keys, check_query_key, silent_queries
from protein_performer.ops.stabilise import masked

__all__ = ["softmax_attention"]


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
        [batch, heads, length, head_dim]; rows of padded queries and of queries that see no key are zero.
    """
    check_query_key(q, k, key_padding_mask, "softmax_attention")
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # Zeroed at padding first, so junk there reaches no output and no gradient (0 * NaN would).
    if q.shape[2] == k.shape[2]:
        q = masked(q, key_padding_mask)
    k, v = masked(k, key_padding_mask), masked(v, key_padding_mask)
    allowed = allowed_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    # Older torch versions return NaN for rows with no visible key; those and padded rows are zero.
    return out.masked_fill(silent_queries(allowed, key_padding_mask, q.shape[2]), 0.0)
