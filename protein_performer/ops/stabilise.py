"""Stabilisers shared by FAVOR+ and FAVOR+ with relative positions (`ops.favor`, `ops.rpe`).

exp() of random-feature logits overflows for large inputs, so features are kept relative to a log-offset:
one shared offset (bidirectional keys), or the running max M_j over keys <= j (causal keys), read by query
i with the factor exp(M_j - M_i) <= 1 so that no statistic of a future key reaches an earlier output.
This module holds those offsets, the decayed prefix scan that carries states across chunks, and the
padding and division guards: pure tensor functions, no autograd.Function. (`masked`, the padding guard,
serves `ops.softmax` too.)
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SCAN_GROUP", "decay", "decayed_scan", "key_gradient", "masked", "running_key_offset", "running_max",
           "safe_divide", "shared_key_offset", "zero_at_padding"]

#: Positions per group of the two-level decayed scan (the chunk states of causal FAVOR+, the far block
#: states of windowed favor_rpe).
SCAN_GROUP = 32


def masked(x: Tensor, key_padding_mask: Tensor | None, fill: float = 0.0) -> Tensor:
    """Replace padded positions of x [B, H, L, *] by ``fill`` (robust to inf/NaN junk)."""
    if key_padding_mask is None:
        return x
    return x.masked_fill(key_padding_mask[:, None, :, None], fill)


def shared_key_offset(logits: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """Max key logit over valid positions and features, [B, H]; 0 when every key is padded."""
    offset = masked(logits, key_padding_mask, float("-inf")).amax(dim=(-2, -1)).detach()
    return torch.where(torch.isfinite(offset), offset, torch.zeros_like(offset))


def running_key_offset(logits: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """M_j = max over valid keys i <= j and features of the key logits, [B, H, L]; see
    :func:`running_max`."""
    return running_max(masked(logits, key_padding_mask, float("-inf")).amax(dim=-1).detach())


def running_max(row_max: Tensor) -> Tensor:
    """Running max along the last axis, made finite and still nondecreasing.

    Positions before the first valid key (row_max = -inf) get the smallest finite value of the row,
    which is <= every later offset; a row with no valid key at all gets 0. Those placeholders only
    ever multiply zero features.
    """
    running = torch.cummax(row_max, dim=-1).values
    finite = torch.isfinite(running)
    floor = torch.where(finite, running, float("inf")).amin(dim=-1, keepdim=True)
    floor = torch.where(torch.isfinite(floor), floor, 0.0)
    return torch.where(finite, running, floor)


def decay(later: Tensor, earlier: Tensor) -> Tensor:
    """exp(earlier - later) clamped to <= 1: the factor moving a sum taken relative to offset
    ``earlier`` to the (larger) offset ``later``."""
    return torch.exp((earlier - later).clamp(max=0.0))


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator[..., None]; a zero denominator (a query that sees no key, or whose
    kernel values all underflowed) has a zero numerator too and yields a zero row instead of NaN."""
    denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return numerator / denominator[..., None]


def key_gradient(grad_k_aug: Tensor, k_scaled: Tensor) -> Tensor:
    """dL/dk from dL/d[k', |k'|^2/2] (the augmented key the softmax features project), k' = k D^-1/4.
    Columns after D + 1 (FAVOR++'s constant column) carry no gradient to k."""
    D = k_scaled.shape[-1]
    return torch.addcmul(grad_k_aug[..., :D], k_scaled, grad_k_aug[..., D : D + 1]).mul_(D**-0.25)


def zero_at_padding(key_padding_mask: Tensor | None, *grads: Tensor) -> None:
    """In place: zero the padded rows of each [batch, heads, length, dim] gradient."""
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :, None]
        for grad in grads:
            grad.masked_fill_(pad, 0.0)


def decayed_scan(x: Tensor, source: Tensor | None, target: Tensor | None, *, reverse: bool = False) -> Tensor:
    """Exclusive scan with decay over dim 1 of x [BH, n, P]:

        out[c] = sum over c' < c (``reverse``: c' > c) of x[c'] * exp(source[c'] - target[c]).

    source, target: [BH, n], with target monotone (nondecreasing; nonincreasing for ``reverse``) and
    source[c'] <= target[c] for every pair summed, so every factor is <= 1; None means no decay.
    Two levels keep it cheap and linear in n: inside groups of ``SCAN_GROUP`` positions the scan is
    one batched matmul with a [G, G] decay matrix; a short loop carries group totals across groups.
    """
    BH, n, P = x.shape
    if source is None:
        source = target = x.new_zeros(BH, n)
    G = min(SCAN_GROUP, n)
    groups = -(-n // G)
    tail = groups * G - n
    if tail:
        # Appended positions come after every real one: they add nothing and their outputs are dropped.
        x = torch.nn.functional.pad(x, (0, 0, 0, tail))
        source = torch.nn.functional.pad(source, (0, tail), value=float("-inf"))
        target = torch.cat([target, target[:, -1:].expand(BH, tail)], dim=1)
    s, t = source.view(BH, groups, G), target.view(BH, groups, G)
    xs = x.view(BH * groups, G, P)
    inside = torch.exp(s[..., None, :] - t[..., :, None])  # (BH, groups, G, G); [i, i'] = i' -> i
    inside = inside.triu_(diagonal=1) if reverse else inside.tril_(diagonal=-1)
    out = torch.bmm(inside.view(BH * groups, G, G), xs).view(BH, groups, G, P)
    if groups > 1:
        # Group b sends its total to the next group in scan order (b + 1, or b - 1 when reversed),
        # taken relative to the receiving group's boundary target ("exit"): its first (last) target.
        # Totals are computed for every group (no slicing copy of x); the last one's is never read.
        if reverse:
            exit_offset = torch.cat([t[:, :1, 0], t[:, :-1, -1]], dim=1)  # (BH, groups); [0] unused
            senders, receivers = slice(1, None), slice(None, -1)
        else:
            exit_offset = torch.cat([t[:, 1:, 0], t[:, -1:, -1]], dim=1)  # [groups - 1] unused
            senders, receivers = slice(None, -1), slice(1, None)
        to_exit = torch.exp(s - exit_offset[..., None])  # (BH, groups, G)
        totals = torch.bmm(to_exit.view(BH * groups, 1, G), xs).view(BH, groups, P)
        neighbour = torch.roll(exit_offset, 1 if not reverse else -1, dims=1)  # previous sender's exit
        step = torch.exp(neighbour - exit_offset)  # rescales the carried sum to this group's exit
        # carried[b]: everything up to group b, at exit_offset[b] (a list, stacked once: torch.compile
        # cannot trace `out=` into the non-contiguous slices of one preallocated tensor)
        carried: list[Tensor | None] = [None] * groups
        order = list(range(groups - 1, 0, -1)) if reverse else list(range(groups - 1))
        carried[order[0]] = totals[:, order[0]]
        for previous, b in zip(order[:-1], order[1:], strict=True):
            carried[b] = torch.addcmul(totals[:, b], carried[previous], step[:, b, None])
        sent = torch.stack(carried[senders], dim=1)  # type: ignore[arg-type]  # (BH, groups - 1, P)
        to_target = torch.exp(exit_offset[:, senders, None] - t[:, receivers])  # (BH, groups - 1, G)
        out[:, receivers].addcmul_(to_target[..., None], sent[:, :, None, :])
    return out.view(BH, groups * G, P)[:, :n]
