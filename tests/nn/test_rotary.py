"""Rotary position embedding: relative scores, norm preservation, offsets."""
from __future__ import annotations

import pytest
import torch

from protein_performer.nn import RotaryEmbedding, member_positions, rotate_half

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


def test_member_positions_restart_after_each_separator() -> None:
    cls, eos, pad = 0, 2, 1
    ids = torch.tensor([[cls, 5, 6, 7, eos, 5, 6, eos, pad, pad],
                        [cls, 5, 6, eos, cls, 8, 9, 9, eos, 4],
                        [5, 6, eos, 7, 8, 9, eos, 4, 4, 4]])
    expected = torch.tensor([[0, 1, 2, 3, 4, 1, 2, 3, 1, 2],  # each <eos> follows its member's last residue
                             [0, 1, 2, 3, 1, 1, 2, 3, 4, 1],  # a packed second <cls> continues the count
                             [0, 1, 2, 1, 2, 3, 4, 1, 2, 3]])  # before the first separator: from the start
    torch.testing.assert_close(member_positions(ids, (cls, eos)), expected, rtol=0, atol=0)
    # a single protein <cls> residues <eos> is numbered as from the window's start
    single = torch.tensor([[cls, 5, 6, 7, 8, eos]])
    torch.testing.assert_close(member_positions(single, (cls, eos)), torch.arange(6)[None], rtol=0, atol=0)


def test_per_token_positions_equal_the_offset_form() -> None:
    rotary = RotaryEmbedding(HEAD_DIM)
    x = torch.randn(2, 3, 7, HEAD_DIM, dtype=torch.float64)
    positions = torch.tensor([[4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 0, 1, 2, 3]])
    rotated = rotary(x, positions=positions)
    torch.testing.assert_close(rotated[0], rotary(x[:1], offset=4)[0])
    torch.testing.assert_close(rotated[1, :, 3:], rotary(x[1:, :, 3:])[0])
    torch.testing.assert_close(rotated[1, :, :3], rotary(x[1:, :, :3])[0])
