"""The relative-position bias of favor_rpe in its two forms, and the weights c = exp(b) the ops read.

- full: ``[heads, 2L - 1]``, entry ``(j - i) + L - 1`` holds b_(j-i) (the paper's form); a bias learned
  for a longer maximum length is cut to the current length with :func:`slice_rpe_bias`;
- windowed: a :class:`WindowedBias`, free within |j - i| < w and one value per direction beyond.
Weights are exp(b - max b) per head, the max over the offsets the mode reads (it cancels in the ratio
and keeps c <= 1); causal attention zeroes the offsets j - i > 0.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["WindowedBias", "check_windowed_bias", "expand_windowed_bias", "relative_weights", "slice_rpe_bias",
           "sum_by_head", "windowed_weights"]


class WindowedBias(NamedTuple):
    """A relative-position bias that is constant beyond a window w (log space: c = exp(b)).

    band: [heads, 2w - 1], b_(j-i) for |j - i| < w at index (j - i) + w - 1.
    far: [heads, 2], b for j - i <= -w (index 0, keys before the query) and j - i >= w (index 1).
    """

    band: Tensor
    far: Tensor

    @property
    def window(self) -> int:
        return (self.band.shape[-1] + 1) // 2


def check_windowed_bias(where: str, bias: WindowedBias, heads: int) -> None:
    band, far = bias
    if band.dim() != 2 or band.shape[0] != heads or band.shape[1] % 2 != 1:
        raise ValueError(
            f"{where}: rpe_bias.band must be [heads={heads}, 2w - 1] (odd width, window w >= 1), "
            f"got {tuple(band.shape)}."
        )
    if far.shape != (heads, 2):
        raise ValueError(
            f"{where}: rpe_bias.far must be [heads={heads}, 2] (before, after), got {tuple(far.shape)}."
        )


def expand_windowed_bias(bias: WindowedBias, length: int) -> Tensor:
    """The same bias over every offset of a length-L sequence: [heads, 2L - 1], entry (j - i) + L - 1
    (the full form of :func:`~protein_performer.ops.favor_rpe_attention`; O(L), for references and maps)."""
    window = bias.window
    offsets = torch.arange(-(length - 1), length, device=bias.band.device)
    index = (offsets + window).clamp(0, 2 * window)  # into [far before, band, far after]
    return torch.cat([bias.far[:, :1], bias.band, bias.far[:, 1:]], dim=1)[:, index]


def windowed_weights(bias: WindowedBias, causal: bool, dtype: torch.dtype) -> Tensor:
    """c = exp(b - max b) as [heads, 2w + 1] = [far before, band offsets -(w-1)..w-1, far after].

    The max (detached, it cancels in the ratio) is over the entries the mode reads; causal zeroes the
    positive offsets and the far-after value (never read; exp of them could overflow)."""
    b = torch.cat([bias.far[:, :1], bias.band, bias.far[:, 1:]], dim=1).to(dtype)
    window = bias.window
    read = b[:, : window + 1] if causal else b
    c = torch.exp(b - read.amax(dim=1, keepdim=True).detach())
    if causal:
        c = torch.cat([c[:, : window + 1], torch.zeros_like(c[:, window + 1 :])], dim=1)
    return c


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


def relative_weights(rpe_bias: Tensor, causal: bool, dtype: torch.dtype) -> Tensor:
    """c = exp(b - max b) per head, [H, 2L - 1]; causal zeroes the offsets j - i > 0.

    The max is taken over the offsets the mode reads and detached: it cancels in the ratio."""
    b = rpe_bias.to(dtype)
    length = (b.shape[1] + 1) // 2
    read = b[:, :length] if causal else b
    c = torch.exp(b - read.amax(dim=1, keepdim=True).detach())
    if causal:
        c = torch.cat([c[:, :length], torch.zeros_like(c[:, length:])], dim=1)
    return c


def sum_by_head(per_row: Tensor, heads: int) -> Tensor:
    """Sum [B * H, ...] over the batch (row b * H + h belongs to head h) -> [H, ...]."""
    return per_row.view(-1, heads, *per_row.shape[1:]).sum(dim=0)
