"""FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021): softmax attention
estimated with positive orthogonal random features, in time and memory linear in the sequence length.

All tensors are ``[batch, heads, length, head_dim]``; a projection is ``[nb_features, head_dim]``;
``key_padding_mask`` is bool ``[batch, length]``, True at padding. Queries and keys arrive unscaled:
the softmax temperature is folded into the features (x' = x * d^-1/4, so x'.y' = x.y / sqrt(d)).

Stabilisers. exp() of random projections overflows for large inputs, so features are shifted by a
log-offset before exponentiating. A shift common to one query row (queries) or to every key one
query sees (keys) cancels between numerator and denominator, so it changes nothing but the rounding.
- queries: the row's own max over features;
- keys, bidirectional: the max over all valid (unpadded) keys of the (batch, head);
- keys, causal: query i uses M_i, the running max over keys j <= i only. Key j is stored relative to
  its own M_j and rescaled by exp(M_j - M_i) <= 1 when query i reads it, so no statistic of a future
  key can reach an earlier output, not even through rounding or underflow (the reference JAX code
  takes a max over the whole sequence, which leaks the future).
Padding. Padded keys are zeroed in the features and in v by masked_fill (a select, not a product,
so inf/NaN junk cannot leak), adding nothing to numerators or denominators; they are excluded from
the stabilisers too. Padded positions are also dropped as queries: their output rows are zero.

Fast path and references. ``favor_attention`` runs a fast path (in-place features, batched chunks,
hand-written backward); ``_favor_attention_reference`` is the same computation in plain autograd, and
``implied_attention`` the dense O(L^2) matrix. Tests hold all three equal in float64, gradients too.

Everything runs in float32 (or float64 when given float64) even under bf16/fp16 autocast; the output
is cast back to the dtype of ``v``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from protein_performer.ops._checks import check_key_padding_mask, check_projection, check_self_attention, compute_dtype

__all__ = [
    "FavorState",
    "favor_attention",
    "favor_causal_step",
    "gaussian_orthogonal_random_matrix",
    "implied_attention",
    "relu_kernel_features",
    "softmax_kernel_features",
]

Kernel = Literal["softmax", "relu"]

#: Default block length of the chunked causal path: long enough for efficient matmuls, short enough
#: that the within-chunk [chunk, chunk] score matrices stay small.
DEFAULT_CHUNK_SIZE = 64
#: The generalized (ReLU) kernel adds this to every feature so that denominators never vanish.
RELU_EPS = 1e-3
#: Chunks per group of the two-level state scan of the causal path.
SCAN_GROUP = 32


# --------------------------------------------------------------------------------------------------
# random projections
# --------------------------------------------------------------------------------------------------


def gaussian_orthogonal_random_matrix(
    nb_features: int,
    dim: int,
    *,
    scaling: int = 0,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Random projection W for FAVOR+, [nb_features, dim].

    With ``orthogonal=True`` the rows come in blocks of ``dim`` mutually orthogonal unit vectors (Q of
    the QR decomposition of a Gaussian matrix; the last block is truncated). Rows are then rescaled:
    ``scaling=0`` by independent chi(dim)-distributed norms (so each row is marginally N(0, I), which
    keeps the softmax-kernel estimator unbiased), ``scaling=1`` to the fixed norm sqrt(dim).
    ``orthogonal=False`` gives iid N(0, I) rows (renormalised to sqrt(dim) when ``scaling=1``).

    Sampling happens on the generator's device in float64, so a given generator state yields the same
    matrix whatever ``device``/``dtype`` it is finally cast to.
    """
    if nb_features < 1 or dim < 1:
        raise ValueError(f"gaussian_orthogonal_random_matrix: need nb_features, dim >= 1, got {nb_features}, {dim}.")
    if scaling not in (0, 1):
        raise ValueError(
            f"gaussian_orthogonal_random_matrix: scaling must be 0 (chi norms) or 1 (sqrt(dim)), got {scaling}."
        )
    gen_device = generator.device if generator is not None else torch.device("cpu")
    opts = {"generator": generator, "device": gen_device, "dtype": torch.float64}
    if orthogonal:
        q, r = torch.linalg.qr(torch.randn(math.ceil(nb_features / dim), dim, dim, **opts))  # batched blocks
        # Fix the sign ambiguity of QR so that Q is Haar-distributed.
        q = q * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0)[..., None, :]
        directions = q.transpose(-1, -2).reshape(-1, dim)[:nb_features]  # unit rows
        if scaling == 0:
            norms = torch.randn(nb_features, dim, **opts).norm(dim=1)
        else:
            norms = torch.full((nb_features,), math.sqrt(dim), device=gen_device, dtype=torch.float64)
        matrix = directions * norms[:, None]
    else:
        matrix = torch.randn(nb_features, dim, **opts)
        if scaling == 1:
            matrix = matrix / matrix.norm(dim=1, keepdim=True) * math.sqrt(dim)
    return matrix.to(device=device if device is not None else gen_device, dtype=dtype or torch.get_default_dtype())


