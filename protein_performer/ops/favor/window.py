"""FAVOR+ with an exact local band (``exact_window`` w): exact softmax weights near the diagonal, the
random-feature estimate beyond, one shared normaliser (Scatterbrain's sparse + low-rank split, Chen et
al. 2021, with a band as the sparse support: contacts and secondary structure are local).

The exact support is whole blocks of w positions: with b(i) = i // w,

    weight_ij = exp(q_i . k_j / sqrt(d))     for |b(i) - b(j)| <= 1   (causal: and j <= i)
    weight_ij = phi(q_i) . phi(k_j)          otherwise                (FAVOR+, or FAVOR++ with ``oprf_a``)
    out_i = sum_j weight_ij v_j / sum_j weight_ij

which includes every |i - j| < w (and some pairs up to 2 w - 1 apart).

Fast paths, O(L (w d + m d)):
- bidirectional: one autograd Function with a hand-written backward (`ops.favor.window_bidirectional`):
  per query block b, the FAVOR+ state of all keys minus the states of key blocks b - 1, b, b + 1, and the
  exact weights of those three blocks, accumulated into one numerator;
- causal: the far part is the lagged prefix state of blocks <= b - 2 (the far terms of the windowed
  favor_rpe product, `ops.rpe.window`, its band skipped: running offsets, hand-written backward); the exact
  part each query block against the previous and its own key block, logits [w, 2 w] (j <= i), one autograd
  Function (:class:`_BandProduct`) whose backward forms the weights' gradient in place;
- long inputs run in chunks of (batch, head) rows (``_rows_per_chunk``), so that fresh tensors stay under
  glibc's mmap threshold and come from the heap instead of costing their page faults on every call.
The two halves live on different scales: the far product is relative to its stabilisers (query row max
c_i, key offset o_i: shared bidirectionally, the running M_i causally). Per query, the far part's log
scale is sigma_i = c_i + o_i - |q'_i|^2 / 2 + (d / 2) log(1 - 4A) - log m (only |q'_i|^2 / 2 carries a
gradient: the rest are stabilisers, which cancel inside the product); both halves are divided by
exp(mu_i), mu_i = max(sigma_i, max of the band logits), so every factor is <= 1. Causal queries read no
statistic of a later position (the band logits of later keys are masked before the max).

Reference: :func:`implied_window_attention`, the dense [L, L] matrix. Decoding:
:func:`favor_window_causal_step` (the raw keys of the current and previous block plus the far FAVOR+
state).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from protein_performer.ops._checks import compute_dtype
from protein_performer.ops.favor.features import (
    check_favor,
    oprf_input_scale,
    softmax_kernel_features,
    softmax_logits,
)
from protein_performer.ops.favor.recurrent import FavorState, absorb_key
from protein_performer.ops.favor.rows import map_row_chunks, rows_per_chunk
from protein_performer.ops.favor.window_bidirectional import bidirectional_window_rows
from protein_performer.ops.rpe.window import windowed_attention_product
from protein_performer.ops.stabilise import masked, running_max, safe_divide, shared_key_offset

__all__ = ["WindowState", "exact_support", "favor_window_attention", "favor_window_causal_step",
           "implied_window_attention"]


def _check_window(where: str, window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"{where}: window (exact_window) must be a positive integer, got {window!r}.")


def _log_far_scale(q: Tensor, k: Tensor, projection: Tensor, key_padding_mask: Tensor | None,
                   oprf_a: Tensor | None) -> Tensor:
    """sigma [B, H, L]: log of the factor taking the causal far product (running key offsets) to the kernel's
    scale (module docstring). q, k zero at padding, in the compute dtype."""
    D = q.shape[-1]
    m = projection.shape[0]
    q_scaled, k_scaled = q * D**-0.25, k * D**-0.25
    with torch.no_grad():  # the stabilisers: they cancel inside the product
        b = 1.0 if oprf_a is None else oprf_input_scale(oprf_a)
        query_max = ((q_scaled * b) @ projection.T).amax(dim=-1)
        key_logits = (k_scaled * b) @ projection.T - 0.5 * k_scaled.square().sum(dim=-1, keepdim=True)
        constant = -math.log(m)
        if oprf_a is not None:
            a = oprf_a[..., None, None]
            key_logits = key_logits + 2 * a * projection.square().sum(dim=-1)
            constant = constant + 0.5 * D * torch.log(1 - 4 * oprf_a)[..., None]
        key_offset = running_max(masked(key_logits, key_padding_mask, -math.inf).amax(dim=-1))
        stabilisers = query_max + key_offset + constant
    return stabilisers - 0.5 * q_scaled.square().sum(dim=-1)


def _band_mask(block: int, shifts: range, causal: bool, device: torch.device) -> Tensor:
    """bool [T, S T]: query t of a block may read key t' of the block ``shift`` away (every key of the
    neighbour blocks; causal: j <= i)."""
    allowed = torch.ones(block, len(shifts), block, dtype=torch.bool, device=device)
    if causal:  # shifts -1, 0: the previous block whole, the own block up to the query
        allowed[:, -1] = torch.ones(block, block, dtype=torch.bool, device=device).tril()
    return allowed.reshape(block, -1)


def exact_support(length: int, window: int, causal: bool, device: torch.device) -> Tensor:
    """bool [L, L]: the pairs weighted exactly, |i // w - j // w| <= 1 (causal: and j <= i)."""
    block = torch.arange(length, device=device) // window
    allowed = (block[:, None] - block[None, :]).abs() <= 1
    return allowed.tril() if causal else allowed


