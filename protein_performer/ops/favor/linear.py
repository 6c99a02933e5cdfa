"""Linear attention on given features with hand-written backward passes: the fast path of FAVOR+.

On CPU the time goes to memory traffic over [L, m] tensors as much as to FLOPs, so
- the denominator rides as an extra column of ones in v, so numerator and denominator come out of the
  same matmuls ("augmented" v, D + 1 columns),
- the causal path batches every chunk into single batched matmuls; only the small per-chunk state
  [m, D + 1] is scanned (`ops.stabilise.decayed_scan`), and no [L, m, D] tensor ever exists,
- only what the backward needs is saved.
The references are `ops.favor.reference` (the same chunked computation in plain autograd, and the
dense implied matrix).
"""
from __future__ import annotations

import torch
from torch import Tensor

from protein_performer.ops.stabilise import decayed_scan

__all__ = ["DEFAULT_CHUNK_SIZE", "linear_backward", "linear_forward"]

#: Default block length of the chunked causal path: long enough for efficient matmuls, short enough
#: that the within-chunk [chunk, chunk] score matrices stay small.
DEFAULT_CHUNK_SIZE = 64


def _augment(v: Tensor) -> Tensor:
    """[..., D] -> [..., D + 1] with a trailing column of ones (the denominator rides along)."""
    return torch.nn.functional.pad(v, (0, 1), value=1.0)


def _normalise(num_aug: Tensor) -> tuple[Tensor, Tensor]:
    """Split an augmented numerator into (output [..., D], safe denominator [...])."""
    denominator = num_aug[..., -1]
    denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return num_aug[..., :-1] / denominator[..., None], denominator


def _augmented_output_grad(grad_out: Tensor, out: Tensor, denominator: Tensor) -> Tensor:
    """d loss / d [numerator, denominator] for out = numerator / denominator; [..., D + 1]."""
    grad_value = grad_out * denominator.reciprocal()[..., None]
    # One cat, not writes into column views of an empty tensor: torch.compile cannot trace `out=` into
    # a non-contiguous view (a graph break in every backward).
    return torch.cat([grad_value, -(grad_value * out).sum(dim=-1, keepdim=True)], dim=-1)


def _bidirectional_forward(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, tuple]:
    """Bidirectional linear attention on features [B, H, L, m] and values [B, H, L, D]."""
    v_aug = _augment(value)
    kv = key.transpose(-1, -2) @ v_aug  # (B, H, m, D + 1)
    out, denominator = _normalise(query @ kv)
    return out, (query, key, v_aug, kv, out, denominator)


