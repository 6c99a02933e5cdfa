"""FAVOR+ whose exact band is taken in another order than the input's (``attention.band_order=member``).

``order`` [B, L] lists the input positions in the order the band is taken in (the layer sorts tokens by
their position within their homolog-window member, so residues at nearby member positions of every
member sit together). With r(i) the rank of position i in that order and b(i) = r(i) // w:

    weight_ij = exp(q_i . k_j / sqrt(d))     for |b(i) - b(j)| <= 1   (causal: and j <= i, input order)
    weight_ij = phi(q_i) . phi(k_j)          otherwise                (FAVOR+, or FAVOR++ with ``oprf_a``)
    out_i = sum_j weight_ij v_j / sum_j weight_ij

Bidirectionally the estimate's sums do not depend on the order, so this is `favor_window_attention` on
the sorted tokens, unsorted again (its fast path). Causally the far sums must follow the input order
(key j <= i), so the band is corrected instead: the causal FAVOR+ sums over every key j <= i (plain
autograd, `ops.favor.reference.causal_sums`), then, for each query block of the sorted order and its
neighbour key blocks, the exact weights added and the feature estimate of the same pairs taken away.
O(L (m d + w m + w d)) time and memory; the correction's feature products ([w, 3 w] per block, m deep)
make it costlier than the sequence band. Every factor is <= 1: per query, mu_i = max(sigma_i, the band's
largest logit), sigma_i the log scale of its stabilised FAVOR+ sums; key j's features carry its running
offset M_j <= M_i. No statistic of a later key reaches a causal query.

Reference: :func:`implied_sorted_band_attention`, the dense [L, L] matrix.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from protein_performer.ops._checks import compute_dtype
from protein_performer.ops.favor.features import Features, check_favor, softmax_logits
from protein_performer.ops.favor.linear import DEFAULT_CHUNK_SIZE
from protein_performer.ops.favor.reference import causal_sums
from protein_performer.ops.favor.window import (
    _check_window,
    _neighbour_windows,
    _row_blocks,
    _row_neighbours,
    favor_window_attention,
    implied_window_attention,
)
from protein_performer.ops.stabilise import masked, running_key_offset, safe_divide

__all__ = ["favor_sorted_band_attention", "implied_sorted_band_attention", "sorted_band_support", "take_tokens"]


def take_tokens(x: Tensor, order: Tensor) -> Tensor:
    """x [batch, heads, length, ...] with its tokens (dim 2) taken in `order` [batch, length] of each row."""
    index = order[:, None, :].expand(x.shape[0], x.shape[1], -1)
    index = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(*index.shape, *x.shape[3:])
    return x.gather(2, index)


def _check_order(where: str, order: Tensor, batch: int, length: int) -> None:
    if order.dtype != torch.long or tuple(order.shape) != (batch, length):
        raise ValueError(f"{where}: order must be a long tensor [batch, length] = [{batch}, {length}], got "
                         f"{order.dtype} {list(order.shape)}.")


def sorted_band_support(order: Tensor, window: int, causal: bool) -> Tensor:
    """bool [B, 1, L, L]: the pairs weighted exactly, |r(i) // w - r(j) // w| <= 1 for ranks r in
    `order` (causal: and j <= i in the input order)."""
    block = order.argsort(dim=1) // window  # (B, L)
    support = (block[:, :, None] - block[:, None, :]).abs() <= 1
    if causal:
        support = support.tril()
    return support[:, None]


def favor_sorted_band_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    window: int,
    order: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    oprf_a: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Softmax attention exact on the neighbour blocks of w tokens in `order`, estimated by FAVOR+
    elsewhere (module docstring).

    Args:
        q, k, v: [batch, heads, length, head_dim] (q, k unscaled).
        projection: [nb_features, head_dim] (no gradient).
        window: w >= 1, the block length in the sorted order.
        order: long [batch, length], a permutation of 0 .. L - 1 per row: the input positions in band order.
            Padding should come last in it (the layer sorts it there), so that padding moves no block.
        causal: query i reads keys j <= i (input order) only.
        key_padding_mask: bool [batch, length], True at padding; padded queries get zero rows.
        oprf_a: FAVOR++'s A ([batch, heads] or [heads], detached); None: FAVOR+.
        chunk_size: block length of the causal FAVOR+ sums.

    Returns:
        [batch, heads, length, head_dim] in v's dtype; equals ``implied_sorted_band_attention(...) @ v``.
    """
    check_favor("favor_sorted_band_attention", q, k, v, projection, "softmax", key_padding_mask, oprf_a)
    _check_window("favor_sorted_band_attention", window)
    _check_order("favor_sorted_band_attention", order, q.shape[0], q.shape[2])
    if not causal:
        mask = None if key_padding_mask is None else key_padding_mask.gather(1, order)
        out = favor_window_attention(take_tokens(q, order), take_tokens(k, order), take_tokens(v, order), projection,
                                     window, key_padding_mask=mask, oprf_a=oprf_a)
        return take_tokens(out, order.argsort(dim=1))
    with torch.autocast(device_type=q.device.type, enabled=False):
        out = _causal(q, k, v, projection, window, order, key_padding_mask, oprf_a, chunk_size)
    return out.to(v.dtype)


