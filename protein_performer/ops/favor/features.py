"""FAVOR+ feature maps: random projections, the positive softmax-kernel and ReLU features.

Queries and keys arrive unscaled: the softmax temperature is folded into the features (x' = x d^-1/4,
so x'.y' = x.y / sqrt(d)). Stabilisers (module `ops.stabilise`): queries are divided by their own row
max; bidirectional keys by the max over all valid keys of the (batch, head); causal keys by the running
max M_j (returned as an offset, read with exp(M_j - M_i)). Padded keys get zero features and are left
out of the offsets.

Two builders of the same values: :func:`favor_features` (autograd, for the references) and
:func:`inplace_softmax_features` (in place, no autograd; the fast paths of FAVOR+ and windowed
favor_rpe differentiate it by hand).
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from protein_performer.ops._checks import check_key_padding_mask, check_projection, check_self_attention, compute_dtype
from protein_performer.ops.stabilise import masked, running_key_offset, running_max, shared_key_offset

__all__ = ["COUPLINGS", "FEATURE_MAPS", "Features", "Kernel", "RELU_EPS", "check_favor", "favor_features",
           "gaussian_orthogonal_random_matrix", "inplace_softmax_features", "oprf_coefficient", "oprf_statistic",
           "relu_kernel_features", "softmax_kernel_features", "softmax_logits"]

Kernel = Literal["softmax", "relu"]
#: Feature maps of the softmax kernel: FAVOR+'s positive features, or FAVOR++'s optimised ones (OPRF).
FEATURE_MAPS = ("positive", "oprf")
#: How the directions of one block of ``dim`` random features are coupled.
COUPLINGS = ("orthogonal", "simplex")

#: The generalized (ReLU) kernel adds this to every feature so that denominators never vanish.
RELU_EPS = 1e-3


def gaussian_orthogonal_random_matrix(
    nb_features: int,
    dim: int,
    *,
    scaling: int = 0,
    orthogonal: bool = True,
    coupling: str = "orthogonal",
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

    ``coupling="simplex"`` (Reid et al. 2023, simplex random features) replaces each orthogonal block
    by the ``dim`` unit vertices of a regular simplex (pairwise cosine -1/(dim - 1)), rotated by the
    same Haar-random Q: every row is still a uniform direction (so with chi norms marginally N(0, I),
    the estimator stays unbiased), and the negative correlation lowers its variance further.

    Sampling happens on the generator's device in float64, so a given generator state yields the same
    matrix whatever ``device``/``dtype`` it is finally cast to.
    """
    if nb_features < 1 or dim < 1:
        raise ValueError(f"gaussian_orthogonal_random_matrix: need nb_features, dim >= 1, got {nb_features}, {dim}.")
    if scaling not in (0, 1):
        raise ValueError(
            f"gaussian_orthogonal_random_matrix: scaling must be 0 (chi norms) or 1 (sqrt(dim)), got {scaling}."
        )
    if coupling not in COUPLINGS:
        raise ValueError(f"gaussian_orthogonal_random_matrix: coupling must be one of {COUPLINGS}, got {coupling!r}.")
    if coupling == "simplex" and (not orthogonal or dim < 2):
        raise ValueError("gaussian_orthogonal_random_matrix: coupling='simplex' needs orthogonal=True and dim >= 2.")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    opts = {"generator": generator, "device": gen_device, "dtype": torch.float64}
    if orthogonal:
        q, r = torch.linalg.qr(torch.randn(math.ceil(nb_features / dim), dim, dim, **opts))  # batched blocks
        # Fix the sign ambiguity of QR so that Q is Haar-distributed.
        q = q * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0)[..., None, :]
        rows = q.transpose(-1, -2)  # (blocks, dim, dim): orthonormal rows
        if coupling == "simplex":
            # vertices e_i - 1/dim (centred basis vectors), unit length, then rotated by the block's Q
            vertices = torch.eye(dim, **{k: opts[k] for k in ("device", "dtype")}) - 1.0 / dim
            rows = (vertices / math.sqrt(1.0 - 1.0 / dim)) @ rows
        directions = rows.reshape(-1, dim)[:nb_features]  # unit rows
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


