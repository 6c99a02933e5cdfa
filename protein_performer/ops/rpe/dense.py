"""The Toeplitz product of full-bias favor_rpe by blocks of queries: (phi_q phi_k^T * C * E) [v, 1].

O(L^2 (m + D)) time in GEMMs, O(block x L) memory, half the keys when causal; the custom autograd
function stores no O(L^2) activations and recomputes each block in the backward pass. It runs in the
compute dtype (each row sums its own terms, so float32 is accurate).

Causal attention reads keys through running offsets: key j is stored as exp(logit_j - M_j) <= 1 and
query i reads it with the factor E_ij = exp(M_j - M_i) <= 1 (M is nondecreasing), multiplied into the
[block, keys] weight block together with c_(j-i): exact exps on each query block's own keys, and on
earlier keys a row scaling of the output and a column scaling of v through the offset just before the
block (:func:`_decay_factors`), O(L (block + m + D)) extra work against L^2 (m + D) / 2 GEMM
multiply-adds. Nothing query i reads depends on a key after i, and the weights of later keys are exact
zeros, so outputs (and gradients of past outputs) at i <= t are bit-for-bit independent of positions
> t, even when a future key's features would dwarf or underflow the past's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from protein_performer.ops.rpe.bias import sum_by_head

__all__ = ["toeplitz_dense"]

#: Upper bound on the elements of one [rows, block, keys] score block.
_CHUNK_ELEMENTS = 1 << 23


def _decay_factors(key_offset: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
    """E_ij = exp(M_j - M_i) for queries start <= i < stop and keys j < stop, in factored form.

    key_offset: M, [R, L], nondecreasing. Keys before the block factor through M_ref = M_(start - 1),
    which is >= M_j (j < start) and <= M_i (i >= start): E_ij = row_i col_j with row = exp(M_ref - M_i)
    [R, T] and col = exp(M_j - M_ref) [R, start], both <= 1 and neither reading a key after i, so they
    scale the small operands (queries' rows, values) instead of the [T, L] weight block. The block's
    own keys get the exact factor ``diagonal`` [R, T, T], clamped to 1 for j > i, where the causal c is
    0 (exp(M_j - M_i) could overflow there and inf * 0 would be NaN)."""
    rows_offset = key_offset[:, start:stop]
    ref = key_offset[:, start - 1 : start] if start > 0 else rows_offset[:, :1]
    row = torch.exp(ref - rows_offset)
    col = torch.exp(key_offset[:, :start] - ref)
    diagonal = (rows_offset[:, None, :] - rows_offset[:, :, None]).clamp_(max=0.0).exp_()
    return row, col, diagonal


def _query_blocks(rows: int, length: int):
    """Query blocks (start, stop) such that a [rows, block, L] score block stays under _CHUNK_ELEMENTS."""
    block = max(1, min(length, _CHUNK_ELEMENTS // (rows * length)))
    for start in range(0, length, block):
        yield start, min(start + block, length)


def _toeplitz_block(c: Tensor, start: int, stop: int, keys: int) -> Tensor:
    """C[h, i, j] = c[h, j - i + L - 1] for queries start <= i < stop and keys j < ``keys``; [H, T, keys].

    Reversing the query order turns the index into (L - stop) + t + j, strides (1, 1): a view of c."""
    length = (c.shape[1] + 1) // 2
    heads, width = c.shape
    reversed_rows = c.as_strided((heads, stop - start, keys), (width, 1, 1), c.storage_offset() + length - stop)
    return reversed_rows.flip(1)


def _add_diagonal_sums(grad_c: Tensor, block: Tensor, start: int, stop: int) -> None:
    """grad_c[h, j - i + L - 1] += block[h, i - start, j] for the block of :func:`_toeplitz_block`.

    Row t of the reversed block lands at (L - stop) + t + j: shear it by t into a [H, T, keys + T - 1]
    buffer (a strided copy, no scatter), then the sums over t are the anti-diagonal sums."""
    length = (grad_c.shape[1] + 1) // 2
    heads, size, keys = block.shape
    sheared = block.new_zeros(heads, size, keys + size - 1)
    sheared.as_strided((heads, size, keys), (size * (keys + size - 1), keys + size, 1)).copy_(block.flip(1))
    grad_c[:, length - stop : length - stop + keys + size - 1] += sheared.sum(dim=1)


class _ToeplitzDense(torch.autograd.Function):
    """The same product as :class:`_ToeplitzFFT` by blocks of queries: (phi_q phi_k^T * C * E) w.

    With ``key_offset`` ([R, L], the running key offsets M of causal features, detached; causal only)
    the weights also carry E_ij = exp(M_j - M_i) (:func:`_decay_factors`): exact on each block's own
    keys, and on earlier keys as a row scaling of the output and a column scaling of w, so the big
    [T, keys] block sees no extra pass. None means E = 1 (one shared offset). Causal (c zero at
    offsets > 0) reads keys j < stop only. Returns [R, L, E] in the input dtype."""

    @staticmethod
    def forward(ctx, phi_q: Tensor, phi_k: Tensor, w: Tensor, c: Tensor, key_offset: Tensor | None,
                causal: bool) -> Tensor:
        rows, length, _ = phi_k.shape
        heads = c.shape[0]
        c = c.contiguous()  # _toeplitz_block views it with explicit strides
        out = w.new_empty(rows, length, w.shape[-1])
        for start, stop in _query_blocks(rows, length):
            keys = stop if causal else length
            weights = phi_q[:, start:stop] @ phi_k[:, :keys].transpose(1, 2)  # (R, T, keys)
            weights.view(-1, heads, stop - start, keys).mul_(_toeplitz_block(c, start, stop, keys))
            if key_offset is None:
                out[:, start:stop] = weights @ w[:, :keys]
                continue
            row, col, diagonal = _decay_factors(key_offset, start, stop)
            block = weights[:, :, start:].mul_(diagonal) @ w[:, start:stop]
            if start > 0:
                block.addcmul_(row[..., None], weights[:, :, :start] @ (w[:, :start] * col[..., None]))
            out[:, start:stop] = block
        ctx.save_for_backward(phi_q, phi_k, w, c, key_offset)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        phi_q, phi_k, w, c, key_offset = ctx.saved_tensors
        rows, length, _ = phi_k.shape
        heads = c.shape[0]
        grad_q, grad_k, grad_w = torch.empty_like(phi_q), torch.zeros_like(phi_k), torch.zeros_like(w)
        grad_c = torch.zeros_like(c)
        for start, stop in _query_blocks(rows, length):
            keys = stop if ctx.causal else length
            size = stop - start
            grad = grad_out[:, start:stop]  # (R, T, E)
            scores = phi_q[:, start:stop] @ phi_k[:, :keys].transpose(1, 2)  # S, (R, T, keys)
            toeplitz = _toeplitz_block(c, start, stop, keys)  # (H, T, keys)
            # weights W = S C E. grad_weights holds d loss / d W times E: d/dC sums it times S over
            # diagonals, d/dS is it times C.
            if key_offset is None:
                grad_weights = grad @ w[:, :keys].transpose(1, 2)
            else:
                row, col, diagonal = _decay_factors(key_offset, start, stop)
                scaled_w = w[:, :keys].clone()
                scaled_w[:, :start] *= col[..., None]
                scaled_grad = grad * row[..., None]
                grad_weights = scaled_grad @ scaled_w.transpose(1, 2)
                grad_weights[:, :, start:] = (grad @ w[:, start:stop].transpose(1, 2)).mul_(diagonal)
            _add_diagonal_sums(grad_c, sum_by_head(grad_weights * scores, heads), start, stop)
            scores.view(-1, heads, size, keys).mul_(toeplitz)  # S C from here on
            if key_offset is None:
                grad_w[:, :keys] += scores.transpose(1, 2) @ grad
            else:
                grad_w[:, start:stop] += scores[:, :, start:].mul_(diagonal).transpose(1, 2) @ grad
                if start > 0:
                    past = scores[:, :, :start].transpose(1, 2) @ scaled_grad
                    grad_w[:, :start].addcmul_(col[..., None], past)
            grad_scores = grad_weights.view(-1, heads, size, keys).mul_(toeplitz).view_as(grad_weights)
            grad_q[:, start:stop] = grad_scores @ phi_k[:, :keys]
            grad_k[:, :keys] += grad_scores.transpose(1, 2) @ phi_q[:, start:stop]
        return grad_q, grad_k, grad_w, grad_c, None, None


def toeplitz_dense(phi_q: Tensor, phi_k: Tensor, w: Tensor, c: Tensor, key_offset: Tensor | None,
                   causal: bool) -> Tensor:
    """See :class:`_ToeplitzDense`: [R, L, E], differentiable in phi_q, phi_k, w and c."""
    return _ToeplitzDense.apply(phi_q, phi_k, w, c, key_offset, causal)
