"""Kernelized attention with relative positional encoding (Luo et al., "Stable, Fast and Accurate:
Kernelized Attention with Relative Positional Encoding", NeurIPS 2021), Toeplitz products by FFT.

    z_i = phi(q_i) . sum_j c_ij phi(k_j) v_j^T  /  phi(q_i) . sum_j c_ij phi(k_j),   c_ij = exp(b_(j-i))

All tensors are ``[batch, heads, length, head_dim]``; a projection is ``[nb_features, head_dim]``;
``key_padding_mask`` is bool ``[batch, length]``, True at padding. The bias ``rpe_bias`` is
``[heads, 2L - 1]`` and entry ``(j - i) + L - 1`` holds b_(j-i); a bias learned for a longer maximum
length is cut to the current length with :func:`slice_rpe_bias`. Causal attention sets c_ij = 0 for
j > i, so only the first L entries (offsets <= 0) are read.

Two exact algorithms for the Toeplitz-weighted sums N_i = sum_j c_(j-i) phi(q_i).phi(k_j) [v_j, 1]
(the trailing 1 gives the denominator), both custom autograd functions that store no O(L^2) or
O(L m D) activations and recompute blocks in the backward pass:

- "fft": C = [c_ij] is Toeplitz, so for every feature a and column e, sum_j c_ij phi_a(k_j) v_je is a
  linear convolution, a product of spectra after zero-padding to n_fft >= 2L - 1 (a 2-3-5-smooth
  length): O(m (D + 1) L log L) time, the paper's algorithm. Work is chunked over (batch x head) rows
  and features so that a chunk holds at most ``_CHUNK_ELEMENTS`` numbers.
- "dense": blocks of queries against their keys, (phi_q phi_k^T * C * E) [v, 1] with E = 1, or the
  causal rescaling below: O(L^2 (m + D)) time, O(block x L) memory, half the keys when causal. All
  GEMMs, no FFT.

On a CPU an FFT step costs ~25 GEMM multiply-adds (``_FFT_COST``, measured here), so the dense path
is the faster one up to L ~ 4e4 (bidirectional) at m = 256, D = 64, and ~4e3 at m = 16, D = 8;
``toeplitz="auto"`` picks by that cost model for bidirectional attention and always picks dense for
causal attention (Stabilisers: the FFT path is not causal in floating point; by cost alone it would
win beyond L ~ 9e4 causal). Either way this is one to two orders of magnitude more work than plain
FAVOR+ (O(L m D)): the convolution needs all m (D + 1) channels at O(L log L) each, the dense path
L^2 (m + D) multiply-adds.

Precision. An FFT convolution's rounding error is set by the largest terms of the whole signal, not
by the terms one output row sums: a row whose visible c_ij phi(k_j) are all e^-20 below the largest
ones (early rows of causal attention see only a few offsets and keys; a bias ramping across offsets
does the same to late rows in both modes) would get float32 rounding noise 1e-7 * e^20 ~ 50 times its
own size. So the FFT path always convolves in float64 (relative noise ~1e-16 * e^20 ~ 1e-8 even
then), at about twice the cost of float32 FFTs. The dense path sums each row's own terms and runs in
the compute dtype (float32, or float64 for float64 input).

Stabilisers. exp(b) is shifted by the max of b per head (over the offsets the mode reads): a constant
per head cancels in the ratio and keeps c <= 1, so nothing overflows. Query features are those of
:func:`~protein_performer.ops.favor.softmax_kernel_features`, divided by their own row max (cancels
per query). Key features are exp(logit - offset), the offset chosen as in ``favor_attention``:
- bidirectional (both paths): one max over the valid keys of the (batch, head), a constant that
  cancels.
- causal, dense path (what "auto" runs; also :func:`implied_rpe_attention`): the running offset
  M_j = max over valid keys j' <= j. Key j is stored as exp(logit_j - M_j) <= 1 and query i reads it
  with the factor E_ij = exp(M_j - M_i) <= 1 (M is nondecreasing), multiplied into the [block, keys]
  weight block together with c_(j-i): exact exps on each query block's own keys, and on earlier keys
  a row scaling of the output and a column scaling of v through the offset just before the block
  (:func:`_decay_factors`), O(L (block + m + D)) extra work against L^2 (m + D) / 2 GEMM
  multiply-adds. Nothing query i reads depends on a key after i, and the weights of later keys are
  exact zeros, so outputs (and gradients of past outputs) at i <= t are bit-for-bit independent of
  positions > t, even when a future key's features would dwarf or underflow the past's.
- causal, FFT path (``toeplitz="fft"`` only): E_ij = exp(M_j) exp(-M_i) is rank one and could be
  folded into keys and queries, but M_j - M_0 is unbounded (a large-norm first key has a very
  negative logit), so exp(M_j - M_0) overflows; and even perfectly stabilised, an FFT convolution
  adds to every output rounding noise ~1e-16 times the largest terms of the whole signal, future
  positions included. So this path keeps the one shared max over all valid keys and is causal in
  exact arithmetic only: in floating point a future key perturbs earlier outputs by that rounding
  (relative size ~1e-16 times the dynamic range of the visible terms), and a future key whose logit
  rises far enough above the past keys' (50-70 nats suffice in float32, where features and their
  products phi(q).phi(k) underflow near e^-87; ~700 in float64) underflows their contributions,
  changing earlier outputs or turning them into zero rows. Use it for causal
  attention only to test the algorithm or when key logits are known to span a few tens of nats.
Padded keys are exactly invisible: they are zeroed (``masked_fill``) and excluded from the key
offsets (shared or running); padded queries get zero output rows, as in ``favor_attention``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from protein_performer.ops._checks import check_key_padding_mask, check_projection, check_self_attention, compute_dtype
from protein_performer.ops.favor import _decay, _masked, _running_key_offset, _softmax_logits, softmax_kernel_features
from protein_performer.ops.rpe_window import (
    WindowedBias,
    check_windowed_bias,
    default_block_size,
    expand_windowed_bias,
    windowed_attention_product,
    windowed_weights,
)

__all__ = ["WindowedBias", "expand_windowed_bias", "favor_rpe_attention", "implied_rpe_attention", "slice_rpe_bias"]

Toeplitz = Literal["auto", "fft", "dense"]

#: Upper bound on the elements of one [rows, features, D + 1, n_fft] FFT chunk (64 MB in float64) and
#: of one [rows, block, keys] score block of the dense path. A chunk's temporaries take a few times this.
_CHUNK_ELEMENTS = 1 << 23
#: The FFT path convolves in float64 whatever the input precision (see "Precision" above).
_FFT_DTYPE = torch.float64
#: Cost of one n log2 n step of an FFT channel (float64, forward + backward) in dense-path
#: multiply-adds, measured on this project's 2-core CPU (torch 2.13, MKL; 8 heads, m = 256, D = 64,
#: L = 1024..2048: the FFT path took 17-33x the dense path's time). "auto" uses the FFT when
#: m (D + 1) n_fft log2(n_fft) _FFT_COST < L keys (m + D + 1), keys = L (L / 2 causal).
_FFT_COST = 25.0


def slice_rpe_bias(rpe_bias: Tensor, length: int) -> Tensor:
    """Cut a relative-position bias learned for a maximum length down to ``length``.

    Args:
        rpe_bias: [heads, 2 * max_length - 1], entry (j - i) + max_length - 1 holds b_(j-i).
        length: the current sequence length L <= max_length.

    Returns:
        [heads, 2L - 1], the centre of ``rpe_bias`` (offsets -(L-1) .. L-1), a view.
    """
    if rpe_bias.dim() != 2 or rpe_bias.shape[1] % 2 != 1:
        raise ValueError(
            f"slice_rpe_bias: rpe_bias must be [heads, 2 * max_length - 1] (odd width), got {tuple(rpe_bias.shape)}."
        )
    max_length = (rpe_bias.shape[1] + 1) // 2
    if not 1 <= length <= max_length:
        raise ValueError(
            f"slice_rpe_bias: length {length} must be in [1, {max_length}] (the bias was sized for "
            f"max_length={max_length}); raise the model's max_length to attend over longer sequences."
        )
    return rpe_bias[:, max_length - length : max_length + length - 1]


def _fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: FFT libraries are fastest on such lengths."""
    best = 1 << max(n - 1, 0).bit_length()  # next power of two, always a candidate
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            size = power35
            while size < n:
                size *= 2
            best = min(best, size)
            power35 *= 3
        power5 *= 5
    return best


