"""Rotary position embedding (RoFormer, Su et al. 2021), applied to queries and keys.

Each pair of channels (i, i + D/2) of a head is rotated by the angle `position * base^(-2i/D)`.
A rotation preserves norms, so FAVOR+'s softmax-kernel features exp(w.x - |x|^2/2) stay valid, and
q_i.k_j after rotation depends on (i, j) only through the offset j - i: relative positions in any
attention kind that sees q and k, softmax or kernelized.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

ROTARY_BASE = 10_000.0  # RoFormer's wavelength base: the longest wavelength is ~2*pi*10^4 positions.


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension: a 90 degree turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates [batch, heads, length, head_dim] queries or keys by their absolute positions.

    Nothing is stored: angles are recomputed per call (cheap next to attention) in float64 and applied in
    at least float32, so there is no maximum length, nothing rotary in the checkpoint, and casting the
    model to bf16 cannot coarsen angles that reach ~1e4 radians.
    """

    def __init__(self, head_dim: int, base: float = ROTARY_BASE) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}; "
                             "choose d_model / n_heads even or use position='learned'/'none'")
        self.head_dim = head_dim
        self.base = base

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Cosines and sines for integer `positions` [...] -> two [..., head_dim] tensors of `dtype`."""
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float64) / self.head_dim
        angles = positions.to(torch.float64)[..., None] * self.base ** -exponents  # (..., D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (..., D): channel i and i + D/2 share an angle
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Rotate x [batch, heads, length, head_dim]; same shape and dtype.

        Positions are offset, offset + 1, ... (the first token at `offset`), or per token when
        `positions` [batch, length] (integers) is given, e.g. member_positions of a homolog window.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        if positions is None:
            positions = torch.arange(offset, offset + x.shape[-2], device=x.device)
        else:
            positions = positions[:, None, :]  # (B, 1, L): one angle per token, shared by the heads
        cos, sin = self.cos_sin(positions, dtype)
        x_up = x.to(dtype)
        return (x_up * cos + rotate_half(x_up) * sin).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}"


def member_positions(input_ids: Tensor, separators: tuple[int, ...]) -> Tensor:
    """Positions counted within each member: input_ids [batch, length] -> long [batch, length].

    A token's position is its distance from the last separator (<cls> or <eos>) before it, so the members
    of `<cls> m1 <eos> m2 <eos>` number their residues 1, 2, ... alike, and each <eos> takes the position
    after its member's last residue. A single protein `<cls> residues <eos>` gets 0, 1, ..., L + 1, as with
    positions counted from the window's start; tokens before the first separator count from the start.
    """
    batch, length = input_ids.shape
    index = torch.arange(length, device=input_ids.device)
    is_separator = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in separators:
        is_separator |= input_ids == token
    marks = torch.where(is_separator, index, torch.zeros_like(index))  # (B, L)
    # the index of the last separator strictly before each token (0 if none): a running max, shifted by one
    before = torch.nn.functional.pad(marks[:, :-1], (1, 0)).cummax(dim=1).values
    return index - before
