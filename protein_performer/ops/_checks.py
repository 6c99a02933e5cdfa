"""Argument checks shared by the attention ops: one wording for one mistake, whichever op meets it."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, and bf16/fp16 under autocast) computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_self_attention(where: str, q: Tensor, k: Tensor, v: Tensor | None = None) -> None:
    """q, k (and v) are [batch, heads, length, dim] of one sequence: q and k equal in shape, v in
    batch, heads and length."""
    tensors = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(
                f"{where}: {name} must be [batch, heads, length, dim], got {tuple(t.shape)}; split heads before "
                "calling (e.g. x.view(B, L, H, D).transpose(1, 2))."
            )
    if q.shape != k.shape or (v is not None and v.shape[:3] != k.shape[:3]):
        raise ValueError(
            f"{where}: q {tuple(q.shape)}, k {tuple(k.shape)}"
            + ("" if v is None else f", v {tuple(v.shape)}")
            + " must agree in batch, heads and length (and q, k in head_dim)."
        )


def check_projection(where: str, projection: Tensor, head_dim: int) -> None:
    if projection.dim() != 2 or projection.shape[1] != head_dim:
        raise ValueError(
            f"{where}: projection must be [nb_features, head_dim={head_dim}], got {tuple(projection.shape)}."
        )


def check_key_padding_mask(where: str, key_padding_mask: Tensor | None, batch: int, length: int) -> None:
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (batch, length)
    ):
        raise ValueError(
            f"{where}: key_padding_mask must be bool [batch, length] = {(batch, length)} (True at padding), "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}."
        )