def oprf_statistic(q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """u = the mean of |q'_i + k'_j|^2 over valid pairs (i, j), per (batch, head), [B, H] (detached).

    x' = x d^-1/4. The pair mean factorises: mean |q'|^2 + mean |k'|^2 + 2 mean q' . mean k', each mean
    over the valid positions only, so padding never enters. u sets the variance of the softmax-kernel
    estimator (proportional to e^u - 1 for positive features) and FAVOR++'s coefficient
    (:func:`oprf_coefficient`)."""
    with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
        dtype = compute_dtype(q)
        scale = q.shape[-1] ** -0.25
        q, k = q.to(dtype) * scale, k.to(dtype) * scale
        if key_padding_mask is None:
            weight = q.new_full(q.shape[:3], 1.0 / q.shape[2])
        else:
            valid = (~key_padding_mask).to(dtype)[:, None, :].expand(q.shape[:3])
            weight = valid / valid.sum(dim=-1, keepdim=True).clamp(min=1.0)  # (B, H, L)

        def mean(x: Tensor) -> Tensor:  # weighted mean over positions of finite values (junk at padding)
            return (weight[..., None] * masked(x, key_padding_mask)).sum(dim=-2)

        q_mean, k_mean = mean(q), mean(k)  # (B, H, D)
        square = mean(q.square()).sum(-1) + mean(k.square()).sum(-1)
        return square + 2 * (q_mean * k_mean).sum(dim=-1)


def oprf_coefficient(u: Tensor, dim: int) -> Tensor:
    """FAVOR++'s A* (Likhosherstov et al. 2022) for the pair-mean u = mean |x + y|^2 in dimension ``dim``.

    A* = (1/16) [1 - 2u/d - sqrt((2u/d + 1)^2 + 8u/d)] <= 0 minimises the pair mean of the log second
    moment of phi(x) phi(y), d log(1 - 4A) - (d/2) log(1 - 8A) + 2 (1 - 4A) |x + y|^2 / (1 - 8A) (a
    test checks it against a grid search). u = 0 gives A = 0: FAVOR+."""
    ratio = 2 * u / dim
    return (1 - ratio - torch.sqrt((ratio + 1) ** 2 + 4 * ratio)) / 16


def _oprf_shape(oprf_a: Tensor) -> Tensor:
    """A given per (batch, head) [B, H] or per head [H] -> broadcastable over [B, H, L, m]."""
    return oprf_a[..., None, None]


def softmax_logits(x: Tensor, projection: Tensor, oprf_a: Tensor | None = None) -> Tensor:
    """log of the unnormalised positive features with x' = x d^-1/4, [..., m]: W x' - |x'|^2 / 2
    (FAVOR+), or with FAVOR++'s coefficient A (``oprf_a`` [B, H] or [H], detached)
    A |w|^2 + sqrt(1 - 4A) W x' - |x'|^2 / 2 + (d / 4) log(1 - 4A); A = 0 is FAVOR+."""
    x = x * x.shape[-1] ** -0.25
    norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)
    # "+ (-norm)", not "- norm": a broadcast subtraction's backward negates the whole [.., m] gradient
    # before reducing it (a full pass over the largest tensor); this negates the reduced [.., 1] one.
    # In place on the fresh product (neither its backward nor the scaling's reads it): no second [.., m]
    # tensor (a fresh large tensor costs its page faults, about as much as the pass itself).
    if oprf_a is None:
        return (x @ projection.T).add_(-norm)
    a = _oprf_shape(oprf_a.to(x.dtype))
    bias = a * projection.square().sum(dim=-1) + 0.25 * x.shape[-1] * torch.log(1 - 4 * a)  # (.., 1, m)
    return (torch.sqrt(1 - 4 * a) * (x @ projection.T)).add_(-norm).add_(bias)