def _causal_far(q: Tensor, k: Tensor, w: Tensor, projection: Tensor, key_padding_mask: Tensor | None,
                oprf_a: Tensor | None, block: int) -> tuple[Tensor, Tensor]:
    """Causal far terms in blocks of ``block`` [R, n, T, E] (keys of blocks <= b - 2, relative to the
    stabilisers) and their log scale sigma [R, n, T, 1]: the windowed product's lagged prefix states with
    one neighbour block (window T + 1: r = 1, c = 1 before), its band skipped."""
    B, H, L, _ = q.shape
    sigma = _log_far_scale(q, k, projection, key_padding_mask, oprf_a)  # (B, H, L)
    ones = torch.ones(H, 1, dtype=q.dtype, device=q.device)  # filled on the device (no host copy)
    c = torch.cat([ones, ones.new_zeros(H, 2 * block + 2)], dim=1)
    scale = 1.0 if oprf_a is None else oprf_input_scale(oprf_a)
    far = windowed_attention_product(q * scale, k * scale, w, c, projection, key_padding_mask, True, block, oprf_a,
                                     band=False)  # (R, L, E)
    return _row_blocks(far, block), _row_blocks(sigma.reshape(B * H, L, 1), block)


def _row_blocks(x: Tensor, block: int) -> Tensor:
    """[R, L, F] -> [R, n, T, F], zeros after the end (a view when T divides L)."""
    tail = -x.shape[1] % block
    if tail:
        x = torch.nn.functional.pad(x, (0, 0, 0, tail))
    return x.view(x.shape[0], -1, block, x.shape[-1])


def _row_neighbours(x: Tensor, shifts: range) -> Tensor:
    """[R, n, T, F] -> for each block the blocks at ``shifts`` (zeros off the ends), [R, n, S T, F]."""
    n = x.shape[1]
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 1, 1))  # a zero block each side
    return torch.cat([padded[:, 1 + s : 1 + s + n] for s in shifts], dim=2)


def _neighbour_windows(x: Tensor, shifts: range) -> Tensor:
    """[R, n, T, F] -> for each block the blocks at ``shifts``, transposed: [R n, F, S T], an overlapping
    view (``unfold``: no copy, and a summing backward) of the blocks laid end to end with a zero block
    before and after. Across rows it reads the neighbouring row's edge block where
    :func:`_row_neighbours` reads zeros: the caller masks those keys (their weights are exactly 0)."""
    R, n, T, F = x.shape
    padded = torch.nn.functional.pad(x.reshape(R * n * T, F), (0, 0, -shifts[0] * T, shifts[-1] * T))
    return padded.unfold(0, len(shifts) * T, T)  # (R n, F, S T)


