"""Combiner-Fixed and Combiner-Axial against the dense matrix of their factorisation: exactness and
gradients (float64), full support with rows summing to 1, the exact-softmax limits, causality,
padding, lengths that are not a multiple of the block size."""
from __future__ import annotations

import pytest
import torch

from protein_performer.ops import combiner_attention, combiner_attention_weights, softmax_attention
from protein_performer.ops.combiner import default_block_size

from .common import F64, generator, padding, random_qkv

VARIANTS = ["fixed", "axial"]
MODES = [pytest.param(False, id="bidir"), pytest.param(True, id="causal")]
# (length, block_size): a multiple, not a multiple (padded tail), the default ceil(sqrt(L)), block > L/2.
SHAPES = [
    pytest.param(24, 4, id="L24-s4"),
    pytest.param(23, 5, id="L23-s5"),
    pytest.param(30, None, id="L30-default"),
    pytest.param(13, 9, id="L13-s9"),
]


def _qkv(batch=2, heads=2, length=24, dim=6, *, seed=0):
    return random_qkv(batch, heads, length, dim, seed=seed)


def _allowed(length: int, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """[B or 1, 1, L, L]: the keys exact attention lets each query see."""
    allowed = torch.ones(length, length, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & ~mask[:, None, None, :]
    return allowed


@pytest.mark.parametrize("length,block_size", SHAPES)
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_output_and_gradients_equal_dense_weights(variant, causal, length, block_size):
    q, k, v = _qkv(length=length)
    mask = padding(length, [length, length - 7])
    kwargs = dict(causal=causal, block_size=block_size, variant=variant, key_padding_mask=mask)
    cotangent = torch.randn(2, 2, length, 6, generator=generator(3), dtype=F64)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        (out * cotangent).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    fast, fast_grads = run(lambda a, b, c: combiner_attention(a, b, c, **kwargs))
    dense, dense_grads = run(lambda a, b, c: combiner_attention_weights(a, b, **kwargs) @ c)
    torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)
    for name, got, want in zip("qkv", fast_grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("value_dim", [2, 11], ids=["narrower", "wider"])
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_values_may_differ_in_width_from_queries(variant, causal, value_dim):
    """As with SDPA, v's last dimension is free: [B, H, L, Dv] in, [B, H, L, Dv] out, gradients too."""
    q, k, _ = _qkv(length=17, seed=9)
    v = torch.randn(2, 2, 17, value_dim, generator=generator(10), dtype=F64)
    mask = padding(17, [17, 12])
    kwargs = dict(causal=causal, block_size=4, variant=variant, key_padding_mask=mask)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = combiner_attention(*leaves, **kwargs)
    assert out.shape == (2, 2, 17, value_dim)
    torch.testing.assert_close(out, combiner_attention_weights(q, k, **kwargs) @ v, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    assert leaves[2].grad.shape == v.shape and torch.isfinite(leaves[0].grad).all()


@pytest.mark.parametrize("length,block_size", SHAPES)
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_sum_to_one_with_full_support(variant, causal, length, block_size):
    """Every key exact attention allows a real query gets a positive weight, every other key exactly zero;
    padded queries' rows are zero."""
    q, k, _ = _qkv(length=length, seed=1)
    mask = padding(length, [length, length - 5])
    weights = combiner_attention_weights(
        q, k, causal=causal, block_size=block_size, variant=variant, key_padding_mask=mask
    )
    real = ~mask[:, None, :].expand_as(weights[..., 0])
    torch.testing.assert_close(weights.sum(dim=-1), real.to(weights.dtype), rtol=0, atol=1e-12)
    allowed = (_allowed(length, causal, mask) & real[..., None]).expand_as(weights)
    assert (weights[allowed] > 0).all()
    assert (weights[~allowed] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_summarised_region_shares_one_inner_distribution(variant):
    """Within a region reached through its summary, key weights are (region weight) x q(j | region):
    their proportions are the same for every query that uses the region."""
    length, s = 16, 4
    q, k, _ = _qkv(batch=1, heads=1, length=length, seed=3)
    weights = combiner_attention_weights(q, k, block_size=s, variant=variant)[0, 0]
    if variant == "fixed":  # block 3 (keys 12..15), seen through its summary by every query of blocks 0-2
        queries, region = torch.arange(0, 12), torch.arange(12, 16)
    else:  # column 1 above row 3 (keys 1, 5, 9), a summary for the queries (3, 0), (3, 2), (3, 3)
        queries, region = torch.tensor([12, 14, 15]), torch.tensor([1, 5, 9])
    inner = weights[queries][:, region]
    inner = inner / inner.sum(dim=1, keepdim=True)
    torch.testing.assert_close(inner, inner[:1].expand_as(inner))
    assert inner.std(dim=1).min() > 1e-3  # not a uniform split


@pytest.mark.parametrize("block_size", ["one", "length"])
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_extreme_block_sizes_are_exact_softmax(variant, causal, block_size):
    length = 19
    q, k, v = _qkv(length=length, seed=2)
    mask = padding(length, [length, 12])
    s = 1 if block_size == "one" else length
    out = combiner_attention(q, k, v, causal=causal, block_size=s, variant=variant, key_padding_mask=mask)
    torch.testing.assert_close(out, softmax_attention(q, k, v, causal=causal, key_padding_mask=mask))


@pytest.mark.parametrize("variant", VARIANTS)
def test_intermediate_block_size_is_not_exact_softmax(variant):
    """The factorisation is an approximation in between: the limits above are not vacuous."""
    q, k, v = _qkv(length=25, seed=4)
    out = combiner_attention(q, k, v, block_size=5, variant=variant)
    assert (out - softmax_attention(q, k, v)).abs().max() > 1e-3


@pytest.mark.parametrize("length,block_size", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_output_ignores_future(variant, length, block_size):
    q, k, v = _qkv(length=length, seed=5)
    g = generator(6)
    for t in (9, length - 2):  # mid-block and near the end
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] = torch.randn(x[:, :, t + 1 :].shape, generator=g, dtype=F64) * 50
        before = combiner_attention(q, k, v, causal=True, block_size=block_size, variant=variant)
        after = combiner_attention(q2, k2, v2, causal=True, block_size=block_size, variant=variant)
        torch.testing.assert_close(after[:, :, : t + 1], before[:, :, : t + 1], rtol=0, atol=1e-13)
        assert (after[:, :, t + 1 :] - before[:, :, t + 1 :]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_is_invisible(variant, causal):
    """Junk (even NaN) at padded positions changes no output of a real position."""
    length = 23
    q, k, v = _qkv(length=length, seed=7)
    mask = padding(length, [length, 15])
    junk = [t.clone() for t in (q, k, v)]
    for t in junk:
        t[1, :, 15:] = torch.nan
    clean = combiner_attention(q, k, v, causal=causal, block_size=4, variant=variant, key_padding_mask=mask)
    dirty = combiner_attention(*junk, causal=causal, block_size=4, variant=variant, key_padding_mask=mask)
    torch.testing.assert_close(dirty[0], clean[0], rtol=0, atol=0)
    torch.testing.assert_close(dirty[1, :, :15], clean[1, :, :15], rtol=0, atol=0)
    # and padding is the same as leaving those positions out altogether
    short = combiner_attention(*(t[1:, :, :15] for t in (q, k, v)), causal=causal, block_size=4, variant=variant)
    torch.testing.assert_close(clean[1:, :, :15], short, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_query_with_nothing_to_see_gets_zero_row(variant):
    q, k, v = _qkv(length=10, seed=8)
    mask = padding(10, [10, 0])
    out = combiner_attention(q, k, v, block_size=3, variant=variant, key_padding_mask=mask)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_runs_in_float32_and_matches_float64(variant):
    q, k, v = _qkv(length=50, seed=9)
    out32 = combiner_attention(q.float(), k.float(), v.float(), causal=True, variant=variant)
    assert out32.dtype == torch.float32
    out64 = combiner_attention(q, k, v, causal=True, variant=variant)
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)


def test_default_block_size_is_ceil_sqrt():
    assert [default_block_size(n) for n in (1, 2, 16, 17, 8192)] == [1, 2, 4, 5, 91]


def test_bad_arguments_are_rejected():
    q, k, v = _qkv(length=8)
    with pytest.raises(ValueError, match="variant"):
        combiner_attention(q, k, v, variant="logsparse")
    with pytest.raises(ValueError, match="block_size"):
        combiner_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        combiner_attention(q, k, v, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
