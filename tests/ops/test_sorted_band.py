"""FAVOR+ with its exact band taken in another order (attention.band_order='member'): the fast paths
against the dense reference, and the reference against pairs written out one by one."""
from __future__ import annotations

import math

import pytest
import torch

from protein_performer import ops

from .common import padding, random_projection, random_qkv


def band_order(length: int, valid: list[int], period: list[int]) -> torch.Tensor:
    """Positions sorted by (member position = i % period, i), padding last: what the layer builds."""
    rows = []
    for b, p in enumerate(period):
        keys = [(i >= valid[b], i % p, i) for i in range(length)]
        rows.append(sorted(range(length), key=lambda i: keys[i]))
    return torch.tensor(rows)


def pairwise(q, k, projection, window, order, causal, mask):
    """The matrix written out pair by pair: exp(q.k / sqrt d) on the sorted band, phi(q).phi(k) elsewhere."""
    B, H, L, D = q.shape
    exact = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(D))
    favor = (ops.softmax_kernel_features(q, projection, is_query=True, stabilize=False)
             @ ops.softmax_kernel_features(k, projection, is_query=False, stabilize=False).transpose(-1, -2))
    rank = order.argsort(dim=1)
    band = torch.tensor([[[abs(int(rank[b, i]) // window - int(rank[b, j]) // window) <= 1 for j in range(L)]
                          for i in range(L)] for b in range(B)])[:, None]
    weights = torch.where(band, exact, favor).masked_fill(mask[:, None, None, :], 0.0)
    if causal:
        weights = weights.tril()
    return weights / weights.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_reference_is_the_sorted_band_written_out_pair_by_pair(causal: bool) -> None:
    q, k, _ = random_qkv(2, 2, 13, 4, seed=3)
    projection = random_projection(16, 4)
    mask = padding(13, [13, 10])
    order = band_order(13, [13, 10], [4, 5])
    got = ops.implied_sorted_band_attention(q, k, projection, 3, order, causal=causal, key_padding_mask=mask)
    want = pairwise(q, k, projection, 3, order, causal, mask)
    rows = ~mask[:, None, :, None]
    torch.testing.assert_close(got * rows, want * rows, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("oprf", [False, True], ids=["positive", "oprf"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_fast_path_equals_the_reference_outputs_and_gradients(causal: bool, window: int, oprf: bool) -> None:
    q, k, v = random_qkv(2, 2, 21, 6, seed=5, scale=1.4)
    for x in (q, k, v):
        x.requires_grad_(True)
    projection = random_projection(16, 6)
    mask = padding(21, [21, 16])
    order = band_order(21, [21, 16], [6, 7])
    oprf_a = ops.oprf_coefficient(torch.tensor([2.0, 4.0], dtype=torch.float64), 6) if oprf else None
    got = ops.favor_sorted_band_attention(q, k, v, projection, window, order, causal=causal, key_padding_mask=mask,
                                          oprf_a=oprf_a, chunk_size=4)
    want = ops.implied_sorted_band_attention(q, k, projection, window, order, causal=causal, key_padding_mask=mask,
                                             oprf_a=oprf_a) @ v
    rows = ~mask[:, None, :, None]
    torch.testing.assert_close(got * rows, want * rows, rtol=1e-9, atol=1e-11)
    assert got[~rows.expand_as(got)].eq(0).all()  # padded queries: zero rows
    probe = torch.randn_like(got) * rows
    grads = torch.autograd.grad((got * probe).sum(), (q, k, v), retain_graph=True)
    wants = torch.autograd.grad((want * probe).sum(), (q, k, v))
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_causal_outputs_do_not_see_later_tokens_nor_padding() -> None:
    """Changing the last tokens (or padded junk) leaves every earlier output unchanged, although the
    sorted order puts later tokens in earlier blocks."""
    q, k, v = random_qkv(1, 2, 24, 4, seed=9, scale=1.5)
    projection = random_projection(12, 4)
    order = band_order(24, [24], [5])
    base = ops.favor_sorted_band_attention(q, k, v, projection, 2, order, causal=True)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 17:] = torch.randn_like(x[:, :, 17:]) * 30  # large: a leak would show through stabilisers
    moved = ops.favor_sorted_band_attention(q2, k2, v2, projection, 2, order, causal=True)
    torch.testing.assert_close(moved[:, :, :17], base[:, :, :17], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(moved[:, :, 17:], base[:, :, 17:])
    mask = padding(24, [20])
    order = band_order(24, [20], [5])
    clean = ops.favor_sorted_band_attention(q, k, v, projection, 2, order, causal=True, key_padding_mask=mask)
    v2 = v.clone()
    v2[:, :, 20:] = float("nan")
    junk = ops.favor_sorted_band_attention(q, k, v2, projection, 2, order, causal=True, key_padding_mask=mask)
    torch.testing.assert_close(junk, clean, rtol=0, atol=0)


def test_an_identity_order_is_the_sequence_band() -> None:
    q, k, v = random_qkv(2, 2, 17, 4, seed=1)
    projection = random_projection(8, 4)
    order = torch.arange(17).expand(2, 17)
    for causal in (False, True):
        torch.testing.assert_close(
            ops.favor_sorted_band_attention(q, k, v, projection, 4, order, causal=causal),
            ops.favor_window_attention(q, k, v, projection, 4, causal=causal), rtol=1e-9, atol=1e-11)


def test_bad_orders_are_refused() -> None:
    q, k, v = random_qkv(1, 1, 6, 4)
    projection = random_projection(8, 4)
    with pytest.raises(ValueError, match=r"order must be a long tensor \[batch, length\] = \[1, 6\]"):
        ops.favor_sorted_band_attention(q, k, v, projection, 2, torch.arange(5)[None])
    with pytest.raises(ValueError, match="window"):
        ops.favor_sorted_band_attention(q, k, v, projection, 0, torch.arange(6)[None])