class _BandProduct(torch.autograd.Function):
    """The exact part: exp(q_b . k_c - mu) @ [V_c, 1] over each query block's neighbour keys, with
    mu = max(sigma, the row's band logits) (returned, no gradient). Hand-written backward: the weights'
    gradient is formed contiguous and multiplied by the saved weights in place (autograd's exp backward
    multiplied a transposed-stride gradient, the slowest elementwise op of the op)."""

    @staticmethod
    def forward(ctx, queries: Tensor, keys_t: Tensor, values: Tensor, sigma: Tensor, allowed: Tensor
                ) -> tuple[Tensor, Tensor]:
        # queries (R n, T, D), keys_t (R n, D, S T), values (R n, S T, E), sigma (R, n, T, 1) detached,
        # allowed bool (B, 1, n, T, S T) broadcast over heads
        B, n = allowed.shape[0], allowed.shape[2]
        weights = torch.bmm(queries, keys_t)  # (R n, T, S T)
        weights.view(B, -1, n, *weights.shape[1:]).masked_fill_(~allowed, -math.inf)
        mu = torch.maximum(sigma, weights.amax(dim=-1).view(sigma.shape))  # (R, n, T, 1)
        weights.sub_(mu.view(weights.shape[0], -1, 1)).exp_()  # masked entries exactly 0
        ctx.save_for_backward(queries, keys_t, values, weights)
        ctx.mark_non_differentiable(mu)
        return torch.bmm(weights, values).view(*sigma.shape[:-1], values.shape[-1]), mu

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_mu: Tensor | None):
        queries, keys_t, values, weights = ctx.saved_tensors
        grad = grad.reshape(weights.shape[0], -1, values.shape[-1])  # (R n, T, E)
        grad_values = torch.bmm(weights.transpose(-1, -2), grad)
        grad_logits = torch.bmm(grad, values.transpose(-1, -2)).mul_(weights)  # exp's backward, in place
        grad_queries = torch.bmm(grad_logits, keys_t.transpose(-1, -2))
        grad_keys_t = torch.bmm(queries.transpose(-1, -2), grad_logits)
        return grad_queries, grad_keys_t, grad_values, None, None


def favor_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    window: int,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    oprf_a: Tensor | None = None,
) -> Tensor:
    """Softmax attention exact on the neighbour blocks of w positions, estimated by FAVOR+ beyond (module
    docstring): every |i - j| < ``window`` is exact.

    Args:
        q, k, v: [batch, heads, length, head_dim] (q, k unscaled).
        projection: [nb_features, head_dim] (no gradient: a redrawn buffer).
        window: w >= 1, the block length; a query of block b = i // w reads blocks b - 1, b, b + 1 exactly.
        causal: query i reads keys j <= i only.
        key_padding_mask: bool [batch, length], True at padding; padded queries get zero rows.
        oprf_a: FAVOR++'s A ([batch, heads] or [heads], detached) for the far part; None: FAVOR+.

    Returns:
        [batch, heads, length, head_dim] in v's dtype; equals ``implied_window_attention(...) @ v``.
    """
    check_favor("favor_window_attention", q, k, v, projection, "softmax", key_padding_mask, oprf_a)
    _check_window("favor_window_attention", window)
    B, H, L, D = v.shape
    rows = _rows_per_chunk(L, D, projection.shape[0], window, compute_dtype(q))
    return map_row_chunks(lambda qc, kc, vc, mask, a: _favor_window_rows(qc, kc, vc, projection, window, causal, mask, a),
                          rows, q, k, v, key_padding_mask, oprf_a)