# --------------------------------------------------------------------------------------------------
# feature maps
# --------------------------------------------------------------------------------------------------


def _softmax_logits(x: Tensor, projection: Tensor) -> Tensor:
    """log of the unnormalised positive features: W x' - |x'|^2 / 2 with x' = x d^-1/4; [..., m]."""
    x = x * x.shape[-1] ** -0.25
    return x @ projection.T - 0.5 * (x * x).sum(dim=-1, keepdim=True)


def _masked(x: Tensor, key_padding_mask: Tensor | None, fill: float = 0.0) -> Tensor:
    """Replace padded positions of x [B, H, L, *] by ``fill`` (robust to inf/NaN junk)."""
    if key_padding_mask is None:
        return x
    return x.masked_fill(key_padding_mask[:, None, :, None], fill)


def softmax_kernel_features(
    x: Tensor,
    projection: Tensor,
    *,
    is_query: bool,
    stabilize: bool = True,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Positive random features of the softmax kernel exp(x.y / sqrt(d)).

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m) with x' = x d^-1/4, so that E[phi(x).phi(y)] =
    exp(x.y / sqrt(d)) for W with N(0, I) rows.

    Args:
        x: [batch, heads, length, dim] queries or keys (unscaled).
        projection: [m, dim].
        is_query: selects the stabiliser (see module docstring).
        stabilize: if False, return the exact unbiased features above (may overflow for large x).
            If True, queries are divided by their own row max and keys by the max over all valid
            keys of their (batch, head); both constants cancel in attention. The key stabiliser looks
            at every position, so causal attention uses its own running version internally.
        key_padding_mask: bool [batch, length]; padded keys get zero features and are excluded from
            the key stabiliser.

    Returns:
        [batch, heads, length, m] in float32 (float64 for float64 input), even under autocast.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = compute_dtype(x)
        logits = _softmax_logits(x.to(dtype), projection.to(dtype))
        if stabilize:
            if is_query:
                logits = logits - logits.amax(dim=-1, keepdim=True).detach()
            else:
                logits = logits - _key_offset(logits, key_padding_mask)[..., None, None]
        features = logits.exp()
        if not stabilize:
            features = features / math.sqrt(projection.shape[0])
        return features if is_query else _masked(features, key_padding_mask)


def relu_kernel_features(
    x: Tensor,
    projection: Tensor,
    *,
    eps: float = RELU_EPS,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Features of the paper's generalized (ReLU) kernel: ReLU(W x') + eps, x' = x d^-1/4.

    Args:
        x: [batch, heads, length, dim]; projection: [m, dim].
        eps: keeps every feature (and so every denominator) positive.
        key_padding_mask: bool [batch, length]; padded rows become exactly zero (eps included).

    Returns:
        [batch, heads, length, m] in float32 (float64 for float64 input), even under autocast.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = compute_dtype(x)
        x = x.to(dtype) * x.shape[-1] ** -0.25
        features = torch.relu(x @ projection.to(dtype).T) + eps
        return _masked(features, key_padding_mask)


