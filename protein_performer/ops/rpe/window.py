"""Kernelized attention with a windowed relative-position bias: exact, in O(L w (m + D)) time.

A T5-shaped bias is free near the diagonal and constant far from it (per head and direction):

    b_(j-i) = band[(j - i) + w - 1]   for |j - i| < w       (w: the window, ``band`` is [heads, 2w - 1])
    b_(j-i) = far[0]                  for j - i <= -w       (keys far before the query)
    b_(j-i) = far[1]                  for j - i >= w        (keys far after it; never read when causal)

and the attention of :mod:`~protein_performer.ops.rpe` (Luo et al. 2021) weights FAVOR+ terms by
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

Stabilisers are those of the other paths (:mod:`~protein_performer.ops.stabilise`): c = exp(b - max b)
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
:func:`~protein_performer.ops.rpe.reference.implied_rpe_attention` with
:func:`~protein_performer.ops.rpe.bias.expand_windowed_bias`.

Decoding: :func:`~protein_performer.ops.rpe.recurrent.favor_rpe_causal_step`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from protein_performer.ops.favor.features import inplace_softmax_features
from protein_performer.ops.stabilise import decayed_scan, key_gradient, zero_at_padding

__all__ = ["MAX_DEFAULT_BLOCK_SIZE", "default_block_size", "windowed_attention_product"]

#: Largest default query block of the band product (T = w up to this): T = w covers the band with 3 key
#: blocks (3w keys per query for 2w - 1 offsets). At w = 128 (m = 256, D = 64) it beat T = 64 (5 blocks
#: of 64, 320 keys) by 1.2-1.5x bidirectional on this project's 2-core CPU (larger products, fewer
#: passes); causal, the two were within noise.
MAX_DEFAULT_BLOCK_SIZE = 128
#: Upper bound on the elements of one [query blocks x rows, T, T] score tensor.
_CHUNK_ELEMENTS = 1 << 23


def default_block_size(window: int) -> int:
    """T = w, clamped to [16, MAX_DEFAULT_BLOCK_SIZE]."""
    return min(max(window, 16), MAX_DEFAULT_BLOCK_SIZE)


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
    shifts = torch.arange(plan.shifts.start, plan.shifts.stop, device=device)  # filled on the device: no copy
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

    The features are built in place (:func:`inplace_softmax_features`) straight into the block layout the
    product reads, and differentiated by hand there: the backward pass keeps one copy of them."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, w: Tensor, c: Tensor, projection: Tensor,
                key_padding_mask: Tensor | None, causal: bool, block: int, oprf_a: Tensor | None,
                band: bool = True) -> Tensor:
        B, H, length, _ = q.shape
        rows = B * H
        plan = _plan(length, block, (c.shape[1] - 1) // 2, causal)
        query, key, key_offset, k_scaled, w_query, w_key = inplace_softmax_features(q, k, projection,
                                                                                    key_padding_mask, causal, oprf_a)
        qb = _to_blocks(query.view(rows, length, -1), block, 0, 0)  # (n, R, T, m)
        kb = _to_blocks(key.view(rows, length, -1), block, plan.r, plan.after)  # (r + n + after, R, T, m)
        del query, key
        wb = _to_blocks(w.reshape(rows, length, -1), block, plan.r, plan.after)  # (r + n + after, R, T, E)
        offsets = None if key_offset is None else _block_offsets(key_offset.view(rows, length), plan)
        out, far_states = _far_forward(qb, kb, wb, c, offsets, plan)  # (n, R, T, E)
        scores = None
        if band:
            weights = torch.cat([c, c.new_zeros(c.shape[0], 1)], dim=1)[:, _weight_index(plan, c.device)]
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
        grad_c = far_grad_c
        if scores is not None:  # the neighbour blocks' feature products (skipped with band=False)
            index = _weight_index(plan, c.device)
            weights = torch.cat([c, c.new_zeros(heads, 1)], dim=1)[:, index]
            grad_weights = _band_backward(qb, kb, wb, scores, weights, offsets, plan, grad, grad_qb, grad_kb,
                                          grad_wb)
            del scores
            grad_band = c.new_zeros(heads, c.shape[1] + 1).index_add_(1, index.flatten(), grad_weights.view(heads, -1))
            grad_c = grad_band[:, :-1] + far_grad_c
        length, r, n = plan.length, plan.r, plan.n
        shape = k_scaled.shape[:3]
        # through the features: d exp(x) = exp(x) dx, then the projections (the key's with [k', |k'|^2/2])
        grad_q = _from_blocks(grad_qb.mul_(qb) @ w_query.T, length).view(*shape, -1)
        grad_k_aug = _from_blocks(grad_kb[r : r + n].mul_(kb[r : r + n]) @ w_key.T, length).view(*shape, -1)
        grad_k = key_gradient(grad_k_aug, k_scaled)
        zero_at_padding(key_padding_mask, grad_q, grad_k)
        grad_w = _from_blocks(grad_wb[r : r + n], length).view(*shape, -1)
        return grad_q, grad_k, grad_w, grad_c, None, None, None, None, None, None


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
    return decayed_scan(x.view(1, x.shape[0], -1), None, None, reverse=reverse).view_as(x)


def _rows_scan(x: Tensor, source: Tensor, target: Tensor, *, reverse: bool = False) -> Tensor:
    """:func:`~protein_performer.ops.stabilise.decayed_scan` of x [n, R, m, E] with per-row decays
    (source, target [n, R]): out_c = sum_(c' < c) x_c' exp(source_c' - target_c) (``reverse``: c' > c)."""
    n, rows = x.shape[:2]
    out = decayed_scan(x.transpose(0, 1).contiguous().view(rows, n, -1), source.T.contiguous(), target.T.contiguous(),
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


def windowed_attention_product(q: Tensor, k: Tensor, w: Tensor, c: Tensor, projection: Tensor,
                               key_padding_mask: Tensor | None, causal: bool, block_size: int,
                               oprf_a: Tensor | None = None, *, band: bool = True) -> Tensor:
    """See :class:`_WindowedAttention`: [B * H, L, E], differentiable in q, k, w and c. With FAVOR++'s
    ``oprf_a`` (A, detached), q and k must arrive multiplied by ``oprf_input_scale(oprf_a)``.

    ``band=False`` computes only the far terms (the lagged states: key blocks at least r + 1 blocks away,
    weighted c[:, 0] before and c[:, -1] after), skipping the neighbour blocks' feature products."""
    return _WindowedAttention.apply(q, k, w, c, projection.detach(), key_padding_mask, causal, block_size, oprf_a,
                                    band)