def _rows_per_chunk(length: int, head_dim: int, nb_features: int, window: int, dtype: torch.dtype) -> int:
    """(batch, head) rows per call (`rows.map_row_chunks`): each chunk's largest tensor (the [L, m]
    features, the [L, 3 w] band weights, the bidirectional block states [L / w, d + 1, m]) stays within
    `rows.CHUNK_BYTES`. At L = 8192, w = 64 fwd+bwd this is 1.4x (bidirectional) / 1.5x (causal) faster than
    one call over all rows."""
    return rows_per_chunk(length * max(nb_features, 3 * window, -(-nb_features * (head_dim + 1) // window)), dtype)


def _favor_window_rows(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, window: int, causal: bool,
                       key_padding_mask: Tensor | None, oprf_a: Tensor | None) -> Tensor:
    """:func:`favor_window_attention` on one chunk of (batch, head) rows (arguments checked)."""
    B, H, L, D = v.shape
    block = window
    out_dtype = v.dtype  # v is cast to the compute dtype below
    with torch.autocast(device_type=q.device.type, enabled=False):
        dtype = compute_dtype(q)
        projection = projection.detach().to(dtype)
        oprf_a = None if oprf_a is None else oprf_a.detach().to(dtype)
        # Zeroed at padding first, so junk there reaches no output and no gradient (0 * NaN would).
        q, k, v = (masked(x.to(dtype), key_padding_mask) for x in (q, k, v))
        if not causal:  # one Function with a hand-written backward (ops.favor.window_bidirectional)
            out = bidirectional_window_rows(q, k, v, projection, window, key_padding_mask, oprf_a)
            return masked(out, key_padding_mask).to(out_dtype)
        w = torch.cat([v, v.new_ones(B, H, L, 1)], dim=-1)  # (B, H, L, D + 1): the denominator rides along
        far, sigma_b = _causal_far(q, k, w, projection, key_padding_mask, oprf_a, block)  # (R, n, T, D + 1), (R, n, T, 1)

        # exact part: each query block against its neighbour key blocks (row-major blocks [R, n, T, F])
        rows = B * H
        shifts = range(-1, 1)  # causal: the previous block and the own one
        d_scale = D**-0.25
        qb = _row_blocks((q * d_scale).reshape(rows, L, D), block)  # (R, n, T, D)
        n = qb.shape[1]
        # neighbour keys and values as overlapping views (no [R, n, S T, F] copies): the keys of other
        # rows they read at a row's ends are masked below (valid = 0 off the end), so weigh exactly 0
        keys_t = _neighbour_windows(_row_blocks((k * d_scale).reshape(rows, L, D), block), shifts)  # (R n, D, S T)
        values = _neighbour_windows(_row_blocks(w.reshape(rows, L, D + 1), block), shifts).transpose(-1, -2)
        valid = torch.ones(B, L, 1, dtype=dtype, device=q.device) if key_padding_mask is None else (
            (~key_padding_mask).to(dtype)[..., None])
        valid = _row_neighbours(_row_blocks(valid, block), shifts)[..., 0]  # (B, n, S T): 0 at padding, off the end
        allowed = _band_mask(block, shifts, causal, q.device) & (valid[:, None, :, None, :] > 0)  # (B, 1, n, T, S T)
        # mask, stabiliser and exp in place on the fresh product (its backward reads only qb and keys; no
        # views of it: an in-place op on a view costs autograd a copy of the whole base)
        exact, mu = _BandProduct.apply(qb.reshape(rows * n, block, D), keys_t, values, sigma_b.detach(), allowed)
        total = exact + far * torch.exp(sigma_b - mu)
        out = safe_divide(total[..., :D], total[..., D])  # (R, n, T, D)
        out = masked(out.reshape(rows, -1, D)[:, :L].view(B, H, L, D), key_padding_mask)
    return out.to(out_dtype)


def implied_window_attention(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    window: int,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    oprf_a: Tensor | None = None,
) -> Tensor:
    """The row-normalised [B, H, L, L] matrix :func:`favor_window_attention` applies to v: exact
    exp(q.k / sqrt(d)) weights on the neighbour blocks (:func:`exact_support`), the feature estimate
    phi(q).phi(k) elsewhere (its reference,
    and its attention maps). Padded keys have zero weight, padded queries zero rows."""
    check_favor("implied_window_attention", q, k, None, projection, "softmax", key_padding_mask, oprf_a)
    _check_window("implied_window_attention", window)
    with torch.autocast(device_type=q.device.type, enabled=False):
        dtype = compute_dtype(q)
        q, k = masked(q.to(dtype), key_padding_mask), masked(k.to(dtype), key_padding_mask)
        projection = projection.detach().to(dtype)
        oprf_a = None if oprf_a is None else oprf_a.detach().to(dtype)
        L = q.shape[2]
        # true features phi = exp(logits) / sqrt(m), each side kept relative to a detached max
        query_logits = softmax_logits(q, projection, oprf_a)
        key_logits = softmax_logits(k, projection, oprf_a)
        query_max = query_logits.amax(dim=-1).detach()
        key_max = shared_key_offset(key_logits, key_padding_mask)
        far = torch.exp(query_logits - query_max[..., None]) @ masked(
            torch.exp(key_logits - key_max[..., None, None]), key_padding_mask).transpose(-1, -2)
        sigma = query_max + key_max[..., None] - math.log(projection.shape[0])  # far_ij = far * exp(sigma_i)
        exact = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        allowed = torch.ones(L, L, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed.tril()
        allowed = allowed[None, None] if key_padding_mask is None else allowed & ~key_padding_mask[:, None, None, :]
        band = exact_support(L, window, False, q.device)
        exact = exact.masked_fill(~(band & allowed), -math.inf)
        mu = torch.maximum(sigma, exact.amax(dim=-1)).detach()[..., None]
        weights = torch.where(band, torch.exp(exact - mu), far * torch.exp(sigma[..., None] - mu))
        weights = weights * allowed
        denominator = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        return masked(weights, key_padding_mask)


class WindowState(NamedTuple):
    """Causal exact-window attention after t tokens: the raw keys [B, H, < 2 w, D] and values of the
    previous and the current block of w positions (those the next query reads exactly), and the FAVOR+
    state of the keys before them (``far``, :class:`FavorState`)."""

    keys: Tensor
    values: Tensor
    far: FavorState


def favor_window_causal_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    projection: Tensor,
    window: int,
    state: WindowState | None = None,
    *,
    oprf_a: Tensor | None = None,
) -> tuple[Tensor, WindowState]:
    """One token of causal :func:`favor_window_attention`: q_t, k_t, v_t [batch, heads, head_dim] at position
    t, the state of the tokens before (None at t = 0) -> (out_t [batch, heads, head_dim], new state).
    Feeding a sequence token by token reproduces the parallel causal forward."""
    check_favor("favor_window_causal_step", q_t[:, :, None], k_t[:, :, None], v_t[:, :, None], projection, "softmax",
                None, oprf_a)
    _check_window("favor_window_causal_step", window)
    with torch.autocast(device_type=q_t.device.type, enabled=False):
        dtype = compute_dtype(q_t)
        q, k, v, w = q_t.to(dtype), k_t.to(dtype), v_t.to(dtype), projection.detach().to(dtype)
        a = None if oprf_a is None else oprf_a.detach().to(dtype)
        B, H, D = v.shape
        m = w.shape[0]
        if state is None:
            far = FavorState(v.new_zeros(B, H, m, D), v.new_zeros(B, H, m), v.new_full((B, H), -math.inf))
            state = WindowState(k.new_zeros(B, H, 0, D), v.new_zeros(B, H, 0, D), far)
        keys, values, far = state
        if keys.shape[2] == 2 * window:  # position t opens a new block: block b - 2 leaves for the far state
            for j in range(window):
                far = absorb_key(far, softmax_logits(keys[:, :, j : j + 1], w, a)[:, :, 0], values[:, :, j])
            keys, values = keys[:, :, window:], values[:, :, window:]
        band_keys = torch.cat([keys, k[:, :, None]], dim=2)  # (B, H, <= 2 w, D)
        band_values = torch.cat([values, v[:, :, None]], dim=2)
        exact = (band_keys @ q[..., None]).squeeze(-1) / math.sqrt(D)  # (B, H, <= 2 w)
        query = softmax_kernel_features(q[:, :, None], w, is_query=True, oprf_a=a)[:, :, 0]  # (B, H, m), max 1
        query_max = softmax_logits(q[:, :, None], w, a)[:, :, 0].amax(dim=-1)
        sigma = query_max + far.offset - math.log(m)  # -inf before any far key
        mu = torch.maximum(sigma, exact.amax(dim=-1))
        far_scale = torch.exp(sigma - mu)
        weights = torch.exp(exact - mu[..., None])
        numerator = (weights[..., None, :] @ band_values).squeeze(-2) + far_scale[..., None] * (
            query[..., None, :] @ far.kv).squeeze(-2)
        denominator = weights.sum(dim=-1) + far_scale * (query * far.k_sum).sum(dim=-1)
        out = safe_divide(numerator, denominator)
    return out.to(v_t.dtype), WindowState(band_keys, band_values, far)