def _check(where: str, q: Tensor, k: Tensor, v: Tensor | None, projection: Tensor,
           rpe_bias: Tensor | WindowedBias, key_padding_mask: Tensor | None) -> None:
    check_self_attention(where, q, k, v)
    check_projection(where, projection, q.shape[-1])
    heads, length = q.shape[1], q.shape[2]
    if isinstance(rpe_bias, WindowedBias):
        check_windowed_bias(where, rpe_bias, heads)
    elif not isinstance(rpe_bias, Tensor) or rpe_bias.shape != (heads, 2 * length - 1):
        shape = tuple(rpe_bias.shape) if isinstance(rpe_bias, Tensor) else type(rpe_bias).__name__
        raise ValueError(
            f"{where}: rpe_bias must be [heads, 2L - 1] = {(heads, 2 * length - 1)} (the full form) or a "
            f"WindowedBias, got {shape}; a full bias sized for a longer max_length is cut with "
            "slice_rpe_bias(rpe_bias, L)."
        )
    check_key_padding_mask(where, key_padding_mask, k.shape[0], length)


def _features(
    q: Tensor, k: Tensor, projection: Tensor, key_padding_mask: Tensor | None, *, running: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """FAVOR+ softmax-kernel features, both zero at padding (padded queries get zero rows, as in
    ``favor_attention``); call with autocast off.

    Returns:
        phi_q [B, H, L, m], row-stabilised; phi_k [B, H, L, m]; key_offset [B, H, L] or None.
        ``running=False``: keys share one offset, the max over the valid keys (key_offset None).
        ``running=True`` (causal): key j is exp(logit_j - M_j) with M_j the running max over valid
        keys j' <= j (detached), returned as key_offset; the reader rescales by exp(M_j - M_i).
    """
    dtype = compute_dtype(q)
    q, k, projection = q.to(dtype), k.to(dtype), projection.to(dtype)
    phi_q = _masked(softmax_kernel_features(q, projection, is_query=True), key_padding_mask)
    if not running:
        return phi_q, softmax_kernel_features(k, projection, is_query=False, key_padding_mask=key_padding_mask), None
    logits = _softmax_logits(k, projection)
    key_offset = _running_key_offset(logits, key_padding_mask)
    return phi_q, _masked(torch.exp(logits - key_offset[..., None]), key_padding_mask), key_offset


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


def _relative_weights(rpe_bias: Tensor, causal: bool, dtype: torch.dtype) -> Tensor:
    """c = exp(b - max b) per head, [H, 2L - 1]; causal zeroes the offsets j - i > 0.

    The max is taken over the offsets the mode reads and detached: it cancels in the ratio."""
    b = rpe_bias.to(dtype)
    length = (b.shape[1] + 1) // 2
    read = b[:, :length] if causal else b
    c = torch.exp(b - read.amax(dim=1, keepdim=True).detach())
    if causal:
        c = torch.cat([c[:, :length], torch.zeros_like(c[:, length:])], dim=1)
    return c


def _circular_kernel(c: Tensor, n_fft: int) -> Tensor:
    """The circular kernel g with (g (*) x)_i = sum_j c_(j-i) x_j for i < L; [H, n_fft].

    (g (*) x)_i = sum_j g_(i-j) x_j needs g_t = c_(-t): t = 0..L-1 reads c at offsets 0, -1, .., -(L-1)
    (indices L-1 .. 0), and t = -1..-(L-1) wraps to n_fft - 1 .. n_fft - L + 1 (offsets 1 .. L-1)."""
    length = (c.shape[1] + 1) // 2
    gap = c.new_zeros(c.shape[0], n_fft - (2 * length - 1))
    return torch.cat([c[:, :length].flip(1), gap, c[:, length:].flip(1)], dim=1)


def _kernel_grad_to_c(grad_g: Tensor, length: int) -> Tensor:
    """Adjoint of :func:`_circular_kernel`: [H, n_fft] -> [H, 2L - 1]."""
    n_fft = grad_g.shape[1]
    return torch.cat([grad_g[:, :length].flip(1), grad_g[:, n_fft - length + 1 :].flip(1)], dim=1)


def _by_head(per_row: Tensor, heads: int) -> Tensor:
    """Sum [B * H, ...] over the batch (row b * H + h belongs to head h) -> [H, ...]."""
    return per_row.view(-1, heads, *per_row.shape[1:]).sum(dim=0)


def _padded_outer(a: Tensor, b: Tensor, n_fft: int) -> Tensor:
    """x[r, f, e, l] = a[r, l, f] b[r, l, e] for l < L, zero up to n_fft; [R, F, E, n_fft] float64."""
    rows, length, features = a.shape
    x = a.new_zeros(rows, features, b.shape[-1], n_fft, dtype=_FFT_DTYPE)
    torch.mul(a.transpose(1, 2)[:, :, None, :], b.transpose(1, 2)[:, None, :, :], out=x[..., :length])
    return x


def _fft_chunks(rows: int, features: int, columns: int, n_fft: int):
    """(row slice, feature slice) pairs covering the work in chunks of <= _CHUNK_ELEMENTS numbers."""
    per_row_feature = columns * n_fft
    row_chunk = max(1, min(rows, _CHUNK_ELEMENTS // per_row_feature))
    feature_chunk = max(1, min(features, _CHUNK_ELEMENTS // (row_chunk * per_row_feature)))
    for r0 in range(0, rows, row_chunk):
        for a0 in range(0, features, feature_chunk):
            yield slice(r0, min(r0 + row_chunk, rows)), slice(a0, min(a0 + feature_chunk, features))


class _ToeplitzFFT(torch.autograd.Function):
    """N[r, i, e] = sum_a phi_q[r, i, a] sum_j c[h(r), j - i + L - 1] phi_k[r, j, a] w[r, j, e] by FFT.

    phi_q, phi_k: [R, L, m]; w: [R, L, E]; c: [H, 2L - 1] with row r = b * H + h. Returns [R, L, E]
    float64. Saves only the inputs; the backward recomputes each chunk's spectra (4 FFT passes per
    chunk against the forward's 2)."""

    @staticmethod
    def forward(ctx, phi_q: Tensor, phi_k: Tensor, w: Tensor, c: Tensor) -> Tensor:
        rows, length, features = phi_k.shape
        heads = c.shape[0]
        n_fft = _fft_size(2 * length - 1)
        spectrum = torch.fft.rfft(_circular_kernel(c.to(_FFT_DTYPE), n_fft)).repeat(rows // heads, 1)  # (R, F)
        out = phi_q.new_zeros(rows, w.shape[-1], length, dtype=_FFT_DTYPE)  # (R, E, L)
        for r, a in _fft_chunks(rows, features, w.shape[-1], n_fft):
            x_hat = torch.fft.rfft(_padded_outer(phi_k[r, :, a], w[r], n_fft))  # (r, a, E, F)
            y = torch.fft.irfft(x_hat.mul_(spectrum[r, None, None, :]), n=n_fft)[..., :length]
            out[r] += (y * phi_q[r, :, a].transpose(1, 2).to(_FFT_DTYPE)[:, :, None, :]).sum(dim=1)
        ctx.save_for_backward(phi_q, phi_k, w, c)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        phi_q, phi_k, w, c = ctx.saved_tensors
        rows, length, features = phi_k.shape
        heads = c.shape[0]
        n_fft = _fft_size(2 * length - 1)
        spectrum = torch.fft.rfft(_circular_kernel(c.to(_FFT_DTYPE), n_fft)).repeat(rows // heads, 1)
        grad_t = grad_out.to(_FFT_DTYPE).transpose(1, 2)  # (R, E, L)
        grad_q = torch.empty_like(phi_q, dtype=_FFT_DTYPE)
        grad_k = torch.empty_like(phi_k, dtype=_FFT_DTYPE)
        grad_w = torch.zeros_like(w, dtype=_FFT_DTYPE).transpose(1, 2)  # (R, E, L)
        grad_kernel_hat = spectrum.new_zeros(spectrum.shape)  # sum over channels of rfft(grad y) conj(x_hat)
        for r, a in _fft_chunks(rows, features, w.shape[-1], n_fft):
            x_hat = torch.fft.rfft(_padded_outer(phi_k[r, :, a], w[r], n_fft))
            y = torch.fft.irfft(x_hat * spectrum[r, None, None, :], n=n_fft)[..., :length]  # (r, a, E, L)
            grad_q[r, :, a] = (y * grad_t[r, None]).sum(dim=2).transpose(1, 2)
            # d loss / d y is phi_q[i, a] grad[i, e] (zero beyond L): its spectrum drives both the
            # kernel gradient (a correlation with x) and the input gradient (a correlation with g).
            z_hat = torch.fft.rfft(_padded_outer(phi_q[r, :, a], grad_out[r], n_fft))
            grad_kernel_hat[r] += (z_hat * x_hat.conj_physical_()).sum(dim=(1, 2))
            grad_x = torch.fft.irfft(z_hat.mul_(spectrum[r, None, None, :].conj()), n=n_fft)[..., :length]
            grad_k[r, :, a] = (grad_x * w[r].transpose(1, 2).to(_FFT_DTYPE)[:, None]).sum(dim=2).transpose(1, 2)
            grad_w[r] += (grad_x * phi_k[r, :, a].transpose(1, 2).to(_FFT_DTYPE)[:, :, None, :]).sum(dim=1)
        grad_kernel = torch.fft.irfft(_by_head(grad_kernel_hat, heads), n=n_fft)  # (H, n_fft)
        grad_c = _kernel_grad_to_c(grad_kernel, length)
        return (grad_q.to(phi_q.dtype), grad_k.to(phi_k.dtype), grad_w.transpose(1, 2).to(w.dtype), grad_c.to(c.dtype))


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
            _add_diagonal_sums(grad_c, _by_head(grad_weights * scores, heads), start, stop)
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


def _use_fft(length: int, features: int, columns: int, causal: bool) -> bool:
    """The "auto" choice: never for causal attention (the FFT path is not causal in floating point,
    module docstring), else FFT when its modelled cost is below the dense path's (``_FFT_COST``)."""
    if causal:
        return False
    n_fft = _fft_size(2 * length - 1)
    fft = features * columns * n_fft * math.log2(max(n_fft, 2)) * _FFT_COST
    return fft < length * length * (features + columns)


def favor_rpe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    rpe_bias: Tensor | WindowedBias,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    toeplitz: Toeplitz = "auto",
    block_size: int | None = None,
) -> Tensor:
    """FAVOR+ attention with relative positional encoding (module docstring).

    Args:
        q, k, v: [batch, heads, length, head_dim] (q, k unscaled; the features apply 1/sqrt(d)); v may
            be narrower or wider than q and k.
        projection: [nb_features, head_dim], as for :func:`~protein_performer.ops.favor_attention`.
        rpe_bias: in log space (c = exp(b)), differentiable, in one of two forms:
            - a :class:`~protein_performer.ops.rpe_window.WindowedBias` (band [heads, 2w - 1], far
              [heads, 2]): free within |j - i| < w, one value per direction beyond. Exact FAVOR+
              prefix/suffix states plus a blocked band, O(L w (m + D)); any length.
            - a full bias [heads, 2L - 1], b_(j-i) at index (j - i) + L - 1, by FFT or dense blocks
              (``toeplitz``). Cut a longer learned bias with :func:`slice_rpe_bias`.
        causal: query i sees keys j <= i only.
        key_padding_mask: bool [batch, length], True at padded keys. Padded positions are also
            dropped as queries (zero output rows), as in ``favor_attention``.
        toeplitz: full bias only: "fft" (O(L log L m D), the paper's algorithm), "dense" (O(L^2 (m + D))
            by blocks) or "auto" (bidirectional: the cheaper one by the CPU cost model; causal: always
            dense). All agree in exact arithmetic; only dense is causal in floating point.
        block_size: windowed bias only: queries per block of the band product; None = the window
            w clamped to [16, 128]. The result does not depend on it.

    Returns:
        [batch, heads, length, v's head_dim] in v's dtype (features in float32, or float64 for
        float64 input); equals ``implied_rpe_attention(q, k, projection, rpe_bias, ...) @ v``. A query
        that sees no key gets a zero row. ``rpe_bias = 0`` gives ``favor_attention``.
    """
    _check("favor_rpe_attention", q, k, v, projection, rpe_bias, key_padding_mask)
    if toeplitz not in ("auto", "fft", "dense"):
        raise ValueError(f"favor_rpe_attention: toeplitz must be 'auto', 'fft' or 'dense', got {toeplitz!r}.")
    windowed = isinstance(rpe_bias, WindowedBias)
    if windowed and toeplitz != "auto":
        raise ValueError(
            f"favor_rpe_attention: toeplitz={toeplitz!r} applies to a full [heads, 2L - 1] bias; a WindowedBias "
            "has one algorithm (leave toeplitz='auto')."
        )
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"favor_rpe_attention: block_size must be a positive integer or None, got {block_size!r}.")
    B, H, L, D = v.shape
    with torch.autocast(device_type=q.device.type, enabled=False):
        use_fft = not windowed and (
            toeplitz == "fft" or (toeplitz == "auto" and _use_fft(L, projection.shape[0], D + 1, causal)))
        dtype = compute_dtype(q)
        value = v.to(dtype)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        # A column of ones turns the same product into the denominator (padded keys have phi_k = 0).
        w = torch.cat([value, value.new_ones(B, H, L, 1)], dim=-1)  # (B, H, L, D + 1)
        if windowed:  # features built inside, straight into the block layout
            block = default_block_size(rpe_bias.window) if block_size is None else block_size
            c = windowed_weights(rpe_bias, causal, dtype)
            product = windowed_attention_product(q.to(dtype), k.to(dtype), w, c, projection.to(dtype),
                                                 key_padding_mask, causal, block)
        else:
            # The dense path reads causal keys through running offsets; the FFT needs one shared offset.
            phi_q, phi_k, key_offset = _features(q, k, projection, key_padding_mask, running=causal and not use_fft)
            m = phi_q.shape[-1]
            args = (phi_q.reshape(B * H, L, m), phi_k.reshape(B * H, L, m), w.reshape(B * H, L, D + 1))
            if use_fft:
                product = _ToeplitzFFT.apply(*args, _relative_weights(rpe_bias, causal, _FFT_DTYPE))
            else:
                offset = None if key_offset is None else key_offset.reshape(B * H, L)
                product = _ToeplitzDense.apply(*args, _relative_weights(rpe_bias, causal, dtype), offset, causal)
        product = product.view(B, H, L, D + 1)
        numerator, denominator = product[..., :D], product[..., D]
        # A zero denominator (no visible key) comes with a zero numerator: return a zero row, not NaN.
        out = numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))[..., None]
    return out.to(v.dtype)


def implied_rpe_attention(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    rpe_bias: Tensor | WindowedBias,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The row-normalised [L, L] matrix that :func:`favor_rpe_attention` applies to V, materialised.

    A_ij = c_ij phi(q_i).phi(k_j) / sum_j' c_ij' phi(q_i).phi(k_j'): the dense O(L^2) reference of the
    FFT, dense and windowed paths, and attention maps for short sequences. ``rpe_bias`` takes either
    form of :func:`favor_rpe_attention`; a WindowedBias is expanded to every offset first.

    Returns:
        [batch, heads, length, length] in float32 (float64 for float64 input); rows sum to 1 (zero rows
        for padded queries and for queries that see no key).
    """
    _check("implied_rpe_attention", q, k, None, projection, rpe_bias, key_padding_mask)
    L = q.shape[2]
    if isinstance(rpe_bias, WindowedBias):
        rpe_bias = expand_windowed_bias(rpe_bias, L)
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q, phi_k, key_offset = _features(q, k, projection, key_padding_mask, running=causal)
        c = _relative_weights(rpe_bias, causal, phi_q.dtype)  # (H, 2L - 1)
        positions = torch.arange(L, device=q.device)
        offsets = positions[None, :] - positions[:, None] + L - 1  # (L, L): (j - i) + L - 1
        scores = (phi_q @ phi_k.transpose(-1, -2)) * c[:, offsets]  # (B, H, L, L)
        if key_offset is not None:  # causal: the same running-offset rescaling as the dense path
            scores = scores * _decay(key_offset[..., :, None], key_offset[..., None, :])
        denominator = scores.sum(dim=-1, keepdim=True)
        return scores / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
