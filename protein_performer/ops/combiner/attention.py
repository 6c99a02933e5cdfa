"""Combiner (Ren et al., "Combiner: Full Attention Transformer with Sparse Computation Cost", NeurIPS
2021): softmax attention with full support at O(L sqrt L) cost.

Attention is a conditional expectation E_{p(j|i)}[v_j]. Combiner partitions the keys a query i may see
into a direct part Omega_i^0 and regions Omega_i^r, and factorises

    p(j | i) = exp(q_i.k_j) / Z_i                          for j in Omega_i^0
    p(j | i) = exp(q_i.k~_r) / Z_i * q(j | Omega_i^r)      for j in Omega_i^r
    Z_i      = sum_{j in Omega_i^0} exp(q_i.k_j) + sum_r exp(q_i.k~_r)      (one joint normaliser)

A region is summarised by a key k~_r (max-pooled keys of the region) and a value: the expectation of
v under q(j | Omega_r) = softmax_{j in Omega_r}(q~_r.k_j), the region's own attention with its
max-pooled query q~_r. Every allowed key gets positive weight and each row sums to 1. Queries and keys
arrive unscaled; q is multiplied by 1/sqrt(d) first (max pooling commutes with that scale).

Variants (``block_size`` = s, default ceil(sqrt(L))):
- "fixed" (Combiner-Fixed): blocks of s consecutive positions. Direct: the query's own block
  (positions <= i when causal). Regions: every other block (earlier blocks only when causal).
  Per query s + L/s terms.
- "axial" (Combiner-Axial, the paper's vertical factorisation): the sequence is read as rows of s
  positions, position i at (row i // s, column i % s). Direct: the query's own row (columns <= its own
  when causal) and its own column (earlier rows when causal, all other rows otherwise). Regions: for
  every other column r, the part of column r above the query's row, and when bidirectional also the
  part below it. The region "column r, rows < S" has its own pooled key, query and value for every
  row S (prefix maxima and prefix attention), so per query s + L/s + 2s terms.
``block_size=1`` and ``block_size=L`` both reduce to exact softmax attention. A length that is not a
multiple of s gets an invisible padded tail.

Padding (``key_padding_mask`` bool [batch, length], True at padding) is invisible: padded positions
are left out of every direct set, every pooled key and query and every region's attention; a region
with no valid position is dropped. Padded positions get zero rows, and so does a query that sees no key
(as in ``softmax_attention``). Whatever padding holds (even inf or NaN) reaches no output and no gradient.

The reference (`ops.combiner.reference`) builds the dense [L, L] matrix of the same factorisation from
explicit per-query membership masks (no block reshapes), for tests and attention maps.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from protein_performer.ops.combiner.reference import check_combiner, masked_softmax
from protein_performer.ops.stabilise import masked

__all__ = ["Variant", "combiner_attention"]

Variant = Literal["fixed", "axial"]
_NEG_INF = float("-inf")


def _masked_max(x: Tensor, keep: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Max of x over ``dim`` among ``keep`` positions, 0 where there are none; and that any-mask."""
    pooled = x.masked_fill(~keep, _NEG_INF).amax(dim=dim)
    nonempty = keep.any(dim=dim)
    return torch.where(nonempty, pooled, torch.zeros_like(pooled)), nonempty


