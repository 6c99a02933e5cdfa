"""FAVOR+ references, short and obviously right: what the fast path (`ops.favor.attention`) is held to.

- :func:`implied_attention`: the dense O(L^2) row-normalised matrix that FAVOR+ applies to V
  (also the attention maps of short sequences);
- :func:`favor_attention_reference`: the same linear-time computation as the fast path in plain
  autograd: two thin matmuls bidirectionally, a chunk-by-chunk loop with a running state causally.
Tests hold all three equal in float64, gradients too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from protein_performer.ops.favor.features import Features, Kernel, check_favor, favor_features
from protein_performer.ops.favor.linear import DEFAULT_CHUNK_SIZE
from protein_performer.ops.stabilise import decay, safe_divide

__all__ = ["bidirectional_reference", "causal_reference", "causal_sums", "favor_attention_reference", "implied_attention"]


def bidirectional_reference(f: Features) -> Tensor:
    """phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1): two thin matmuls, never an L x L matrix."""
    kv = f.key.transpose(-1, -2) @ f.value  # (B, H, m, D)
    k_sum = f.key.sum(dim=-2)  # (B, H, m)
    numerator = f.query @ kv  # (B, H, L, D)
    denominator = (f.query @ k_sum[..., None]).squeeze(-1)  # (B, H, L)
    return safe_divide(numerator, denominator)


def causal_reference(f: Features, chunk_size: int) -> Tensor:
    """Block-parallel causal linear attention, one chunk at a time: exact masked products inside a
    chunk, a running state S = sum phi(k) v^T, z = sum phi(k) across chunks (:func:`causal_sums`)."""
    return safe_divide(*causal_sums(f, chunk_size))


def causal_sums(f: Features, chunk_size: int) -> tuple[Tensor, Tensor]:
    """The numerator [B, H, L, D] and denominator [B, H, L] of causal linear attention, each query's
    relative to its own stabilisers (:func:`causal_reference` divides them).

    With a running key offset the carried state is kept relative to the offset at the end of the
    previous chunk and rescaled (factor <= 1) to each query's own offset.
    """
    B, H, L, m = f.query.shape
    D = f.value.shape[-1]
    S = f.value.new_zeros(B, H, m, D)
    z = f.value.new_zeros(B, H, m)
    state_offset = f.value.new_zeros(B, H) if f.key_offset is not None else None
    numerators, denominators = [], []
    # split once: a slice per chunk would cost its backward a zero-filled [B, H, L, m] tensor per chunk
    chunks = zip(*(x.split(chunk_size, dim=2) for x in (f.query, f.key, f.value)),
                 f.key_offset.split(chunk_size, dim=2) if f.key_offset is not None else [None] * L)
    for q, k, v, offset in chunks:
        scores = (q @ k.transpose(-1, -2)).tril()  # (B, H, C, C)
        inter_num = q @ S  # (B, H, C, D)
        inter_den = (q @ z[..., None]).squeeze(-1)  # (B, H, C)
        if offset is not None:  # (B, H, C)
            scores = scores * decay(offset[..., :, None], offset[..., None, :])
            to_query = decay(offset, state_offset[..., None])  # (B, H, C)
            inter_num = inter_num * to_query[..., None]
            inter_den = inter_den * to_query
            # Move the state to this chunk's final offset before adding the chunk's keys.
            end = offset[..., -1]
            k = k * decay(end[..., None], offset)[..., None]
            shrink = decay(end, state_offset)
            S = S * shrink[..., None, None]
            z = z * shrink[..., None]
            state_offset = end
        numerators.append(scores @ v + inter_num)
        denominators.append(scores.sum(dim=-1) + inter_den)
        S = S + k.transpose(-1, -2) @ v
        z = z + k.sum(dim=-2)
    return torch.cat(numerators, dim=2), torch.cat(denominators, dim=2)


def favor_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    causal: bool = False,
    kernel: Kernel = "softmax",
    key_padding_mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    oprf_a: Tensor | None = None,
) -> Tensor:
    """:func:`~protein_performer.ops.favor_attention` in plain autograd (its reference; same contract)."""
    check_favor("favor_attention", q, k, v, projection, kernel, key_padding_mask, oprf_a)
    with torch.autocast(device_type=q.device.type, enabled=False):
        oprf_a = None if oprf_a is None else oprf_a.detach()
        f = favor_features(q, k, v, projection, kernel, causal, key_padding_mask, oprf_a)
        out = causal_reference(f, chunk_size) if causal else bidirectional_reference(f)
    return out.to(v.dtype)


def implied_attention(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    *,
    causal: bool = False,
    kernel: Kernel = "softmax",
    key_padding_mask: Tensor | None = None,
    oprf_a: Tensor | None = None,
) -> Tensor:
    """The row-normalised [L, L] matrix that FAVOR+ (FAVOR++ with ``oprf_a``) applies to V, materialised
    (O(L^2) memory).

    For attention maps of short sequences and as the dense reference of :func:`favor_attention`.

    Returns:
        [batch, heads, length, length], float32 (float64 for float64 input); rows sum to 1 (or are zero
        where a query sees no key).
    """
    check_favor("implied_attention", q, k, None, projection, kernel, key_padding_mask, oprf_a)
    with torch.autocast(device_type=q.device.type, enabled=False):
        oprf_a = None if oprf_a is None else oprf_a.detach()
        f = favor_features(q, k, None, projection, kernel, causal, key_padding_mask, oprf_a)
        scores = f.query @ f.key.transpose(-1, -2)  # (B, H, L, L)
        if causal:
            scores = scores.tril()
        if f.key_offset is not None:
            scores = scores * decay(f.key_offset[..., :, None], f.key_offset[..., None, :])
        denominator = scores.sum(dim=-1)
        return scores / torch.where(denominator > 0, denominator, torch.ones_like(denominator))[..., None]
