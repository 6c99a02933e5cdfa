"""FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021): softmax attention
estimated with positive orthogonal random features, in time and memory linear in the sequence length.

All tensors are ``[batch, heads, length, head_dim]``; a projection is ``[nb_features, head_dim]``;
``key_padding_mask`` is bool ``[batch, length]``, True at padding.

Stabilisers (`ops.stabilise`, `ops.favor.features`): queries divided by their row max; bidirectional
keys by the max over all valid keys; causal keys by the running max M_j over keys j <= i only, rescaled
by exp(M_j - M_i) <= 1 when query i reads key j, so no statistic of a future key can reach an earlier
output, not even through rounding or underflow (the reference JAX code takes a max over the whole
sequence, which leaks the future).
Padding. Padded keys are zeroed in the features and in v by masked_fill (a select, not a product,
so inf/NaN junk cannot leak), adding nothing to numerators or denominators; they are excluded from
the stabilisers too. Padded positions are also dropped as queries: their output rows are zero.

Fast path: features built in place (`inplace_softmax_features`), linear attention with hand-written
backward passes (`ops.favor.linear`), long inputs in chunks of (batch, head) rows (`ops.favor.rows`). References: `ops.favor.reference`. Everything runs in float32 (or
float64 when given float64) even under bf16/fp16 autocast; the output is cast back to the dtype of ``v``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from protein_performer.ops._checks import compute_dtype
from protein_performer.ops.favor.features import (
    RELU_EPS,
    Kernel,
    check_favor,
    inplace_softmax_features,
    oprf_input_scale,
)
from protein_performer.ops.favor.linear import DEFAULT_CHUNK_SIZE, linear_backward, linear_forward
from protein_performer.ops.favor.reference import favor_attention_reference
from protein_performer.ops.favor.rows import map_row_chunks, rows_per_chunk
from protein_performer.ops.stabilise import key_gradient, zero_at_padding

__all__ = ["favor_attention"]


def _no_autocast(like: Tensor) -> torch.autocast:
    """Autocast off on `like`'s device. The Functions below run forward with autocast off (inside
    favor_attention); backward runs under whatever autocast the caller's thread has, e.g. a user's
    loop calling backward inside the autocast region, so it turns autocast off again itself."""
    return torch.autocast(device_type=like.device.type, enabled=False)


class _LinearAttention(torch.autograd.Function):
    """Normalised linear attention on given features (the ReLU kernel; features via autograd)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, causal: bool, chunk_size: int) -> Tensor:
        out, saved = linear_forward(query, key, value, None, causal, chunk_size)
        ctx.save_for_backward(*saved)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with _no_autocast(grad_out):
            saved = ctx.saved_tensors
            return (*linear_backward(saved, grad_out.to(saved[0].dtype), ctx.causal), None, None)


class _SoftmaxFavor(torch.autograd.Function):
    """FAVOR+ with positive softmax features from q, k, v [B, H, L, D] and a projection [m, D].

    Forward builds the stabilised features in place (:func:`inplace_softmax_features`) and runs
    linear attention; backward chains the hand-written linear-attention backward through exp() (whose
    derivative is the saved feature itself) and the projection matmuls. Padded positions (v already
    zeroed by the caller) get exactly zero gradients. The projection gets no gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, projection, key_padding_mask, causal: bool, chunk_size: int, oprf_a) -> Tensor:
        query, key, offset, k_scaled, w_query, w_key = inplace_softmax_features(
            q, k, projection, key_padding_mask, running=causal, oprf_a=oprf_a)
        out, saved = linear_forward(query, key, v, offset, causal, chunk_size)
        ctx.save_for_backward(query, key, k_scaled, w_query, w_key, key_padding_mask, *saved)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with _no_autocast(grad_out):
            return _SoftmaxFavor._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        query, key, k_scaled, w_query, w_key, key_padding_mask, *saved = ctx.saved_tensors
        grad_query, grad_key, grad_v = linear_backward(tuple(saved), grad_out.to(query.dtype), ctx.causal)
        grad_q = grad_query.mul_(query) @ w_query.T  # d exp(x) = exp(x) dx
        grad_k_aug = grad_key.mul_(key) @ w_key.T  # [dL W, -sum_m dL]
        grad_k = key_gradient(grad_k_aug, k_scaled)
        zero_at_padding(key_padding_mask, grad_q, grad_k, grad_v)
        return grad_q, grad_k, grad_v, None, None, None, None, None


def _relu_features(q: Tensor, k: Tensor, projection: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """ReLU(W x') + eps for queries and keys, zero at padding (autograd)."""
    w = projection.T * q.shape[-1] ** -0.25
    query, key = torch.relu(q @ w) + RELU_EPS, torch.relu(k @ w) + RELU_EPS
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :, None]
        query, key = query.masked_fill(pad, 0.0), key.masked_fill(pad, 0.0)
    return query, key