def _exclusive_cummax(x: Tensor, keep: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Running max over ``dim`` of the ``keep`` entries strictly before each index (0 where none), and
    whether there are any (in keep's shape). x: [..., n, ..., D]; keep: bool, broadcastable to x and of
    full size along ``dim``."""
    running = torch.cummax(x.masked_fill(~keep, _NEG_INF), dim=dim).values
    nonempty = torch.cummax(keep.to(torch.uint8), dim=dim).values.bool()
    n = x.shape[dim]
    shifted = torch.cat([torch.full_like(running.narrow(dim, 0, 1), _NEG_INF), running.narrow(dim, 0, n - 1)], dim=dim)
    before = torch.cat([torch.zeros_like(nonempty.narrow(dim, 0, 1)), nonempty.narrow(dim, 0, n - 1)], dim=dim)
    return torch.where(before, shifted, torch.zeros_like(shifted)), before


def _fixed(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, causal: bool, s: int) -> Tensor:
    """Combiner-Fixed on block-padded inputs: q, k [B, H, n*s, D], v [B, H, n*s, Dv] (q scaled, v zero
    where invalid), valid [B, n*s] bool. Returns [B, H, n*s, Dv]."""
    B, H, Lp, D = q.shape
    n = Lp // s
    qb, kb = (t.view(B, H, n, s, D) for t in (q, k))
    vb = v.view(B, H, n, s, v.shape[-1])
    key_ok = valid.view(B, 1, n, s)  # (B, 1, n, s)

    # Block summaries: pooled key and query, and the block's own attention over its keys.
    k_sum, block_ok = _masked_max(kb, key_ok[..., None], dim=3)  # (B, H, n, D), (B, 1, n, 1)
    q_sum, _ = _masked_max(qb, key_ok[..., None], dim=3)
    block_ok = block_ok[..., 0]  # (B, 1, n)
    local = torch.einsum("bhnd,bhnsd->bhns", q_sum, kb)
    v_sum = torch.einsum("bhns,bhnsd->bhnd", masked_softmax(local, key_ok), vb)  # (B, H, n, D)

    # Direct scores inside the own block, summary scores against every block, one joint softmax.
    direct = qb @ kb.transpose(-1, -2)  # (B, H, n, s, s)
    direct_ok = key_ok[:, :, :, None, :]
    if causal:
        direct_ok = direct_ok & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    summary = torch.einsum("bhnsd,bhrd->bhnsr", qb, k_sum)  # (B, H, n, s, n)
    blocks = torch.arange(n, device=q.device)
    other = blocks[None, :] < blocks[:, None] if causal else blocks[None, :] != blocks[:, None]  # (n, r)
    summary_ok = block_ok[:, :, None, None, :] & other[:, None, :]  # (B, 1, n, 1, n)
    weights = masked_softmax(
        torch.cat([direct, summary], dim=-1),
        torch.cat([direct_ok.expand(B, 1, n, s, s), summary_ok.expand(B, 1, n, s, n)], dim=-1),
    )
    out = weights[..., :s] @ vb + weights[..., s:] @ v_sum[:, :, None]  # (B, H, n, s, Dv)
    return out.reshape(B, H, Lp, -1)


def _axial(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, causal: bool, s: int) -> Tensor:
    """Combiner-Axial on row-padded inputs: q, k [B, H, n*s, D], v [B, H, n*s, Dv] (q scaled, v zero
    where invalid), valid [B, n*s]. Position (S, U) = row S, column U. Returns [B, H, n*s, Dv]."""
    B, H, Lp, D = q.shape
    n, m = Lp // s, s
    device = q.device
    qg, kg = (t.view(B, H, n, m, D) for t in (q, k))  # (B, H, S, U, D)
    vg = v.view(B, H, n, m, v.shape[-1])
    key_ok = valid.view(B, 1, n, m)
    qc, kc, vc = (t.transpose(2, 3) for t in (qg, kg, vg))  # column-major views (B, H, U, S, D)
    key_ok_c = key_ok.transpose(2, 3)  # (B, 1, U, S)
    rows, cols = torch.arange(n, device=device), torch.arange(m, device=device)

    # Direct: own row (B, H, S, U, T) and own column (B, H, U, S, T), the query itself counted in the row.
    row_scores = qg @ kg.transpose(-1, -2)
    row_ok = key_ok[:, :, :, None, :]
    if causal:
        row_ok = row_ok & (cols[None, :] <= cols[:, None])
    col_scores = (qc @ kc.transpose(-1, -2)).transpose(2, 3)  # (B, H, S, U, T)
    col_mask = rows[None, :] < rows[:, None] if causal else rows[None, :] != rows[:, None]  # (S, T)
    col_ok = key_ok_c[:, :, None, :, :] & col_mask[:, None, :]  # (B, 1, S, U, T): key (T, U) valid

    scores = [row_scores, col_scores]
    allowed = [row_ok.expand(B, 1, n, m, m), col_ok]
    summaries = []
    directions = (False,) if causal else (False, True)
    for below in directions:
        # Region (S, r): column r, rows before S (rows after S for ``below``), per column r.
        kc_d, qc_d, vc_d, ok_d = (t.flip(3) if below else t for t in (kc, qc, vc, key_ok_c))
        k_reg, reg_ok = _exclusive_cummax(kc_d, ok_d[..., None], dim=3)  # (B, H, r, S, D), (B, 1, r, S, 1)
        q_reg, _ = _exclusive_cummax(qc_d, ok_d[..., None], dim=3)
        reg_ok = reg_ok[..., 0]  # (B, 1, r, S)
        local = q_reg @ kc_d.transpose(-1, -2)  # (B, H, r, S, T): region (S, r) attends its rows T < S
        local_ok = ok_d[:, :, :, None, :] & (rows[None, :] < rows[:, None])
        v_reg = masked_softmax(local, local_ok) @ vc_d  # (B, H, r, S, D)
        if below:
            k_reg, v_reg, reg_ok = k_reg.flip(3), v_reg.flip(3), reg_ok.flip(3)
        k_reg, v_reg, reg_ok = k_reg.transpose(2, 3), v_reg.transpose(2, 3), reg_ok.transpose(2, 3)  # (.., S, r, ..)
        scores.append(qg @ k_reg.transpose(-1, -2))  # (B, H, S, U, r)
        allowed.append(reg_ok[:, :, :, None, :] & (cols[None, :] != cols[:, None]))  # (B, 1, S, U, r)
        summaries.append(v_reg)

    widths = [t.shape[-1] for t in scores]
    weights = masked_softmax(torch.cat(scores, dim=-1), torch.cat([a.expand(B, 1, n, m, -1) for a in allowed], -1))
    parts = weights.split(widths, dim=-1)
    out = parts[0] @ vg  # own row
    out = out + (parts[1].transpose(2, 3) @ vc).transpose(2, 3)  # own column: (B, H, U, S, T) @ (B, H, U, T, D)
    for part, v_reg in zip(parts[2:], summaries):
        out = out + part @ v_reg  # (B, H, S, U, r) @ (B, H, S, r, Dv)
    return out.reshape(B, H, Lp, -1)


def combiner_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    block_size: int | None = None,
    variant: Variant = "fixed",
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Combiner attention (module docstring), O(L sqrt L) time and memory for s ~ sqrt(L).

    Args:
        q, k: [batch, heads, length, head_dim] (unscaled); v: [batch, heads, length, value_dim], any width.
        causal: query i sees keys j <= i only, directly or through summaries of fully-past regions.
        block_size: block length ("fixed") or row length ("axial"); None = ceil(sqrt(L)); clamped to L.
        variant: "fixed" or "axial".
        key_padding_mask: bool [batch, length], True at padded keys.

    Returns:
        [batch, heads, length, value_dim] in v's dtype (computed in float32, or float64 for float64
        input, also under bf16/fp16 autocast); equals ``combiner_attention_weights(q, k, ...) @ v``.
    """
    s = check_combiner("combiner_attention", q, k, v, variant, block_size, key_padding_mask)
    B, H, L, D = q.shape
    n = math.ceil(L / s)
    pad = n * s - L
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    valid = torch.ones(B, L, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
    with torch.autocast(device_type=q.device.type, enabled=False):
        # q, k and v are zeroed at padding so junk there can never reach an output or a gradient through
        # a zero weight (0 * inf = NaN); the tail that fills the last block is zeros (and invalid) too.
        valid = F.pad(valid, (0, pad), value=False)
        q = F.pad(masked(q.to(dtype), key_padding_mask) * D**-0.5, (0, 0, 0, pad))
        k = F.pad(masked(k.to(dtype), key_padding_mask), (0, 0, 0, pad))
        v_padded = F.pad(masked(v.to(dtype), key_padding_mask), (0, 0, 0, pad))
        out = (_fixed if variant == "fixed" else _axial)(q, k, v_padded, valid, causal, s)
    return masked(out[:, :, :L], key_padding_mask).to(v.dtype)  # padded positions' own rows are zero