def _key_offset(logits: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """Max key logit over valid positions and features, [B, H]; 0 when every key is padded."""
    offset = _masked(logits, key_padding_mask, float("-inf")).amax(dim=(-2, -1)).detach()
    return torch.where(torch.isfinite(offset), offset, torch.zeros_like(offset))


def _running_key_offset(logits: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """M_j = max over valid keys i <= j and features of the key logits, [B, H, L]; see
    :func:`_running_max`."""
    return _running_max(_masked(logits, key_padding_mask, float("-inf")).amax(dim=-1).detach())


def _running_max(row_max: Tensor) -> Tensor:
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


def _decay(later: Tensor, earlier: Tensor) -> Tensor:
    """exp(earlier - later) clamped to <= 1: the factor moving a sum taken relative to offset
    ``earlier`` to the (larger) offset ``later``."""
    return torch.exp((earlier - later).clamp(max=0.0))


class _Features(NamedTuple):
    """Everything FAVOR+ needs, in the compute dtype.

    query: [B, H, L, m] query features (row-stabilised).
    key: [B, H, L, m] key features, zero at padding.
    value: [B, H, L, D] values, zero at padding.
    key_offset: [B, H, L] running log-offset M_j of causal softmax keys (key j is stored as
        exp(logit_j - M_j)); None when keys share one offset (bidirectional, or the ReLU kernel).
    """

    query: Tensor
    key: Tensor
    value: Tensor
    key_offset: Tensor | None


def _check(
    where: str, q: Tensor, k: Tensor, v: Tensor | None, projection: Tensor, kernel: str, key_padding_mask: Tensor | None
) -> None:
    check_self_attention(where, q, k, v)
    check_projection(where, projection, q.shape[-1])
    if kernel not in ("softmax", "relu"):
        raise ValueError(f"{where}: kernel must be 'softmax' or 'relu', got {kernel!r}.")
    check_key_padding_mask(where, key_padding_mask, k.shape[0], k.shape[2])


def _features(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    projection: Tensor,
    kernel: Kernel,
    causal: bool,
    key_padding_mask: Tensor | None,
) -> _Features:
    """Query/key features with the stabilisers described in the module docstring (call with autocast off)."""
    dtype = compute_dtype(q)
    q, k, projection = q.to(dtype), k.to(dtype), projection.to(dtype)
    value = _masked(v.to(dtype), key_padding_mask) if v is not None else k.new_zeros(())
    if kernel == "relu":
        return _Features(
            relu_kernel_features(q, projection, key_padding_mask=key_padding_mask),
            relu_kernel_features(k, projection, key_padding_mask=key_padding_mask),
            value,
            None,
        )
    query = _masked(softmax_kernel_features(q, projection, is_query=True), key_padding_mask)
    if not causal:
        key = softmax_kernel_features(k, projection, is_query=False, key_padding_mask=key_padding_mask)
        return _Features(query, key, value, None)
    logits = _softmax_logits(k, projection)
    offset = _running_key_offset(logits, key_padding_mask)
    key = _masked(torch.exp(logits - offset[..., None]), key_padding_mask)
    return _Features(query, key, value, offset)


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator[..., None]; a zero denominator (a query that sees no key, or whose
    kernel values all underflowed) has a zero numerator too and yields a zero row instead of NaN."""
    denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return numerator / denominator[..., None]


# --------------------------------------------------------------------------------------------------
# references: plain autograd, short and obviously right
# --------------------------------------------------------------------------------------------------


def _bidirectional_reference(f: _Features) -> Tensor:
    """phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1): two thin matmuls, never an L x L matrix."""
    kv = f.key.transpose(-1, -2) @ f.value  # (B, H, m, D)
    k_sum = f.key.sum(dim=-2)  # (B, H, m)
    numerator = f.query @ kv  # (B, H, L, D)
    denominator = (f.query @ k_sum[..., None]).squeeze(-1)  # (B, H, L)
    return _safe_divide(numerator, denominator)


def _causal_reference(f: _Features, chunk_size: int) -> Tensor:
    """Block-parallel causal linear attention, one chunk at a time: exact masked products inside a
    chunk, a running state S = sum phi(k) v^T, z = sum phi(k) across chunks.

    With a running key offset the carried state is kept relative to the offset at the end of the
    previous chunk and rescaled (factor <= 1) to each query's own offset.
    """
    B, H, L, m = f.query.shape
    D = f.value.shape[-1]
    S = f.value.new_zeros(B, H, m, D)
    z = f.value.new_zeros(B, H, m)
    state_offset = f.value.new_zeros(B, H) if f.key_offset is not None else None
    outputs = []
    for start in range(0, L, chunk_size):
        stop = min(start + chunk_size, L)
        q, k, v = f.query[:, :, start:stop], f.key[:, :, start:stop], f.value[:, :, start:stop]
        scores = (q @ k.transpose(-1, -2)).tril()  # (B, H, C, C)
        inter_num = q @ S  # (B, H, C, D)
        inter_den = (q @ z[..., None]).squeeze(-1)  # (B, H, C)
        if f.key_offset is not None:
            offset = f.key_offset[:, :, start:stop]  # (B, H, C)
            scores = scores * _decay(offset[..., :, None], offset[..., None, :])
            to_query = _decay(offset, state_offset[..., None])  # (B, H, C)
            inter_num = inter_num * to_query[..., None]
            inter_den = inter_den * to_query
            # Move the state to this chunk's final offset before adding the chunk's keys.
            end = offset[..., -1]
            k = k * _decay(end[..., None], offset)[..., None]
            shrink = _decay(end, state_offset)
            S = S * shrink[..., None, None]
            z = z * shrink[..., None]
            state_offset = end
        outputs.append(_safe_divide(scores @ v + inter_num, scores.sum(dim=-1) + inter_den))
        S = S + k.transpose(-1, -2) @ v
        z = z + k.sum(dim=-2)
    return torch.cat(outputs, dim=2)


def _favor_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    causal: bool = False,
    kernel: Kernel = "softmax",
    key_padding_mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """:func:`favor_attention` in plain autograd (the reference of the fast path; same contract)."""
    _check("favor_attention", q, k, v, projection, kernel, key_padding_mask)
    with torch.autocast(device_type=q.device.type, enabled=False):
        f = _features(q, k, v, projection, kernel, causal, key_padding_mask)
        out = _causal_reference(f, chunk_size) if causal else _bidirectional_reference(f)
    return out.to(v.dtype)


# --------------------------------------------------------------------------------------------------
# fast path: in-place feature maps + linear attention with hand-written backward passes
# --------------------------------------------------------------------------------------------------
#
# On CPU the time goes to memory traffic over [L, m] tensors as much as to FLOPs, so the fast path
# - computes each softmax feature map with one matmul and in-place updates (one buffer per map; the
#   -|k'|^2 / 2 term rides in the matmul as an extra input column), and differentiates it by hand,
# - carries the denominator as an extra column of ones in v, so numerator and denominator come out
#   of the same matmuls ("augmented" v, D + 1 columns),
# - batches every chunk of the causal path into single batched matmuls; only the small per-chunk
#   state [m, D + 1] is scanned sequentially, and no [L, m, D] tensor ever exists,
# - saves only what the backward needs (the features are reused as the exp() derivative).


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


def _decayed_scan(x: Tensor, source: Tensor | None, target: Tensor | None, *, reverse: bool = False) -> Tensor:
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
    """Chunked causal linear attention with running key offsets; see :func:`_causal_reference`.

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
    state = _decayed_scan(chunk_sums, end, previous_end).view(B * H, n, m, D + 1)  # before chunk c
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
    state_grad = _decayed_scan(reads, source, target, reverse=True).view(BH, n, m, D + 1)

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


def _linear_forward(query, key, value, key_offset, causal: bool, chunk_size: int) -> tuple[Tensor, tuple]:
    if causal:
        return _causal_forward(query, key, value, key_offset, chunk_size)
    return _bidirectional_forward(query, key, value)


def _linear_backward(saved: tuple, grad_out: Tensor, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _causal_backward(saved, grad_out) if causal else _bidirectional_backward(saved, grad_out)


def _no_autocast(like: Tensor) -> torch.autocast:
    """Autocast off on `like`'s device. The Functions below run forward with autocast off (inside
    favor_attention); backward runs under whatever autocast the caller's thread has, e.g. a user's
    loop calling backward inside the autocast region, so it turns autocast off again itself."""
    return torch.autocast(device_type=like.device.type, enabled=False)


class _LinearAttention(torch.autograd.Function):
    """Normalised linear attention on given features (the ReLU kernel; features via autograd)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, causal: bool, chunk_size: int) -> Tensor:
        out, saved = _linear_forward(query, key, value, None, causal, chunk_size)
        ctx.save_for_backward(*saved)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with _no_autocast(grad_out):
            saved = ctx.saved_tensors
            return (*_linear_backward(saved, grad_out.to(saved[0].dtype), ctx.causal), None, None)


class _SoftmaxFavor(torch.autograd.Function):
    """FAVOR+ with positive softmax features from q, k, v [B, H, L, D] and a projection [m, D].

    Forward builds the stabilised features in place (see :func:`_features` for the values) and runs
    linear attention; backward chains the hand-written linear-attention backward through exp() (whose
    derivative is the saved feature itself) and the projection matmuls. Padded positions (v already
    zeroed by the caller) get exactly zero gradients. The projection gets no gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, projection, key_padding_mask, causal: bool, chunk_size: int) -> Tensor:
        D = q.shape[-1]
        scale = D**-0.25
        pad = key_padding_mask[:, None, :, None] if key_padding_mask is not None else None
        w_query = projection.T * scale  # (D, m)
        # key logits k' W^T - |k'|^2 / 2 as one matmul: [k', |k'|^2 / 2] @ [W, -1]^T
        w_key = torch.cat([projection, -torch.ones_like(projection[:, :1])], dim=1).T  # (D + 1, m)
        k_scaled = k * scale
        k_aug = torch.cat([k_scaled, 0.5 * (k_scaled * k_scaled).sum(dim=-1, keepdim=True)], dim=-1)

        query = q @ w_query  # (B, H, L, m); |q'|^2 / 2 is constant per row, absorbed by the row max
        query.sub_(query.amax(dim=-1, keepdim=True))
        key = k_aug @ w_key  # (B, H, L, m)
        if pad is not None:
            query.masked_fill_(pad, float("-inf"))
            key.masked_fill_(pad, float("-inf"))
        query.exp_()
        if causal:
            offset = _running_max(key.amax(dim=-1))  # (B, H, L)
            key.sub_(offset[..., None])
        else:
            offset = key.amax(dim=(-2, -1), keepdim=True)
            key.sub_(torch.where(torch.isfinite(offset), offset, torch.zeros_like(offset)))
            offset = None
        key.exp_()

        out, saved = _linear_forward(query, key, v, offset, causal, chunk_size)
        ctx.save_for_backward(query, key, k_scaled, w_query, w_key, key_padding_mask, *saved)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with _no_autocast(grad_out):
            return _SoftmaxFavor._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        query, key, k_scaled, w_query, w_key, key_padding_mask, *saved = ctx.saved_tensors
        grad_query, grad_key, grad_v = _linear_backward(tuple(saved), grad_out.to(query.dtype), ctx.causal)
        grad_q = grad_query.mul_(query) @ w_query.T  # d exp(x) = exp(x) dx
        grad_k_aug = grad_key.mul_(key) @ w_key.T  # [dL W, -sum_m dL]
        grad_k = _key_gradient(grad_k_aug, k_scaled)
        _zero_at_padding(key_padding_mask, grad_q, grad_k, grad_v)
        return grad_q, grad_k, grad_v, None, None, None, None


def _key_gradient(grad_k_aug: Tensor, k_scaled: Tensor) -> Tensor:
    """dL/dk from dL/d[k', |k'|^2/2] (the augmented key the softmax features project), k' = k D^-1/4."""
    D = k_scaled.shape[-1]
    return torch.addcmul(grad_k_aug[..., :D], k_scaled, grad_k_aug[..., D:]).mul_(D**-0.25)


def _zero_at_padding(key_padding_mask: Tensor | None, *grads: Tensor) -> None:
    """In place: zero the padded rows of each [batch, heads, length, dim] gradient."""
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :, None]
        for grad in grads:
            grad.masked_fill_(pad, 0.0)


