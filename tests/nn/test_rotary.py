"""Rotary position embedding: relative scores, norm preservation, offsets."""
from __future__ import annotations

import pytest
import torch

from protein_performer.nn import RotaryEmbedding, rotate_half

HEAD_DIM = 16


def _at(rotary: RotaryEmbedding, x: torch.Tensor, position: int) -> torch.Tensor:
    """Rotate one vector x [head_dim] as if it sat at `position`."""
    return rotary(x.view(1, 1, 1, -1), offset=position).view(-1)


def test_rotated_scores_depend_only_on_offset() -> None:
    rotary = RotaryEmbedding(HEAD_DIM)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, HEAD_DIM, generator=gen, dtype=torch.float64)
    for i, j in [(0, 3), (5, 2), (7, 7), (100, 40)]:
        reference = _at(rotary, q, i) @ _at(rotary, k, j)
        for shift in (1, 17, 1000):
            shifted = _at(rotary, q, i + shift) @ _at(rotary, k, j + shift)
            torch.testing.assert_close(shifted, reference, rtol=0, atol=1e-10)
    # ...and the offset does matter, otherwise the check above would hold for the identity too.
    scores = torch.stack([_at(rotary, q, 0) @ _at(rotary, k, j) for j in range(4)])
    assert (scores[1:] - scores[0]).abs().min() > 1e-3


def test_rotation_preserves_norms_and_position_zero_is_identity() -> None:
    rotary = RotaryEmbedding(HEAD_DIM)
    x = torch.randn(2, 3, 9, HEAD_DIM, dtype=torch.float64)
    rotated = rotary(x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])


def test_offset_equals_slice_of_longer_sequence() -> None:
    rotary = RotaryEmbedding(HEAD_DIM)
    x = torch.randn(1, 2, 12, HEAD_DIM)
    torch.testing.assert_close(rotary(x[:, :, 5:], offset=5), rotary(x)[:, :, 5:])


def test_rotate_half_is_a_quarter_turn() -> None:
    x = torch.randn(4, HEAD_DIM)
    torch.testing.assert_close(rotate_half(rotate_half(x)), -x)
    torch.testing.assert_close((rotate_half(x) * x).sum(-1), torch.zeros(4))


def test_keeps_low_precision_dtype() -> None:
    x = torch.randn(1, 1, 5, HEAD_DIM, dtype=torch.bfloat16)
    assert RotaryEmbedding(HEAD_DIM)(x, offset=3).dtype == torch.bfloat16


def test_odd_head_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)
