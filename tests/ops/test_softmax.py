"""Exact softmax attention (the baseline) against a per-query transcription of the definition."""

from __future__ import annotations

import math

import pytest
import torch

from protein_performer.ops import softmax_attention, softmax_attention_weights

from .common import random_qkv


def _definition(q, k, v, *, causal: bool, key_padding_mask):
    """Loop over queries: softmax over exactly the keys the query may see (none, or a padded query -> zero row)."""
    B, H, L, D = q.shape
    out = torch.zeros_like(v)
    for b in range(B):
        for i in range(L):
            visible = [
                j
                for j in range(L)
                if not (causal and j > i) and not (key_padding_mask is not None and key_padding_mask[b, j])
            ]
            if visible and not (key_padding_mask is not None and key_padding_mask[b, i]):
                weights = torch.softmax(q[b, :, i : i + 1] @ k[b, :, visible].transpose(-1, -2) / math.sqrt(D), dim=-1)
                out[b, :, i] = (weights @ v[b, :, visible])[:, 0]
    return out


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_softmax_attention_matches_the_definition(causal, padded):
    q, k, v = random_qkv(2, 3, 13, 8)
    mask = None
    if padded:
        mask = torch.zeros(2, 13, dtype=torch.bool)
        mask[1, 9:] = True
        mask[0, :2] = True  # left padding: causal queries 0 and 1 see nothing
    expected = _definition(q, k, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(softmax_attention(q, k, v, causal=causal, key_padding_mask=mask), expected)
    weights = softmax_attention_weights(q, k, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(weights @ v, expected)
    assert torch.isfinite(weights).all()


def test_fully_padded_sequence_gives_zero_rows():
    q, k, v = random_qkv(2, 1, 6, 4)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0] = True
    out = softmax_attention(q, k, v, key_padding_mask=mask)
    assert out[0].eq(0).all() and out[1].abs().sum() > 0
    assert softmax_attention_weights(q, k, key_padding_mask=mask)[0].eq(0).all()


def test_causal_softmax_ignores_future():
    q, k, v = random_qkv(1, 2, 10, 8)
    before = softmax_attention(q, k, v, causal=True)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 6:] += 3.0
    after = softmax_attention(q2, k2, v2, causal=True)
    torch.testing.assert_close(after[:, :, :6], before[:, :, :6], rtol=0, atol=1e-12)
    assert not torch.allclose(after[:, :, 6:], before[:, :, 6:])


def test_softmax_padding_is_invisible():
    q, k, v = random_qkv(2, 2, 15, 8)
    alone = softmax_attention(q[:1, :, :9], k[:1, :, :9], v[:1, :, :9])
    for t in (q, k, v):
        t[0, :, 9:] = 1e4
    mask = torch.zeros(2, 15, dtype=torch.bool)
    mask[0, 9:] = True
    torch.testing.assert_close(softmax_attention(q, k, v, key_padding_mask=mask)[:1, :, :9], alone)


@pytest.mark.parametrize(
    "q_shape,mask",
    [((2, 5, 8), None), ((1, 2, 5, 8), torch.zeros(1, 4, dtype=torch.bool)), ((1, 2, 5, 8), torch.zeros(1, 5))],
    ids=["3d-query", "mask-length", "mask-dtype"],
)
def test_bad_arguments_raise_clear_errors(q_shape, mask):
    q = torch.zeros(q_shape)
    k = torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="softmax_attention"):
        softmax_attention(q, k, k, key_padding_mask=mask)
