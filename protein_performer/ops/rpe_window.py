"""Kernelized attention with a windowed relative-position bias: exact, in O(L w (m + D)) time.

A T5-shaped bias is free near the diagonal and constant far from it (per head and direction):

    b_(j-i) = band[(j - i) + w - 1]   for |j - i| < w       (w: the window, ``band`` is [heads, 2w - 1])
    b_(j-i) = far[0]                  for j - i <= -w       (keys far before the query)
    b_(j-i) = far[1]                  for j - i >= w        (keys far after it; never read when causal)

and the attention of :mod:`~protein_performer.ops.rpe_fft` (Luo et al. 2021) weights FAVOR+ terms by
c = exp(b):

    z_i = sum_j c_(j-i) phi(q_i).phi(k_j) [v_j, 1]     (the trailing 1 gives the denominator)

With a constant far weight the sum splits exactly into
- far terms: c_far_before phi(q_i) . P_i + c_far_after phi(q_i) . S_i, where P_i and S_i are FAVOR+
  prefix and suffix states sum phi(k_j) [v_j, 1]^T over the keys far before and far after query i:
  plain linear attention with a lag, O(L m D);
- band terms: blocks of ``block_size`` queries against the 2r + 1 key blocks around them (r blocks
  cover w - 1 offsets), (phi_q phi_k^T * C) [v, 1] with C the block's [T, T] Toeplitz weights; key
  blocks the prefix/suffix states do not cover are read here whole, their far entries weighted by
  the far values. O(L (2w + T) (m + D)) multiply-adds, O(T^2) memory per block.
Every term is a product of nonnegative factors: nothing is subtracted, so no cancellation.

Stabilisers are those of the other paths (:mod:`~protein_performer.ops.rpe_fft`): c = exp(b - max b)
over the entries the mode reads; query features divided by their row max; bidirectional keys share
one offset; causal keys carry the running offset M_j and query i reads key j with exp(M_j - M_i) <= 1:
exactly on the band blocks, and through the block-end offset e_c for the prefix state (kept relative
to the end of the last block it holds and rescaled by exp(e - M_i) <= 1). A query reads only keys
<= i (later keys of its own block get exact zero weights), so causal outputs and gradients at i are
bit-for-bit independent of positions > i. Padded keys have zero features; padded queries zero rows.

The autograd function builds the features in place, straight into a block layout, and differentiates
them by hand. For the backward pass it keeps the features (O(L m)), the band scores (O(L (2w + T)))
and the far block states (O(L m D / T)): nothing of size L x w x m. The projection gets no gradient
(it is a redrawn buffer). The dense reference is
:func:`~protein_performer.ops.rpe_fft.implied_rpe_attention` with :func:`expand_windowed_bias`.

Decoding: :func:`favor_rpe_causal_step` keeps the last w keys plus the far prefix state.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from protein_performer.ops._checks import compute_dtype
from protein_performer.ops.favor import (
    _decayed_scan,
    _key_gradient,
    _running_max,
    _safe_divide,
    _softmax_logits,
    _zero_at_padding,
    softmax_kernel_features,
)

__all__ = ["WindowedBias", "WindowedState", "expand_windowed_bias", "favor_rpe_causal_step"]

#: Largest default query block of the band product (T = w up to this): T = w covers the band with 3 key
#: blocks (3w keys per query for 2w - 1 offsets). At w = 128 (m = 256, D = 64) it beat T = 64 (5 blocks
#: of 64, 320 keys) by 1.2-1.5x bidirectional on this project's 2-core CPU (larger products, fewer
#: passes); causal, the two were within noise.
MAX_DEFAULT_BLOCK_SIZE = 128


def default_block_size(window: int) -> int:
    """T = w, clamped to [16, MAX_DEFAULT_BLOCK_SIZE]."""
    return min(max(window, 16), MAX_DEFAULT_BLOCK_SIZE)
#: Upper bound on the elements of one [query blocks x rows, T, T] score tensor.
_CHUNK_ELEMENTS = 1 << 23


class WindowedBias(NamedTuple):
    """A relative-position bias that is constant beyond a window w (log space: c = exp(b)).

    band: [heads, 2w - 1], b_(j-i) for |j - i| < w at index (j - i) + w - 1.
    far: [heads, 2], b for j - i <= -w (index 0, keys before the query) and j - i >= w (index 1).
    """

    band: Tensor
    far: Tensor

    @property
    def window(self) -> int:
        return (self.band.shape[-1] + 1) // 2


def check_windowed_bias(where: str, bias: WindowedBias, heads: int) -> None:
    band, far = bias
    if band.dim() != 2 or band.shape[0] != heads or band.shape[1] % 2 != 1:
        raise ValueError(
            f"{where}: rpe_bias.band must be [heads={heads}, 2w - 1] (odd width, window w >= 1), "
            f"got {tuple(band.shape)}."
        )
    if far.shape != (heads, 2):
        raise ValueError(
            f"{where}: rpe_bias.far must be [heads={heads}, 2] (before, after), got {tuple(far.shape)}."
        )


def expand_windowed_bias(bias: WindowedBias, length: int) -> Tensor:
    """The same bias over every offset of a length-L sequence: [heads, 2L - 1], entry (j - i) + L - 1
    (the full form of :func:`~protein_performer.ops.favor_rpe_attention`; O(L), for references and maps)."""
    window = bias.window
    offsets = torch.arange(-(length - 1), length, device=bias.band.device)
    index = (offsets + window).clamp(0, 2 * window)  # into [far before, band, far after]
    return torch.cat([bias.far[:, :1], bias.band, bias.far[:, 1:]], dim=1)[:, index]


def windowed_weights(bias: WindowedBias, causal: bool, dtype: torch.dtype) -> Tensor:
    """c = exp(b - max b) as [heads, 2w + 1] = [far before, band offsets -(w-1)..w-1, far after].

    The max (detached, it cancels in the ratio) is over the entries the mode reads; causal zeroes the
    positive offsets and the far-after value (never read; exp of them could overflow)."""
    b = torch.cat([bias.far[:, :1], bias.band, bias.far[:, 1:]], dim=1).to(dtype)
    window = bias.window
    read = b[:, : window + 1] if causal else b
    c = torch.exp(b - read.amax(dim=1, keepdim=True).detach())
    if causal:
        c = torch.cat([c[:, : window + 1], torch.zeros_like(c[:, window + 1 :])], dim=1)
    return c


# --------------------------------------------------------------------------------------------------
# the blocked product
# --------------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """How a length-L product is cut: n query blocks of T; key blocks at shifts -r..r (causal -r..0)
    around each; the far states start ``lag`` = r + 1 blocks away."""

    length: int
    block: int
    window: int
    causal: bool
    n: int
    r: int

    @property
    def shifts(self) -> range:
        return range(-self.r, 1 if self.causal else self.r + 1)

    @property
    def after(self) -> int:
        """Zero key blocks appended after the last query block (none when causal)."""
        return 0 if self.causal else self.r

    @property
    def lag(self) -> int:
        return self.r + 1


def _plan(length: int, block: int, window: int, causal: bool) -> _Plan:
    n = -(-length // block)
    r = min(-(-(window - 1) // block), n - 1)
    return _Plan(length, block, window, causal, n, r)


def _to_blocks(x: Tensor, block: int, before: int, after: int, fill_tail: bool = False) -> Tensor:
    """[R, L, F] -> [before + n + after, R, block, F] with n = ceil(L / block), zeros around.

    ``fill_tail`` repeats the last position into the tail of the last block instead of zeros."""
    rows, length, features = x.shape
    n = -(-length // block)
    out = x.new_empty(before + n + after, rows, block, features)
    out[:before].zero_()
    out[before + n :].zero_()
    tail = n * block - length
    if tail:
        pad = x[:, -1:].expand(rows, tail, features) if fill_tail else x.new_zeros(rows, tail, features)
        x = torch.cat([x, pad], dim=1)
    out[before : before + n] = x.view(rows, n, block, features).transpose(0, 1)
    return out


def _from_blocks(x: Tensor, length: int) -> Tensor:
    """[n, R, T, F] -> [R, L, F]."""
    n, rows, block, features = x.shape
    return x.transpose(0, 1).reshape(rows, n * block, features)[:, :length]


def _weight_index(plan: _Plan, device: torch.device) -> Tensor:
    """[shifts, T, T] indices into [c (2w + 1), 0]: for query t of a block and key t' of the block
    ``shift`` blocks away, the offset j - i = shift T + t' - t mapped to far before (0), the band
    (1 .. 2w - 1), far after (2w), or the zero entry 2w + 1 (causal, j > i)."""
    t = torch.arange(plan.block, device=device)
    shifts = torch.tensor(list(plan.shifts), device=device)
    delta = shifts[:, None, None] * plan.block + t[None, None, :] - t[None, :, None]
    index = (delta + plan.window).clamp(0, 2 * plan.window)
    if plan.causal:
        index = torch.where(delta > 0, 2 * plan.window + 1, index)
    return index


def _per_head(x: Tensor, heads: int) -> Tensor:
    """View [.., R, *] (R = batch x heads on dim 1) as [.., batch, heads, *] for per-head scaling."""
    return x.view(x.shape[0], -1, heads, *x.shape[2:])


def _query_chunks(plan: _Plan, rows: int):
    """Ranges of query blocks whose [blocks x rows, T, T] scores stay under _CHUNK_ELEMENTS."""
    size = max(1, _CHUNK_ELEMENTS // (rows * plan.block * plan.block))
    for start in range(0, plan.n, size):
        yield start, min(start + size, plan.n)


def _band_decay(offsets: tuple[Tensor, Tensor, Tensor] | None, start: int, stop: int, shift: int,
                r: int) -> Tensor | None:
    """exp(M_j - M_i) for the queries of blocks start..stop-1 and the keys ``shift`` blocks away,
    [blocks, R, T, T]; clamped to <= 1 (the keys after i it would exceed 1 on have zero weight)."""
    if offsets is None:
        return None
    query_offset, key_offset, _ = offsets
    keys = key_offset[start + shift + r : stop + shift + r]
    return (keys[:, :, None, :] - query_offset[start:stop, :, :, None]).clamp_(max=0.0).exp_()


class _WindowedAttention(torch.autograd.Function):
    """N[r, i] = sum_j c(j - i) phi(q_i) . phi(k_j) E_ij w[r, j] for the windowed c, row r = b H + h.

    q, k: [B, H, L, D] (compute dtype); w: [B, H, L, E] (values, zero at padding, and a column of
    ones); c: [H, 2w + 1] from :func:`windowed_weights`; projection: [m, D]. Causal keys carry running
    offsets M (E_ij = exp(M_j - M_i)), bidirectional ones one shared offset (E = 1). Returns [R, L, E].

    The features are built in place (:func:`_softmax_features`) straight into the block layout the
    product reads, and differentiated by hand there: the backward pass keeps one copy of them."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, w: Tensor, c: Tensor, projection: Tensor,
                key_padding_mask: Tensor | None, causal: bool, block: int) -> Tensor:
        B, H, length, _ = q.shape
        rows = B * H
        plan = _plan(length, block, (c.shape[1] - 1) // 2, causal)
        query, key, key_offset, k_scaled, w_query, w_key = _softmax_features(q, k, projection, key_padding_mask,
                                                                            causal)
        qb = _to_blocks(query.view(rows, length, -1), block, 0, 0)  # (n, R, T, m)
        kb = _to_blocks(key.view(rows, length, -1), block, plan.r, plan.after)  # (r + n + after, R, T, m)
        del query, key
        wb = _to_blocks(w.reshape(rows, length, -1), block, plan.r, plan.after)  # (r + n + after, R, T, E)
        offsets = None if key_offset is None else _block_offsets(key_offset.view(rows, length), plan)
        weights = torch.cat([c, c.new_zeros(c.shape[0], 1)], dim=1)[:, _weight_index(plan, c.device)]
        out, far_states = _far_forward(qb, kb, wb, c, offsets, plan)  # (n, R, T, E)
        scores = _band_forward(qb, kb, wb, weights, offsets, plan, out)  # (shifts, n, R, T, T)
        ctx.save_for_backward(qb, kb, wb, c, scores, k_scaled, w_query, w_key, key_padding_mask,
                              *(offsets or ()), *far_states)
        ctx.plan = plan
        return _from_blocks(out, length)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qb, kb, wb, c, scores, k_scaled, w_query, w_key, key_padding_mask, *rest = ctx.saved_tensors
        plan: _Plan = ctx.plan
        offsets = tuple(rest[:3]) if plan.causal else None
        far_states = tuple(rest[3:] if plan.causal else rest)
        heads = c.shape[0]
        grad = _to_blocks(grad_out.contiguous(), plan.block, 0, 0)  # (n, R, T, E)
        far_grad_c = torch.zeros_like(c)
        # the far terms write the gradients first (no zero fill of the big buffers), the band adds to them
        grad_qb, grad_kb, grad_wb = _far_backward(qb, kb, wb, c, offsets, far_states, plan, grad, far_grad_c)
        index = _weight_index(plan, c.device)
        weights = torch.cat([c, c.new_zeros(heads, 1)], dim=1)[:, index]
        grad_weights = _band_backward(qb, kb, wb, scores, weights, offsets, plan, grad, grad_qb, grad_kb, grad_wb)
        del scores
        grad_c = c.new_zeros(heads, c.shape[1] + 1).index_add_(1, index.flatten(), grad_weights.view(heads, -1))
        grad_c = grad_c[:, :-1] + far_grad_c
        length, r, n = plan.length, plan.r, plan.n
        shape = k_scaled.shape[:3]
        # through the features: d exp(x) = exp(x) dx, then the projections (the key's with [k', |k'|^2/2])
        grad_q = _from_blocks(grad_qb.mul_(qb) @ w_query.T, length).view(*shape, -1)
        grad_k_aug = _from_blocks(grad_kb[r : r + n].mul_(kb[r : r + n]) @ w_key.T, length).view(*shape, -1)
        grad_k = _key_gradient(grad_k_aug, k_scaled)
        _zero_at_padding(key_padding_mask, grad_q, grad_k)
        grad_w = _from_blocks(grad_wb[r : r + n], length).view(*shape, -1)
        return grad_q, grad_k, grad_w, grad_c, None, None, None, None


def _block_offsets(key_offset: Tensor, plan: _Plan) -> tuple[Tensor, Tensor, Tensor]:
    """Running offsets in block layout: queries [n, R, T]; keys [r + n, R, T] (zeros before, only
    ever met through a clamp); block ends e_c [n, R] (the tail repeats the last offset)."""
    query = _to_blocks(key_offset[..., None], plan.block, 0, 0, fill_tail=True)[..., 0]
    keys = torch.cat([query.new_zeros(plan.r, *query.shape[1:]), query])
    return query, keys, query[:, :, -1].contiguous()


def _band_forward(qb, kb, wb, weights, offsets, plan: _Plan, out: Tensor) -> Tensor:
    """out[block] += sum over shifts of (S * C [* E]) w with S = phi_q phi_k^T, chunk by chunk.

    Returns the scores S, [shifts, n, R, T, T]: O(L (2w + T)) numbers, kept for the backward pass
    (recomputing them would cost a third of its multiply-adds)."""
    rows, block, features = qb.shape[1:]
    heads = weights.shape[0]
    columns = wb.shape[-1]
    r = plan.r
    saved = qb.new_empty(len(plan.shifts), plan.n, rows, block, block)
    for start, stop in _query_chunks(plan, rows):
        q = qb[start:stop].view(-1, block, features)
        target = out[start:stop].view(-1, block, columns)
        for s_index, shift in enumerate(plan.shifts):
            k = kb[start + shift + r : stop + shift + r].view(-1, block, features)
            scores = saved[s_index, start:stop]  # (blocks, R, T, T)
            torch.bmm(q, k.transpose(1, 2), out=scores.view(-1, block, block))
            weighted = (_per_head(scores, heads) * weights[:, s_index]).view_as(scores)
            decay = _band_decay(offsets, start, stop, shift, r)
            if decay is not None:
                weighted.mul_(decay)
            target.baddbmm_(weighted.view(-1, block, block),
                            wb[start + shift + r : stop + shift + r].view(-1, block, columns))
    return saved


def _band_backward(qb, kb, wb, saved, weights, offsets, plan: _Plan, grad, grad_qb, grad_kb, grad_wb) -> Tensor:
    """Accumulates the band's gradients into grad_qb, grad_kb, grad_wb; returns d/d weights [H, S, T, T]."""
    rows, block, features = qb.shape[1:]
    heads = weights.shape[0]
    columns = wb.shape[-1]
    r = plan.r
    grad_weights = torch.zeros_like(weights)
    for start, stop in _query_chunks(plan, rows):
        q = qb[start:stop].view(-1, block, features)
        g = grad[start:stop].view(-1, block, columns)
        for s_index, shift in enumerate(plan.shifts):
            keys = slice(start + shift + r, stop + shift + r)
            k = kb[keys].view(-1, block, features)
            w = wb[keys].view(-1, block, columns)
            scores = saved[s_index, start:stop]  # S, (blocks, R, T, T)
            decay = _band_decay(offsets, start, stop, shift, r)
            # weights W = S C E: d/dC sums dW S E over the batch and blocks, d/dS = dW C E
            grad_scores = torch.bmm(g, w.transpose(1, 2)).view_as(scores)  # dW
            if decay is not None:
                grad_scores.mul_(decay)  # dW E
            grad_weights[:, s_index] += _per_head(grad_scores * scores, heads).sum(dim=(0, 1))
            weighted = (_per_head(scores, heads) * weights[:, s_index]).view_as(scores)
            if decay is not None:
                weighted.mul_(decay)
            grad_wb[keys].view(-1, block, columns).baddbmm_(weighted.view(-1, block, block).transpose(1, 2), g)
            del weighted
            _per_head(grad_scores, heads).mul_(weights[:, s_index])
            grad_scores = grad_scores.view(-1, block, block)
            grad_qb[start:stop].view(-1, block, features).baddbmm_(grad_scores, k)
            grad_kb[keys].view(-1, block, features).baddbmm_(grad_scores.transpose(1, 2), q)
    return grad_weights


def _far_sums(kb, wb, offsets, plan: _Plan) -> Tensor:
    """x_c = sum over the keys j of block c of phi(k_j) w_j^T, [n, R, m, E]; causal keys are taken
    relative to their block's end offset e_c (factor exp(M_j - e_c) <= 1)."""
    n, r = plan.n, plan.r
    k, w = kb[r : r + n], wb[r : r + n]
    if offsets is not None:
        w = w * _key_to_end(offsets)
    rows, block, features = k.shape[1:]
    return torch.bmm(k.reshape(-1, block, features).transpose(1, 2), w.reshape(-1, block, w.shape[-1])).view(
        n, rows, features, w.shape[-1])


def _key_to_end(offsets: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """exp(M_j - e_c) for every key j of block c, [n, R, T, 1]."""
    query_offset, _, end = offsets
    return (query_offset - end[..., None]).exp_()[..., None]


def _head_scaled(x: Tensor, per_head: Tensor, out: Tensor | None = None) -> Tensor:
    """x [n, R, *] (rows r = b H + h on dim 1) times per_head[h]; into ``out`` if given."""
    heads = per_head.shape[0]
    scale = per_head.view(heads, *(1,) * (x.dim() - 2))
    if out is None:
        return (_per_head(x, heads) * scale).view_as(x)
    torch.mul(_per_head(x, heads), scale, out=_per_head(out, heads))
    return out


def _head_inner(a: Tensor, b: Tensor, heads: int) -> Tensor:
    """sum of a * b over everything but the head of the rows (dim 1, r = b H + h) -> [H]."""
    return _per_head(a * b, heads).transpose(0, 2).reshape(heads, -1).sum(dim=1)


def _scan(x: Tensor, *, reverse: bool = False) -> Tensor:
    """Exclusive sums over the blocks of x [n, R, m, E]: out_c = sum_(c' < c) x_c' (``reverse``: c' > c).

    One batched [G, G] product per group of blocks (favor's two-level scan, every row at once):
    torch's cumsum over a leading dim and a loop of per-block adds are both far slower on a CPU."""
    return _decayed_scan(x.view(1, x.shape[0], -1), None, None, reverse=reverse).view_as(x)


def _rows_scan(x: Tensor, source: Tensor, target: Tensor, *, reverse: bool = False) -> Tensor:
    """:func:`~protein_performer.ops.favor._decayed_scan` of x [n, R, m, E] with per-row decays
    (source, target [n, R]): out_c = sum_(c' < c) x_c' exp(source_c' - target_c) (``reverse``: c' > c)."""
    n, rows = x.shape[:2]
    out = _decayed_scan(x.transpose(0, 1).contiguous().view(rows, n, -1), source.T.contiguous(), target.T.contiguous(),
                        reverse=reverse)
    return out.view(rows, n, *x.shape[2:]).transpose(0, 1).contiguous()


def _bidirectional_far_states(x: Tensor, c: Tensor, lag: int) -> tuple[Tensor, Tensor, Tensor]:
    """(G, prefix, suffix) for the query blocks, each [n, R, m, E]: prefix_b = sum_(c <= b - lag) x_c
    (zero for b < lag), suffix_b = sum_(c >= b + lag) x_c (zero for b >= n - lag), and the state that
    query block b reads, G_b = c_before prefix_b + c_after suffix_b."""
    n = x.shape[0]
    prefix, suffix = torch.zeros_like(x), torch.zeros_like(x)
    prefix[lag:] = _scan(x)[1 : n - lag + 1]
    suffix[: n - lag] = _scan(x, reverse=True)[lag - 1 : n - 1]
    state = _head_scaled(prefix, c[:, 0])
    state += _head_scaled(suffix, c[:, -1])
    return state, prefix, suffix


def _causal_far_states(x: Tensor, end: Tensor, lag: int) -> Tensor:
    """P_b = sum_(c <= b - lag) x_c exp(e_c - e_(b - lag)) for query blocks b = lag .. n - 1,
    [n - lag, R, m, E]: the keys of the blocks far before b, relative to the end offset of the last
    of them (every factor <= 1; nothing after block b - lag is read)."""
    n = x.shape[0]
    previous_end = torch.cat([end[:1], end[:-1]])  # e_(p - 1); p = 0 holds nothing
    return _rows_scan(x, end, previous_end)[1 : n - lag + 1]


def _far_forward(qb, kb, wb, c, offsets, plan: _Plan) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Far terms for every query block, [n, R, T, E] (zeros when no key is far), and the states the
    backward pass reads: (prefix, suffix) bidirectional, (P,) causal, () when no key is far."""
    n, lag = plan.n, plan.lag
    rows, block, features = qb.shape[1:]
    columns = wb.shape[-1]
    out = qb.new_zeros(n, rows, block, columns)
    if n <= lag:
        return out, ()
    x = _far_sums(kb, wb, offsets, plan)
    if offsets is None:
        state, prefix, suffix = _bidirectional_far_states(x, c, lag)
        del x
        torch.bmm(qb.view(-1, block, features), state.view(-1, features, columns), out=out.view(-1, block, columns))
        return out, (prefix, suffix)
    query_offset, _, end = offsets
    state = _causal_far_states(x, end, lag)
    read = _head_scaled(torch.exp(end[: n - lag, :, None] - query_offset[lag:]), c[:, 0])  # (n - lag, R, T)
    far = torch.bmm(qb[lag:].reshape(-1, block, features), state.view(-1, features, columns))
    out[lag:] = far.view(n - lag, rows, block, columns).mul_(read[..., None])
    return out, (state,)


def _far_backward(qb, kb, wb, c, offsets, far_states, plan: _Plan, grad, grad_c) -> tuple[Tensor, Tensor, Tensor]:
    """The far terms' gradients: returns new (grad_qb, grad_kb, grad_wb) and adds to grad_c (entries 0, -1)."""
    n, lag, r = plan.n, plan.lag, plan.r
    if n <= lag:
        return torch.zeros_like(qb), torch.zeros_like(kb), torch.zeros_like(wb)
    grad_qb, grad_kb, grad_wb = torch.empty_like(qb), torch.empty_like(kb), torch.empty_like(wb)
    for buffer in (grad_kb, grad_wb):  # the zero key blocks around the sequence
        buffer[:r].zero_()
        buffer[r + n :].zero_()
    rows, block, features = qb.shape[1:]
    columns = wb.shape[-1]
    heads = c.shape[0]
    if offsets is None:
        prefix, suffix = far_states
        state = _head_scaled(prefix, c[:, 0])
        state += _head_scaled(suffix, c[:, -1])
        torch.bmm(grad.view(-1, block, columns), state.view(-1, features, columns).transpose(1, 2),
                  out=grad_qb.view(-1, block, features))
        del state
        grad_state = torch.bmm(qb.view(-1, block, features).transpose(1, 2), grad.view(-1, block, columns)).view_as(
            prefix)
        grad_c[:, 0] += _head_inner(grad_state, prefix, heads)
        grad_c[:, -1] += _head_inner(grad_state, suffix, heads)
        del prefix, suffix
        # block c's sums reach query blocks >= c + lag (c_before) and <= c - lag (c_after)
        grad_x = torch.zeros_like(grad_state)
        grad_x[: n - lag] = _scan(grad_state, reverse=True)[lag - 1 : n - 1]
        _head_scaled(grad_x, c[:, 0], out=grad_x)
        after = _scan(grad_state)[1 : n - lag + 1]
        grad_x[lag:] += _head_scaled(after, c[:, -1])
        del grad_state, after
    else:
        query_offset, _, end = offsets
        (state,) = far_states
        read = torch.exp(end[: n - lag, :, None] - query_offset[lag:])  # (n - lag, R, T)
        read_grad = grad[lag:] * read[..., None]  # d loss / d (c_before phi_q . P)
        grad_state = state.new_zeros(n, *state.shape[1:])  # indexed by scan position p = b - lag + 1
        torch.bmm(qb[lag:].reshape(-1, block, features).transpose(1, 2), read_grad.view(-1, block, columns),
                  out=grad_state[1 : n - lag + 1].view(-1, features, columns))
        grad_c[:, 0] += _head_inner(grad_state[1 : n - lag + 1], state, heads)
        _head_scaled(grad_state, c[:, 0], out=grad_state)
        _head_scaled(read_grad, c[:, 0], out=read_grad)
        grad_qb[:lag].zero_()
        torch.bmm(read_grad.view(-1, block, columns), state.view(-1, features, columns).transpose(1, 2),
                  out=grad_qb[lag:].view(-1, block, features))
        del read_grad, state
        # adjoint of _causal_far_states: grad_x_c = sum_(p > c) grad_P_p exp(e_c - e_(p - 1))
        previous_end = torch.cat([end[:1], end[:-1]])
        grad_x = _rows_scan(grad_state, previous_end.neg(), end.neg(), reverse=True)
        del grad_state
    k, w = kb[r : r + n], wb[r : r + n]
    grad_k, grad_w = grad_kb[r : r + n], grad_wb[r : r + n]
    torch.bmm(w.reshape(-1, block, columns), grad_x.view(-1, features, columns).transpose(1, 2),
              out=grad_k.view(-1, block, features))
    torch.bmm(k.reshape(-1, block, features), grad_x.view(-1, features, columns), out=grad_w.view(-1, block, columns))
    if offsets is not None:
        scale = _key_to_end(offsets)
        grad_k.mul_(scale)
        grad_w.mul_(scale)
    return grad_qb, grad_kb, grad_wb


def _softmax_features(q: Tensor, k: Tensor, projection: Tensor, key_padding_mask: Tensor | None, running: bool):
    """Positive softmax-kernel features of queries and keys, in place (no autograd; the values of
    :func:`~protein_performer.ops.rpe_fft._features`, built as in favor's fast path).

    phi_q = exp(W q' - max_a W q') (the row max and |q'|^2 / 2 are constant per query and cancel);
    phi_k = exp(W k' - |k'|^2 / 2 - offset), the offset the max over valid keys (shared) or, ``running``,
    the running max M_j (returned; else None). Both are zero at padding.

    Returns (phi_q, phi_k [B, H, L, m], offset [B, H, L] or None, k' [B, H, L, D], W_q [D, m],
    W_k [D + 1, m]): the last three are what the derivatives need."""
    D = q.shape[-1]
    scale = D**-0.25
    pad = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
    w_query = projection.T * scale  # (D, m)
    w_key = torch.cat([projection, -torch.ones_like(projection[:, :1])], dim=1).T  # (D + 1, m)
    k_scaled = k * scale
    k_aug = torch.cat([k_scaled, 0.5 * (k_scaled * k_scaled).sum(dim=-1, keepdim=True)], dim=-1)
    query = q @ w_query  # (B, H, L, m)
    query.sub_(query.amax(dim=-1, keepdim=True))
    key = k_aug @ w_key  # logits W k' - |k'|^2 / 2
    if pad is not None:
        query.masked_fill_(pad, -math.inf)
        key.masked_fill_(pad, -math.inf)
    query.exp_()
    offset = None
    if running:
        offset = _running_max(key.amax(dim=-1))  # (B, H, L)
        key.sub_(offset[..., None])
    else:
        shared = key.amax(dim=(-2, -1), keepdim=True)
        key.sub_(torch.where(torch.isfinite(shared), shared, torch.zeros_like(shared)))
    key.exp_()
    return query, key, offset, k_scaled, w_query, w_key


def windowed_attention_product(q: Tensor, k: Tensor, w: Tensor, c: Tensor, projection: Tensor,
                               key_padding_mask: Tensor | None, causal: bool, block_size: int) -> Tensor:
    """See :class:`_WindowedAttention`: [B * H, L, E], differentiable in q, k, w and c."""
    return _WindowedAttention.apply(q, k, w, c, projection.detach(), key_padding_mask, causal, block_size)


# --------------------------------------------------------------------------------------------------
# recurrent step (generation)
# --------------------------------------------------------------------------------------------------


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
        logits = _softmax_logits(k[:, :, None], projection)[:, :, 0]  # (B, H, m)
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
        out = _safe_divide(total[..., :D], total[..., D])
    return out.to(v_t.dtype), WindowedState(keys, values, key_offsets, far_kv, far_offset)