def softmax_kernel_features(
    x: Tensor,
    projection: Tensor,
    *,
    is_query: bool,
    stabilize: bool = True,
    key_padding_mask: Tensor | None = None,
    oprf_a: Tensor | None = None,
) -> Tensor:
    """Positive random features of the softmax kernel exp(x.y / sqrt(d)).

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m) with x' = x d^-1/4, so that E[phi(x).phi(y)] =
    exp(x.y / sqrt(d)) for W with N(0, I) rows.

    Args:
        x: [batch, heads, length, dim] queries or keys (unscaled).
        projection: [m, dim].
        is_query: selects the stabiliser (module docstring: row max for queries, shared key max).
        stabilize: if False, return the exact unbiased features above (may overflow for large x).
            If True, queries are divided by their own row max and keys by the max over all valid
            keys of their (batch, head); both constants cancel in attention. The key stabiliser looks
            at every position, so causal attention uses its own running version internally.
        key_padding_mask: bool [batch, length]; padded keys get zero features and are excluded from
            the key stabiliser.
        oprf_a: FAVOR++'s coefficient A (:func:`softmax_logits`), [batch, heads] or [heads]; None: FAVOR+.

    Returns:
        [batch, heads, length, m] in float32 (float64 for float64 input), even under autocast.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = compute_dtype(x)
        logits = softmax_logits(x.to(dtype), projection.to(dtype), oprf_a)
        if stabilize:
            if is_query:
                logits = logits - logits.amax(dim=-1, keepdim=True).detach()
            else:
                logits = logits - shared_key_offset(logits, key_padding_mask)[..., None, None]
        features = logits.exp()
        if not stabilize:
            features = features / math.sqrt(projection.shape[0])
        return features if is_query else masked(features, key_padding_mask)


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
        return masked(features, key_padding_mask)


class Features(NamedTuple):
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


def check_favor(
    where: str, q: Tensor, k: Tensor, v: Tensor | None, projection: Tensor, kernel: str,
    key_padding_mask: Tensor | None, oprf_a: Tensor | None = None,
) -> None:
    check_self_attention(where, q, k, v)
    check_projection(where, projection, q.shape[-1])
    if kernel not in ("softmax", "relu"):
        raise ValueError(f"{where}: kernel must be 'softmax' or 'relu', got {kernel!r}.")
    if oprf_a is not None and kernel != "softmax":
        raise ValueError(f"{where}: oprf_a (FAVOR++ features) needs kernel='softmax', got {kernel!r}.")
    if oprf_a is not None and oprf_a.shape not in ((q.shape[1],), tuple(q.shape[:2])):
        raise ValueError(f"{where}: oprf_a must be [heads] or [batch, heads] = {list(q.shape[:2])}, got "
                         f"{list(oprf_a.shape)}.")
    check_key_padding_mask(where, key_padding_mask, k.shape[0], k.shape[2])


def favor_features(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    projection: Tensor,
    kernel: Kernel,
    causal: bool,
    key_padding_mask: Tensor | None,
    oprf_a: Tensor | None = None,
) -> Features:
    """Query/key features with the stabilisers described in the module docstring (call with autocast off);
    ``oprf_a``: FAVOR++'s A ([B, H] or [H]) for the softmax kernel, None: FAVOR+."""
    dtype = compute_dtype(q)
    q, k, projection = q.to(dtype), k.to(dtype), projection.to(dtype)
    value = masked(v.to(dtype), key_padding_mask) if v is not None else k.new_zeros(())
    if kernel == "relu":
        return Features(
            relu_kernel_features(q, projection, key_padding_mask=key_padding_mask),
            relu_kernel_features(k, projection, key_padding_mask=key_padding_mask),
            value,
            None,
        )
    query = masked(softmax_kernel_features(q, projection, is_query=True, oprf_a=oprf_a), key_padding_mask)
    if not causal:
        key = softmax_kernel_features(k, projection, is_query=False, key_padding_mask=key_padding_mask, oprf_a=oprf_a)
        return Features(query, key, value, None)
    logits = softmax_logits(k, projection, oprf_a)
    offset = running_key_offset(logits, key_padding_mask)
    key = masked(torch.exp(logits - offset[..., None]), key_padding_mask)
    return Features(query, key, value, offset)


