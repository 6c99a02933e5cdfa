"""The dense O(L^2) reference of Combiner attention: its [L, L] matrix, materialised from masks.

Each query's direct keys, each region's members and the regions each query uses are explicit masks
built from positions only (:func:`_regions`); region summaries (max-pooled key and query, the region's
own attention) and one joint softmax then give the matrix. No block reshapes: a different route to the
same factorisation as the fast path (`ops.combiner.attention`). Also the one rule for the default
block size and the argument checks, which both paths share.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from protein_performer.ops._checks import check_key_padding_mask, check_self_attention

__all__ = ["check_combiner", "combiner_attention_weights", "default_block_size", "masked_softmax"]

_NEG_INF = float("-inf")


def default_block_size(length: int) -> int:
    """ceil(sqrt(L)): balances the s direct and L/s summary terms of each query.

    The one default: the ops apply it to the input length, PerformerConfig to max_length (so that a
    model's block partition does not depend on how much padding a batch carries)."""
    return max(1, math.ceil(math.sqrt(length)))


def check_combiner(where: str, q: Tensor, k: Tensor, v: Tensor | None, variant: str, block_size: int | None,
                   key_padding_mask: Tensor | None) -> int:
    """Validate the arguments; returns the block size to use (clamped to [1, L])."""
    check_self_attention(where, q, k, v)
    if variant not in ("fixed", "axial"):
        raise ValueError(f"{where}: variant must be 'fixed' or 'axial', got {variant!r}.")
    length = q.shape[2]
    check_key_padding_mask(where, key_padding_mask, q.shape[0], length)
    if block_size is None:
        return default_block_size(length)
    if block_size < 1:
        raise ValueError(f"{where}: block_size must be >= 1 (or None for ceil(sqrt(L))), got {block_size}.")
    return min(block_size, length)


def masked_softmax(logits: Tensor, allowed: Tensor, dim: int = -1) -> Tensor:
    """softmax over ``dim`` restricted to ``allowed`` (broadcastable bool); all-masked slices give zeros.

    All-masked slices are set to 0 before the (fused) softmax and zeroed after, so no NaN is ever
    formed, not even in the backward pass."""
    sees_any = allowed.any(dim=dim, keepdim=True)
    logits = logits.masked_fill(~allowed, _NEG_INF).masked_fill(~sees_any, 0.0)
    return torch.softmax(logits, dim=dim).masked_fill(~sees_any, 0.0)


def _regions(L: int, s: int, variant: str, causal: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The factorisation as explicit masks, from positions only.

    Returns direct [L, L] (query i may see key j directly), member [R, L] (key j belongs to region r)
    and uses [L, R] (query i attends region r), before padding is applied."""
    i = torch.arange(L, device=device)
    if variant == "fixed":
        block = i // s
        regions = torch.arange(math.ceil(L / s), device=device)
        direct = block[:, None] == block[None, :]
        member = regions[:, None] == block[None, :]  # region r = block r
        uses = regions[None, :] < block[:, None] if causal else regions[None, :] != block[:, None]
    else:
        row, col = i // s, i % s
        n = math.ceil(L / s)
        same_row = row[:, None] == row[None, :]
        same_col = col[:, None] == col[None, :]
        direct = same_row | same_col
        # Region ids: (S, r, below) -> (below * n + S) * s + r. Region (S, r, above) = {j: col_j = r, row_j < S}.
        S = torch.arange(n, device=device)[:, None]
        r = torch.arange(s, device=device)[None, :]
        above_member = (col[None, None, :] == r[..., None]) & (row[None, None, :] < S[..., None])  # (n, s, L)
        below_member = (col[None, None, :] == r[..., None]) & (row[None, None, :] > S[..., None])
        member = torch.cat([above_member.reshape(n * s, L), below_member.reshape(n * s, L)])
        region_row = torch.cat([S.expand(n, s).reshape(-1)] * 2)
        region_col = torch.cat([r.expand(n, s).reshape(-1)] * 2)
        region_below = torch.arange(2 * n * s, device=device) >= n * s
        uses = (region_row[None, :] == row[:, None]) & (region_col[None, :] != col[:, None])
        if causal:
            uses = uses & ~region_below[None, :]
    if causal:
        direct = direct & (i[None, :] <= i[:, None])
    return direct, member, uses


def _region_max(x: Tensor, member: Tensor) -> Tensor:
    """Max of x [B, H, L, D] over the members of each region (member [B, R, L]), 0 for empty regions;
    [B, H, R, D]. Regions are taken in groups so that the masked copy stays near 2^24 elements."""
    B, H, L, D = x.shape
    group = max(1, (1 << 24) // (B * H * L * D))
    pooled = []
    for start in range(0, member.shape[1], group):
        inside = member[:, None, start : start + group, :, None]  # (B, 1, g, L, 1)
        best = x[:, :, None].masked_fill(~inside, _NEG_INF).amax(dim=3)
        pooled.append(torch.where(inside.any(dim=3), best, torch.zeros_like(best)))
    return torch.cat(pooled, dim=2)


def combiner_attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = False,
    block_size: int | None = None,
    variant: str = "fixed",
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The dense [L, L] attention matrix of :func:`combiner_attention`, materialised from masks.

    O(L^2 + R L) memory and O(R L D) time for the region summaries (R = L/s regions for "fixed",
    2L for "axial"): for tests and attention maps of short sequences.

    Returns:
        [batch, heads, length, length] in q's dtype; rows sum to 1 (zero rows for padded queries and for
        queries that see no key).
    """
    s = check_combiner("combiner_attention_weights", q, k, None, variant, block_size, key_padding_mask)
    B, H, L, D = q.shape
    q = q * D**-0.5
    valid = torch.ones(B, L, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
    direct, member, uses = _regions(L, s, variant, causal, q.device)
    direct = direct[None] & valid[:, None, :]  # (B, L, L)
    member = member[None] & valid[:, None, :]  # (B, R, L)
    uses = uses[None] & member.any(dim=-1)[:, None, :]  # (B, L, R): empty regions are dropped

    # Region summaries: pooled key and query, and the region's own attention q(j | region) over its keys.
    k_region, q_region = _region_max(k, member), _region_max(q, member)  # (B, H, R, D)
    within = masked_softmax(q_region @ k.transpose(-1, -2), member[:, None])  # (B, H, R, L)

    # Joint normaliser over the direct keys and the regions, then expand regions onto their keys.
    joint = masked_softmax(
        torch.cat([q @ k.transpose(-1, -2), q @ k_region.transpose(-1, -2)], dim=-1),
        torch.cat([direct, uses], dim=-1)[:, None],
    )
    return (joint[..., :L] + joint[..., L:] @ within).masked_fill(~valid[:, None, :, None], 0.0)