def _causal(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, window: int, order: Tensor,
            key_padding_mask: Tensor | None, oprf_a: Tensor | None, chunk_size: int) -> Tensor:
    B, H, L, D = v.shape
    dtype = compute_dtype(q)
    projection = projection.detach().to(dtype)
    oprf_a = None if oprf_a is None else oprf_a.detach().to(dtype)
    q, k = (masked(x.to(dtype), key_padding_mask) for x in (q, k))
    w = masked(torch.cat([v.to(dtype), v.new_ones(B, H, L, 1, dtype=dtype)], dim=-1), key_padding_mask)

    # FAVOR+ sums over every key j <= i, input order, relative to exp(sigma_i)
    query_logits = softmax_logits(q, projection, oprf_a)  # (B, H, L, m)
    key_logits = softmax_logits(k, projection, oprf_a)
    query_max = query_logits.detach().amax(dim=-1)  # (B, H, L)
    key_offset = running_key_offset(key_logits, key_padding_mask)  # (B, H, L), M_j, detached
    query_features = torch.exp(query_logits - query_max[..., None])
    key_features = masked(torch.exp(key_logits - key_offset[..., None]), key_padding_mask)
    numerator, denominator = causal_sums(Features(query_features, key_features, w[..., :D], key_offset), chunk_size)
    sums = torch.cat([numerator, denominator[..., None]], dim=-1)  # (B, H, L, D + 1)
    sigma = query_max + key_offset - math.log(projection.shape[0])  # (B, H, L)

    # the band, in blocks of the sorted order: query block b against key blocks b - 1, b, b + 1
    rows, shifts = B * H, range(-1, 2)

    def blocks(x: Tensor) -> Tensor:  # (B, H, L, F) in input order -> (R, n, T, F) in band order
        return _row_blocks(take_tokens(x, order).reshape(rows, L, -1), window)

    def neighbours(x: Tensor) -> Tensor:  # -> (R, n, 3 T, F): each block's neighbour blocks (zeros off the ends)
        return _row_neighbours(blocks(x), shifts)

    def windows(x: Tensor) -> Tensor:  # -> (R n, F, 3 T): the same as an overlapping view (no copy); it reads
        return _neighbour_windows(blocks(x), shifts)  # other rows' edge blocks, which `allowed` masks

    index = torch.arange(L, device=q.device, dtype=dtype).expand(B, H, L)[..., None]  # input position
    valid = torch.ones(B, H, L, 1, dtype=dtype, device=q.device) if key_padding_mask is None else (
        (~key_padding_mask).to(dtype)[:, None, :, None].expand(B, H, L, 1))
    key_index, key_valid = neighbours(index + 1)[..., 0] - 1, neighbours(valid)[..., 0]  # (R, n, 3T); off the end: -1, 0
    query_index = blocks(index)  # (R, n, T, 1)
    allowed = (key_valid[:, :, None, :] > 0) & (key_index[:, :, None, :] <= query_index)  # (R, n, T, 3T)
    scale = D ** -0.25
    n = query_index.shape[1]
    shape = (rows, n, window, 3 * window)

    def band_product(queries: Tensor, keys: Tensor) -> Tensor:  # (B, H, L, F) each -> (R, n, T, 3T)
        return (blocks(queries).reshape(rows * n, window, -1) @ windows(keys)).view(shape)

    logits = band_product(q * scale, k * scale).masked_fill(~allowed, -math.inf)
    sigma_b = blocks(sigma[..., None])  # (R, n, T, 1)
    mu = torch.maximum(sigma_b, logits.amax(dim=-1, keepdim=True)).detach()
    # the estimate of the same pairs: phi_i . phi_j = F_i . F_j exp(sigma_i) exp(M_j - M_i), M_j <= M_i
    offsets = (neighbours(key_offset[..., None])[..., 0][:, :, None, :] - blocks(key_offset[..., None])).clamp(max=0)
    estimate = band_product(query_features, key_features) * torch.exp(offsets + sigma_b - mu)
    weights = torch.exp(logits - mu) - estimate.masked_fill(~allowed, 0.0)
    correction = (weights.view(rows * n, window, -1) @ windows(w).transpose(-1, -2)).view(*shape[:3], -1)
    total = blocks(sums) * torch.exp(sigma_b - mu) + correction
    out = safe_divide(total[..., :D], total[..., D])  # (R, n, T, D), band order
    out = out.reshape(rows, -1, D)[:, :L].reshape(B, H, L, D)
    return masked(take_tokens(out, order.argsort(dim=1)), key_padding_mask)


def implied_sorted_band_attention(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    window: int,
    order: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    oprf_a: Tensor | None = None,
) -> Tensor:
    """The row-normalised [B, H, L, L] matrix :func:`favor_sorted_band_attention` applies to v (its dense
    reference, and its attention maps): the sequence band's matrix of the sorted tokens, unsorted, which
    with ``causal`` is masked to j <= i and normalised again. Padded keys have zero weight, padded queries
    zero rows."""
    check_favor("implied_sorted_band_attention", q, k, None, projection, "softmax", key_padding_mask, oprf_a)
    _check_window("implied_sorted_band_attention", window)
    _check_order("implied_sorted_band_attention", order, q.shape[0], q.shape[2])
    mask = None if key_padding_mask is None else key_padding_mask.gather(1, order)
    # unnormalised first: the bidirectional matrix's rows carry one normaliser each, so masking to j <= i
    # and normalising again gives the causal matrix (the far estimate does not depend on which keys exist)
    matrix = implied_window_attention(take_tokens(q, order), take_tokens(k, order), projection, window,
                                      key_padding_mask=mask, oprf_a=oprf_a)
    inverse = order.argsort(dim=1)
    matrix = take_tokens(take_tokens(matrix, inverse).transpose(-1, -2), inverse).transpose(-1, -2)
    if causal:
        matrix = matrix.tril()
        total = matrix.sum(dim=-1, keepdim=True)
        matrix = matrix / torch.where(total > 0, total, torch.ones_like(total))
    return matrix
