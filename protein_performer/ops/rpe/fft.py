"""The Toeplitz product of full-bias favor_rpe by FFT (the paper's algorithm), O(m (D + 1) L log L).

N_i = sum_j c_(j-i) phi(q_i).phi(k_j) [v_j, 1] (the trailing 1 gives the denominator): C = [c_ij] is
Toeplitz, so for every feature a and column e, sum_j c_ij phi_a(k_j) v_je is a linear convolution, a
product of spectra after zero-padding to n_fft >= 2L - 1 (a 2-3-5-smooth length). Work is chunked over
(batch x head) rows and features so that a chunk holds at most ``_CHUNK_ELEMENTS`` numbers; the custom
autograd function stores no O(L^2) or O(L m D) activations and recomputes spectra in the backward pass.

Precision. An FFT convolution's rounding error is set by the largest terms of the whole signal, not
by the terms one output row sums: a row whose visible c_ij phi(k_j) are all e^-20 below the largest
ones (early rows of causal attention see only a few offsets and keys; a bias ramping across offsets
does the same to late rows in both modes) would get float32 rounding noise 1e-7 * e^20 ~ 50 times its
own size. So the FFT path always convolves in float64 (relative noise ~1e-16 * e^20 ~ 1e-8 even
then), at about twice the cost of float32 FFTs.

Causal attention. E_ij = exp(M_j) exp(-M_i) (running key offsets) is rank one and could be folded into
keys and queries, but M_j - M_0 is unbounded, so exp(M_j - M_0) overflows; and even perfectly
stabilised, an FFT convolution adds to every output rounding noise ~1e-16 times the largest terms of the
whole signal, future positions included. So this path keeps the one shared max over all valid keys and
is causal in exact arithmetic only: in floating point a future key perturbs earlier outputs by that
rounding, and a future key whose logit rises far enough above the past keys' (50-70 nats in float32,
~700 in float64) underflows their contributions. ``toeplitz="auto"`` never picks it for causal
attention; use it causally only to test the algorithm or when key logits span a few tens of nats.

When the FFT pays (``toeplitz="auto"``, bidirectional): a flop model. The dense path costs
L keys (m + D + 1) GEMM multiply-adds; the FFT path m (D + 1) n_fft log2(n_fft) FFT steps, each worth
``FFT_STEP_COST[device type]`` multiply-adds. That ratio is not a constant of nature: it is how much
slower a float64 FFT step runs than a GEMM multiply-add in the compute dtype on that kind of device.
GEMMs run near peak; FFTs are memory-bound and float64 here. On a CPU (MKL) one step cost ~25
multiply-adds (8 heads, m = 256, D = 64, L = 1024..2048: the FFT path took 17-33x the dense path's
time), so the FFT wins beyond L ~ 4e4 at m = 256, D = 64. On a GPU tensor-core GEMMs widen the gap by
one to two orders of magnitude and float64 runs at 1/2 to 1/64 of the float32 rate, so with no
measurement the FFT is never chosen automatically there (cost inf). Set ``FFT_STEP_COST["cuda"]``
(or any device type) to a value measured with ``benchmarks/attention.py``, or pass ``toeplitz="fft"``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from protein_performer.ops.rpe.bias import sum_by_head

__all__ = ["FFT_DTYPE", "FFT_STEP_COST", "fft_size", "toeplitz_fft", "use_fft"]

#: Upper bound on the elements of one [rows, features, D + 1, n_fft] FFT chunk (64 MB in float64). A
#: chunk's temporaries take a few times this.
_CHUNK_ELEMENTS = 1 << 23
#: The FFT path convolves in float64 whatever the input precision (see "Precision" above).
FFT_DTYPE = torch.float64
#: Cost of one n log2 n step of an FFT channel (float64, forward + backward) in dense-path GEMM
#: multiply-adds, per torch device type (module docstring); a device type not listed never picks the
#: FFT by itself. Overridable: ``FFT_STEP_COST["cuda"] = <measured>``.
FFT_STEP_COST: dict[str, float] = {"cpu": 25.0}


def fft_size(n: int) -> int:
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


def _padded_outer(a: Tensor, b: Tensor, n_fft: int) -> Tensor:
    """x[r, f, e, l] = a[r, l, f] b[r, l, e] for l < L, zero up to n_fft; [R, F, E, n_fft] float64."""
    rows, length, features = a.shape
    x = a.new_zeros(rows, features, b.shape[-1], n_fft, dtype=FFT_DTYPE)
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
        n_fft = fft_size(2 * length - 1)
        spectrum = torch.fft.rfft(_circular_kernel(c.to(FFT_DTYPE), n_fft)).repeat(rows // heads, 1)  # (R, F)
        out = phi_q.new_zeros(rows, w.shape[-1], length, dtype=FFT_DTYPE)  # (R, E, L)
        for r, a in _fft_chunks(rows, features, w.shape[-1], n_fft):
            x_hat = torch.fft.rfft(_padded_outer(phi_k[r, :, a], w[r], n_fft))  # (r, a, E, F)
            y = torch.fft.irfft(x_hat.mul_(spectrum[r, None, None, :]), n=n_fft)[..., :length]
            out[r] += (y * phi_q[r, :, a].transpose(1, 2).to(FFT_DTYPE)[:, :, None, :]).sum(dim=1)
        ctx.save_for_backward(phi_q, phi_k, w, c)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        phi_q, phi_k, w, c = ctx.saved_tensors
        rows, length, features = phi_k.shape
        heads = c.shape[0]
        n_fft = fft_size(2 * length - 1)
        spectrum = torch.fft.rfft(_circular_kernel(c.to(FFT_DTYPE), n_fft)).repeat(rows // heads, 1)
        grad_t = grad_out.to(FFT_DTYPE).transpose(1, 2)  # (R, E, L)
        grad_q = torch.empty_like(phi_q, dtype=FFT_DTYPE)
        grad_k = torch.empty_like(phi_k, dtype=FFT_DTYPE)
        grad_w = torch.zeros_like(w, dtype=FFT_DTYPE).transpose(1, 2)  # (R, E, L)
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
            grad_k[r, :, a] = (grad_x * w[r].transpose(1, 2).to(FFT_DTYPE)[:, None]).sum(dim=2).transpose(1, 2)
            grad_w[r] += (grad_x * phi_k[r, :, a].transpose(1, 2).to(FFT_DTYPE)[:, :, None, :]).sum(dim=1)
        grad_kernel = torch.fft.irfft(sum_by_head(grad_kernel_hat, heads), n=n_fft)  # (H, n_fft)
        grad_c = _kernel_grad_to_c(grad_kernel, length)
        return (grad_q.to(phi_q.dtype), grad_k.to(phi_k.dtype), grad_w.transpose(1, 2).to(w.dtype), grad_c.to(c.dtype))


def toeplitz_fft(phi_q: Tensor, phi_k: Tensor, w: Tensor, c: Tensor) -> Tensor:
    """See :class:`_ToeplitzFFT`: [R, L, E] in float64, differentiable in all four inputs."""
    return _ToeplitzFFT.apply(phi_q, phi_k, w, c)


def use_fft(length: int, features: int, columns: int, causal: bool, device_type: str = "cpu") -> bool:
    """The "auto" choice: never for causal attention (the FFT path is not causal in floating point,
    module docstring), else FFT when its modelled cost on ``device_type`` is below the dense path's."""
    step_cost = FFT_STEP_COST.get(device_type, math.inf)
    if causal or math.isinf(step_cost):
        return False
    n_fft = fft_size(2 * length - 1)
    fft = features * columns * n_fft * math.log2(max(n_fft, 2)) * step_cost
    return fft < length * length * (features + columns)