def favor_attention(
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
    """FAVOR+ attention: D^-1 phi(Q) (phi(K)^T V) with D = diag(phi(Q) phi(K)^T 1).

    Args:
        q, k, v: [batch, heads, length, head_dim] (q, k unscaled).
        projection: [nb_features, head_dim], e.g. from :func:`gaussian_orthogonal_random_matrix`.
            A projection that requires grad is differentiated too (through the plain-autograd path).
        causal: query i sees keys j <= i only (chunked prefix sums, O(L m D) time, memory linear in L).
        kernel: "softmax" (positive random features) or "relu" (generalized kernel).
        key_padding_mask: bool [batch, length], True at padded keys. Padded positions are also
            dropped as queries: their output rows (and their gradients) are zero.
        chunk_size: block length of the causal path (any length L works, not only multiples).
        oprf_a: FAVOR++ (OPRF) features with this coefficient A, [batch, heads] or [heads], e.g.
            ``oprf_coefficient(oprf_statistic(q, k, mask), head_dim)``; a constant of the estimator (no
            gradient). None: FAVOR+'s positive features. Softmax kernel only.

    Returns:
        [batch, heads, length, head_dim] in v's dtype; equals ``implied_attention(q, k, projection) @ v``.
    """
    check_favor("favor_attention", q, k, v, projection, kernel, key_padding_mask, oprf_a)
    if chunk_size < 1:
        raise ValueError(f"favor_attention: chunk_size must be >= 1, got {chunk_size}.")
    if kernel == "softmax" and projection.requires_grad and torch.is_grad_enabled():
        return favor_attention_reference(
            q, k, v, projection, causal=causal, kernel=kernel, key_padding_mask=key_padding_mask, chunk_size=chunk_size,
            oprf_a=oprf_a)
    L, m = q.shape[2], projection.shape[0]
    # chunks of (batch, head) rows (ops.favor.rows): the largest fresh tensors are the [L, m] features and,
    # causally, the chunk states [L / chunk, m, D + 1]
    per_row = L * m * max(1, -(-(v.shape[-1] + 1) // chunk_size) if causal else 1)
    rows = rows_per_chunk(per_row, compute_dtype(q))
    return map_row_chunks(lambda qc, kc, vc, mask, a: _favor_rows(qc, kc, vc, projection, causal, kernel, mask,
                                                                   chunk_size, a),
                          rows, q, k, v, key_padding_mask, oprf_a)


def _favor_rows(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, causal: bool, kernel: Kernel,
                key_padding_mask: Tensor | None, chunk_size: int, oprf_a: Tensor | None) -> Tensor:
    """:func:`favor_attention`'s fast path on one chunk of (batch, head) rows (arguments checked)."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        dtype = compute_dtype(q)
        L = q.shape[2]
        qc, kc, vc, w = q.to(dtype), k.to(dtype), v.to(dtype), projection.to(dtype)
        if oprf_a is not None:
            oprf_a = oprf_a.detach().to(dtype)
            qc, kc = qc * oprf_input_scale(oprf_a), kc * oprf_input_scale(oprf_a)
        if key_padding_mask is not None:
            vc = vc.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        chunk_size = min(chunk_size, max(L, 1))  # a short sequence is one chunk, not a padded one
        tail = -L % chunk_size if causal else 0
        if tail:
            # Zero positions after the end are in every real query's future: they need no mask.
            qc, kc, vc = (torch.nn.functional.pad(t, (0, 0, 0, tail)) for t in (qc, kc, vc))
            if key_padding_mask is not None:
                key_padding_mask = torch.nn.functional.pad(key_padding_mask, (0, tail), value=True)
        if kernel == "softmax":
            out = _SoftmaxFavor.apply(qc, kc, vc, w.detach(), key_padding_mask, causal, chunk_size, oprf_a)
        else:
            query, key = _relu_features(qc, kc, w, key_padding_mask)
            out = _LinearAttention.apply(query, key, vc, causal, chunk_size)
    return out[:, :, :L].to(v.dtype)