def oprf_input_scale(oprf_a: Tensor) -> Tensor:
    """B = sqrt(1 - 4A), broadcastable over [B, H, L, D]: the fast paths take B q and B k (autograd
    carries the factor to the gradients) and :func:`inplace_softmax_features` the same ``oprf_a``."""
    return torch.sqrt(1 - 4 * _oprf_shape(oprf_a))


def inplace_softmax_features(q: Tensor, k: Tensor, projection: Tensor, key_padding_mask: Tensor | None, running: bool,
                             oprf_a: Tensor | None = None):
    """Positive softmax-kernel features of queries and keys, in place (no autograd; the values of
    :func:`favor_features` with the softmax kernel, for FAVOR+ and windowed favor_rpe).

    phi_q = exp(W q' - max_a W q') (the row max and |q'|^2 / 2 are constant per query and cancel);
    phi_k = exp(W k' - |k'|^2 / 2 - offset), the offset the max over valid keys (shared) or, ``running``,
    the running max M_j (returned; else None). Both are zero at padding.
    FAVOR++ (``oprf_a`` = A, [B, H] or [H]): q and k arrive multiplied by B = :func:`oprf_input_scale`;
    phi_k = exp(W k~' - |k~'|^2 / (2 B^2) + 2 A |w|^2 - offset) for k~ = B k (the query's A |w|^2 moves
    to the key; the per-(batch, head) constant (d/4) log(1 - 4A) is left out, it cancels).

    Returns (phi_q, phi_k [B, H, L, m], offset [B, H, L] or None, k' [B, H, L, D] (k~' / B^2 with
    oprf_a: the derivative of the norm term), W_q [D, m], W_k [D + 1 (+ 1), m]): the last three are what
    the derivatives need (:func:`~protein_performer.ops.stabilise.key_gradient`)."""
    D = q.shape[-1]
    scale = D**-0.25
    pad = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
    w_query = projection.T * scale  # (D, m)
    columns = [projection, -torch.ones_like(projection[:, :1])]
    k_scaled = k * scale
    if oprf_a is None:
        k_aug = torch.cat([k_scaled, 0.5 * (k_scaled * k_scaled).sum(dim=-1, keepdim=True)], dim=-1)
    else:
        a = _oprf_shape(oprf_a.to(k.dtype)).expand(*k.shape[:3], 1)
        norm = (k_scaled * k_scaled).sum(dim=-1, keepdim=True) / (1 - 4 * a)
        k_aug = torch.cat([k_scaled, 0.5 * norm, a], dim=-1)  # (B, H, L, D + 2)
        columns.append(2 * projection.square().sum(dim=1, keepdim=True))
        k_scaled = k_scaled / (1 - 4 * a)
    w_key = torch.cat(columns, dim=1).T  # (D + 1 [+ 1], m)
    query = q @ w_query  # (B, H, L, m)
    query.sub_(query.amax(dim=-1, keepdim=True))
    key = k_aug @ w_key  # logits W k' - |k'|^2 / 2
    if pad is not None:
        query.masked_fill_(pad, -math.inf)
        key.masked_fill_(pad, -math.inf)
    query.exp_()
    offset = None
    if running:
        offset = running_max(key.amax(dim=-1))  # (B, H, L)
        key.sub_(offset[..., None])
    else:
        shared = key.amax(dim=(-2, -1), keepdim=True)
        key.sub_(torch.where(torch.isfinite(shared), shared, torch.zeros_like(shared)))
    key.exp_()
    return query, key, offset, k_scaled, w_query, w_key