def _relu_features(q: Tensor, k: Tensor, projection: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """ReLU(W x') + eps for queries and keys, zero at padding (autograd)."""
    w = projection.T * q.shape[-1] ** -0.25
    query, key = torch.relu(q @ w) + RELU_EPS, torch.relu(k @ w) + RELU_EPS
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :, None]
        query, key = query.masked_fill(pad, 0.0), key.masked_fill(pad, 0.0)
    return query, key


def favor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    causal: bool = False,
    kernel: Kernel = "softmax",
    key_padding_mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """FAVOR+ attention: D^-1 phi(Q) (phi(K)^T V) with D = diag(phi(Q) phi(K)^T 1).

    Args:
        q, k, v: [batch, heads, length, head_dim] (q, k unscaled).
        projection: [nb_features, head_dim], e.g. from :func:`gaussian_orthogonal_random_matrix`.
            A projection that requires grad is differentiated too (through the plain-autograd path).
        causal: query i sees keys j <= i only (chunked prefix sums, O(L m D) time, memory linear in L).
        kernel: "softmax" (positive random features) or "relu" (generalized kernel).
        key_padding_mask: bool [batch, length], True at padded keys. Padded positions are also
            dropped as queries: their output rows (and their gradients) are zero.
        chunk_size: block length of the causal path (any length L works, not only multiples).

    Returns:
        [batch, heads, length, head_dim] in v's dtype; equals ``implied_attention(q, k, projection) @ v``.
    """
    _check("favor_attention", q, k, v, projection, kernel, key_padding_mask)
    if chunk_size < 1:
        raise ValueError(f"favor_attention: chunk_size must be >= 1, got {chunk_size}.")
    if kernel == "softmax" and projection.requires_grad and torch.is_grad_enabled():
        return _favor_attention_reference(
            q, k, v, projection, causal=causal, kernel=kernel, key_padding_mask=key_padding_mask, chunk_size=chunk_size
        )
    with torch.autocast(device_type=q.device.type, enabled=False):
        dtype = compute_dtype(q)
        L = q.shape[2]
        qc, kc, vc, w = q.to(dtype), k.to(dtype), v.to(dtype), projection.to(dtype)
        if key_padding_mask is not None:
            vc = vc.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        chunk_size = min(chunk_size, max(L, 1))  # a short sequence is one chunk, not a padded one
        tail = -L % chunk_size if causal else 0
        if tail:
            # Zero positions after the end are in every real query's future: they need no mask.
            qc, kc, vc = (torch.nn.functional.pad(t, (0, 0, 0, tail)) for t in (qc, kc, vc))
            if key_padding_mask is not None:
                key_padding_mask = torch.nn.functional.pad(key_padding_mask, (0, tail), value=True)
        if kernel == "softmax":
            out = _SoftmaxFavor.apply(qc, kc, vc, w.detach(), key_padding_mask, causal, chunk_size)
        else:
            query, key = _relu_features(qc, kc, w, key_padding_mask)
            out = _LinearAttention.apply(query, key, vc, causal, chunk_size)
    return out[:, :, :L].to(v.dtype)