def _bidirectional_backward(saved: tuple, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    query, key, v_aug, kv, out, denominator = saved
    grad_num = _augmented_output_grad(grad_out, out, denominator)  # (B, H, L, D + 1)
    grad_query = grad_num @ kv.transpose(-1, -2)
    grad_kv = query.transpose(-1, -2) @ grad_num  # (B, H, m, D + 1)
    grad_key = v_aug @ grad_kv.transpose(-1, -2)
    grad_value = key @ grad_kv[..., :-1]
    return grad_query, grad_key, grad_value


def _causal_forward(
    query: Tensor, key: Tensor, value: Tensor, key_offset: Tensor | None, chunk_size: int
) -> tuple[Tensor, tuple]:
    """Chunked causal linear attention with running key offsets (reference: `favor.reference.causal_reference`).

    query, key [B, H, L, m]; value [B, H, L, D]; key_offset [B, H, L] or None; L a multiple of
    chunk_size. Internally tensors are viewed as [B*H, n_chunks, chunk, *]. For chunk c with end offset
    e_c the state after it is S_c = sum over keys j up to its end of exp(logit_j - e_c) [v_j, 1].
    """
    B, H, L, m = query.shape
    D = value.shape[-1]
    n, C = L // chunk_size, chunk_size
    g = query.reshape(B * H, n, C, m)
    f = key.reshape(B * H, n, C, m)
    v_aug = _augment(value).reshape(B * H, n, C, D + 1)

    scores = g @ f.transpose(-1, -2)  # (BH, n, C, C)
    if key_offset is not None:
        # Offsets are finite and nondecreasing along the sequence, so every factor below is <= 1.
        offset = key_offset.reshape(B * H, n, C)
        end = offset[..., -1].contiguous()  # (BH, n): e_c
        # e_{c-1}; for chunk 0 (empty state) the first offset, the smallest, keeps factors <= 1
        previous_end = torch.cat([offset[:, :1, 0], end[:, :-1]], dim=1)
        # key j read by query i of the same chunk: exp(M_j - M_i), zero above the diagonal
        decay = (offset[..., None, :] - offset[..., :, None]).exp_().tril_()
        scores.mul_(decay)
        to_end = (offset - end[..., None]).exp_()  # (BH, n, C): key j -> e_c
        to_query = (previous_end[..., None] - offset).exp_()  # (BH, n, C): state e_{c-1} -> M_i
        v_end = v_aug * to_end[..., None]
    else:
        decay = to_end = to_query = end = previous_end = None
        scores.tril_()
        v_end = v_aug
    chunk_sums = (f.transpose(-1, -2) @ v_end).view(B * H, n, m * (D + 1))
    state = decayed_scan(chunk_sums, end, previous_end).view(B * H, n, m, D + 1)  # before chunk c
    inter = g @ state  # (BH, n, C, D + 1)
    if to_query is not None:
        inter.mul_(to_query[..., None])
    num_aug = inter.view(B * H * n, C, D + 1).baddbmm_(scores.view(B * H * n, C, C), v_aug.view(B * H * n, C, D + 1))
    num_aug = num_aug.view(B * H, n, C, D + 1)
    out, denominator = _normalise(num_aug)
    saved = (g, f, v_aug, v_end, scores, state, out, denominator, decay, to_end, to_query, end, previous_end)
    return out.view(B, H, L, D), saved


def _causal_backward(saved: tuple, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    g, f, v_aug, v_end, scores, state, out, denominator, decay, to_end, to_query, end, previous_end = saved
    BH, n, C, m = g.shape
    B, H, L, D = grad_out.shape
    grad_num = _augmented_output_grad(grad_out.reshape(BH, n, C, D), out, denominator)  # (BH, n, C, D + 1)
    grad_inter = grad_num * to_query[..., None] if to_query is not None else grad_num

    grad_scores = grad_num @ v_aug.transpose(-1, -2)  # (BH, n, C, C)
    if decay is not None:
        grad_scores.mul_(decay)
    else:
        grad_scores.tril_()
    # d loss / d S_c (the state after chunk c) = sum over later chunks c' of their reads, each
    # rescaled by exp(e_c - e_{c'-1}): the adjoint (reverse) scan.
    reads = (g.transpose(-1, -2) @ grad_inter).view(BH, n, m * (D + 1))
    source, target = (None, None) if end is None else (previous_end.neg(), end.neg())
    state_grad = decayed_scan(reads, source, target, reverse=True).view(BH, n, m, D + 1)

    flat = BH * n
    grad_g = (grad_inter @ state.transpose(-1, -2)).view(flat, C, m)
    grad_g.baddbmm_(grad_scores.view(flat, C, C), f.reshape(flat, C, m))
    grad_f = (v_end @ state_grad.transpose(-1, -2)).view(flat, C, m)
    grad_f.baddbmm_(grad_scores.view(flat, C, C).transpose(-1, -2), g.reshape(flat, C, m))
    grad_v = f @ state_grad[..., :-1]  # (BH, n, C, D): through the chunk sums
    if to_end is not None:
        grad_v.mul_(to_end[..., None])
    grad_v = grad_v.view(flat, C, D).baddbmm_(
        scores.view(flat, C, C).transpose(-1, -2), grad_num[..., :-1].reshape(flat, C, D)
    )
    return grad_g.view(B, H, L, m), grad_f.view(B, H, L, m), grad_v.view(B, H, L, D)


def linear_forward(query, key, value, key_offset, causal: bool, chunk_size: int) -> tuple[Tensor, tuple]:
    if causal:
        return _causal_forward(query, key, value, key_offset, chunk_size)
    return _bidirectional_forward(query, key, value)


def linear_backward(saved: tuple, grad_out: Tensor, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _causal_backward(saved, grad_out) if causal else _bidirectional_backward(saved, grad_out)