def implied_attention(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    *,
    causal: bool = False,
    kernel: Kernel = "softmax",
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The row-normalised [L, L] matrix that FAVOR+ applies to V, materialised (O(L^2) memory).

    For attention maps of short sequences and as the dense reference of :func:`favor_attention`.

    Returns:
        [batch, heads, length, length], float32 (float64 for float64 input); rows sum to 1 (or are zero
        where a query sees no key).
    """
    _check("implied_attention", q, k, None, projection, kernel, key_padding_mask)
    with torch.autocast(device_type=q.device.type, enabled=False):
        f = _features(q, k, None, projection, kernel, causal, key_padding_mask)
        scores = f.query @ f.key.transpose(-1, -2)  # (B, H, L, L)
        if causal:
            scores = scores.tril()
        if f.key_offset is not None:
            scores = scores * _decay(f.key_offset[..., :, None], f.key_offset[..., None, :])
        denominator = scores.sum(dim=-1)
        return scores / torch.where(denominator > 0, denominator, torch.ones_like(denominator))[..., None]


# --------------------------------------------------------------------------------------------------
# recurrent step (generation)
# --------------------------------------------------------------------------------------------------


class FavorState(NamedTuple):
    """Causal FAVOR+ state after t tokens.

    kv: [B, H, m, D] sum of phi(k_j) v_j^T; k_sum: [B, H, m] sum of phi(k_j); both relative to
    ``offset`` [B, H], the running max key logit (softmax kernel; zeros for ReLU).
    """

    kv: Tensor
    k_sum: Tensor
    offset: Tensor


def favor_causal_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    projection: Tensor,
    state: FavorState | None = None,
    *,
    kernel: Kernel = "softmax",
) -> tuple[Tensor, FavorState]:
    """One token of causal FAVOR+: the output at position t given the state of tokens < t.

    Args:
        q_t, k_t, v_t: [batch, heads, head_dim], the new token.
        projection: [nb_features, head_dim], the same as for the parallel pass.
        state: returned by the previous step; None before the first token.
        kernel: "softmax" or "relu".

    Returns:
        (out_t [batch, heads, head_dim] in v_t's dtype, new state). Feeding a sequence token by token
        reproduces ``favor_attention(..., causal=True)``.
    """
    _check("favor_causal_step", q_t[:, :, None], k_t[:, :, None], v_t[:, :, None], projection, kernel, None)
    with torch.autocast(device_type=q_t.device.type, enabled=False):
        dtype = compute_dtype(q_t)
        q, k, v, w = q_t.to(dtype)[:, :, None], k_t.to(dtype)[:, :, None], v_t.to(dtype), projection.to(dtype)
        B, H, D = v.shape
        m = w.shape[0]
        if state is None:
            state = FavorState(v.new_zeros(B, H, m, D), v.new_zeros(B, H, m), v.new_full((B, H), float("-inf")))
        if kernel == "relu":
            query = relu_kernel_features(q, w)[:, :, 0]
            key = relu_kernel_features(k, w)[:, :, 0]
            offset = torch.zeros_like(state.offset)
            kv, k_sum = state.kv, state.k_sum
        else:
            query = softmax_kernel_features(q, w, is_query=True)[:, :, 0]  # (B, H, m)
            logits = _softmax_logits(k, w)[:, :, 0]  # (B, H, m)
            offset = torch.maximum(state.offset, logits.amax(dim=-1))
            key = torch.exp(logits - offset[..., None])
            shrink = _decay(offset, state.offset)
            kv, k_sum = state.kv * shrink[..., None, None], state.k_sum * shrink[..., None]
        kv = kv + key[..., :, None] * v[..., None, :]
        k_sum = k_sum + key
        numerator = (query[..., None, :] @ kv).squeeze(-2)  # (B, H, D)
        denominator = (query * k_sum).sum(dim=-1)
        out = _safe_divide(numerator, denominator)
    return out.to(v_t.dtype), FavorState(kv, k_sum, offset)
