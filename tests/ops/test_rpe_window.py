"""favor_rpe with a windowed bias (FAVOR+ far states + blocked band) against the dense O(L^2) reference
built from the same effective bias: outputs and gradients in float64 at lengths below, at and beyond
the window and off the block grid; causality bit for bit; padding; the block size and chunking change
nothing; agreement with the full-bias paths; the recurrent step; memory; bad settings."""
from __future__ import annotations

import pytest
import torch

from protein_performer.ops import (
    WindowedBias,
    expand_windowed_bias,
    favor_attention,
    favor_rpe_attention,
    favor_rpe_causal_step,
    gaussian_orthogonal_random_matrix,
    implied_rpe_attention,
)
from protein_performer.ops.rpe import window

from .common import F64, generator, padding


def _inputs(batch=2, heads=3, length=37, dim=6, nb_features=8, window=8, *, seed=0, dtype=F64, bias_scale=1.0,
            value_dim=None):
    g = generator(seed)
    q, k = (torch.randn(batch, heads, length, dim, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, heads, length, value_dim or dim, generator=g, dtype=dtype)
    projection = gaussian_orthogonal_random_matrix(nb_features, dim, generator=g, dtype=dtype)
    bias = WindowedBias(torch.randn(heads, 2 * window - 1, generator=g, dtype=dtype) * bias_scale,
                        torch.randn(heads, 2, generator=g, dtype=dtype) * bias_scale)
    return q, k, v, projection, bias


def _grads(fn, leaves, cotangent):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    (out * cotangent).sum().backward()
    return out.detach(), [t.grad for t in leaves]


MODES = [pytest.param(False, id="bidir"), pytest.param(True, id="causal")]
# (length, window, block): shorter than, equal to and longer than w; on and off the block grid; one
# block; w = 1 (only the diagonal is free); blocks smaller than w (5 key blocks per query block)
SHAPES = [
    pytest.param(5, 8, 4, id="L5-w8-shorter"),
    pytest.param(8, 8, 4, id="L8-w8-equal"),
    pytest.param(37, 8, 4, id="L37-w8-T4-longer-off-grid"),
    pytest.param(37, 8, 8, id="L37-w8-T8"),
    pytest.param(40, 8, 16, id="L40-w8-T16-block-wider-than-window"),
    pytest.param(29, 1, 4, id="L29-w1"),
    pytest.param(50, 11, 3, id="L50-w11-T3"),
]


@pytest.mark.parametrize("valid", [pytest.param(None, id="nopad"), pytest.param([0.8], id="pad")])
@pytest.mark.parametrize("length,window,block", SHAPES)
@pytest.mark.parametrize("causal", MODES)
def test_outputs_and_gradients_equal_the_dense_reference(causal, length, window, block, valid):
    q, k, v, projection, bias = _inputs(length=length, window=window)
    mask = None if valid is None else padding(length, [length, max(1, int(valid[0] * length))])
    cotangent = torch.randn(v.shape, generator=generator(5), dtype=F64)
    leaves = [q, k, v, bias.band, bias.far]
    fast, fast_grads = _grads(lambda a, b, c, band, far: favor_rpe_attention(
        a, b, c, projection, WindowedBias(band, far), causal=causal, key_padding_mask=mask, block_size=block),
        leaves, cotangent)
    dense, dense_grads = _grads(lambda a, b, c, band, far: implied_rpe_attention(
        a, b, projection, WindowedBias(band, far), causal=causal, key_padding_mask=mask) @ c, leaves, cotangent)
    torch.testing.assert_close(fast, dense, rtol=1e-11, atol=1e-12)
    for name, got, want in zip(["q", "k", "v", "band", "far"], fast_grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11, msg=lambda m: f"grad {name}: {m}")
    if causal:  # offsets j - i > 0 and the far-after value are never read
        assert (fast_grads[3][:, window:] == 0).all() and (fast_grads[4][:, 1] == 0).all()
    if mask is not None:
        assert fast[1, :, int(mask[1].logical_not().sum()):].abs().max() == 0  # padded queries: zero rows


@pytest.mark.parametrize("causal", MODES)
def test_gradcheck(causal):
    """Finite differences through q, k, v and both bias parts (fast mode)."""
    q, k, v, projection, bias = _inputs(batch=1, heads=2, length=11, dim=3, nb_features=4, window=3, seed=3)
    mask = padding(11, [10])
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v, bias.band, bias.far))
    assert torch.autograd.gradcheck(
        lambda a, b, c, band, far: favor_rpe_attention(a, b, c, projection, WindowedBias(band, far), causal=causal,
                                                       key_padding_mask=mask, block_size=2),
        inputs, fast_mode=True)


@pytest.mark.parametrize("causal", MODES)
def test_block_size_and_chunking_change_nothing(causal, monkeypatch):
    q, k, v, projection, bias = _inputs(length=45, window=6)
    cotangent = torch.randn(v.shape, generator=generator(2), dtype=F64)
    leaves = [q, k, v, bias.band, bias.far]

    def run(block):
        return _grads(lambda a, b, c, band, far: favor_rpe_attention(
            a, b, c, projection, WindowedBias(band, far), causal=causal, block_size=block), leaves, cotangent)

    want, want_grads = run(None)
    monkeypatch.setattr(window, "_CHUNK_ELEMENTS", 2 * 3 * 4 * 4 * 3)  # 3 query blocks of 4 per chunk
    for block in (1, 4, 5, 64):
        got, got_grads = run(block)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", MODES)
def test_windowed_equals_the_full_bias_paths_on_the_same_bias(causal):
    """The same effective bias in the full form ([heads, 2L - 1]) gives the same attention by the
    dense and FFT paths: the two forms mean the same thing."""
    q, k, v, projection, bias = _inputs(length=30, window=7)
    windowed = favor_rpe_attention(q, k, v, projection, bias, causal=causal)
    full = expand_windowed_bias(bias, 30)
    assert full.shape == (3, 59)
    for toeplitz in ("dense", "fft"):
        torch.testing.assert_close(windowed, favor_rpe_attention(q, k, v, projection, full, causal=causal,
                                                                 toeplitz=toeplitz), rtol=1e-10, atol=1e-11)


def test_expanded_bias_puts_each_value_at_its_offsets():
    band = torch.arange(5.0)[None]  # w = 3: offsets -2 .. 2 hold 0 .. 4
    full = expand_windowed_bias(WindowedBias(band, torch.tensor([[-1.0, 9.0]])), 6)  # offsets -5 .. 5
    assert full.tolist() == [[-1.0, -1.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 9.0, 9.0]]


@pytest.mark.parametrize("causal", MODES)
def test_zero_bias_is_plain_favor(causal):
    q, k, v, projection, bias = _inputs(length=33, window=5)
    zero = WindowedBias(torch.zeros_like(bias.band), torch.zeros_like(bias.far))
    mask = padding(33, [33, 20])
    torch.testing.assert_close(favor_rpe_attention(q, k, v, projection, zero, causal=causal, key_padding_mask=mask,
                                                   block_size=4),
                               favor_attention(q, k, v, projection, causal=causal, key_padding_mask=mask))


@pytest.mark.parametrize("causal", MODES)
def test_values_may_be_wider_or_narrower_than_queries(causal):
    for value_dim in (2, 11):
        q, k, v, projection, bias = _inputs(length=21, window=4, value_dim=value_dim)
        out = favor_rpe_attention(q, k, v, projection, bias, causal=causal, block_size=4)
        assert out.shape == v.shape
        torch.testing.assert_close(out, implied_rpe_attention(q, k, projection, bias, causal=causal) @ v)


@pytest.mark.parametrize("causal", MODES)
def test_float32_matches_float64_with_a_wide_bias(causal):
    """Band and far values spread over [-10, 10]: every term is nonnegative (nothing is subtracted),
    so float32 stays close even where the far weights dwarf the band or the reverse."""
    length, window = 300, 16
    q, k, v, projection, bias = _inputs(batch=1, heads=2, length=length, dim=16, nb_features=32, window=window,
                                        seed=2, bias_scale=0.0)
    g = generator(7)
    bias = WindowedBias(torch.rand(2, 2 * window - 1, generator=g, dtype=F64) * 20 - 10,
                        torch.tensor([[10.0, -10.0], [-10.0, 10.0]], dtype=F64))
    mask = padding(length, [280])
    ref = implied_rpe_attention(q, k, projection, bias, causal=causal, key_padding_mask=mask) @ v
    out = favor_rpe_attention(q.float(), k.float(), v.float(), projection.float(),
                              WindowedBias(bias.band.float(), bias.far.float()), causal=causal,
                              key_padding_mask=mask, block_size=8)
    assert out.dtype == torch.float32
    error = ((out.double() - ref).abs().amax(dim=-1) / ref.abs().amax(dim=-1).clamp_min(1e-300)).amax()
    assert error < 1e-4


def test_causal_past_is_bit_for_bit_independent_of_the_future():
    """float32, blocks of 4, t = 17 inside a block, far state in play: louder future keys (30x norm,
    and in t's own block one at the largest logit any key can reach, ~100 nats above the past keys)
    and values x100 change no bit of the past outputs or of the gradients of a loss on them."""
    length, t = 40, 17
    q, k, v, projection, bias = _inputs(length=length, dim=32, nb_features=64, window=6, seed=4, dtype=torch.float32)
    k = k * 8
    g = generator(13)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    future = q2[:, :, t + 1 :].shape
    q2[:, :, t + 1 :] = torch.randn(future, generator=g)
    k2[:, :, t + 1 :] = torch.randn(future, generator=g)
    k2[:, :, t + 1] *= 30
    k2[:, :, t + 2] = projection[projection.norm(dim=1).argmax()] * q.shape[-1] ** 0.25
    v2[:, :, t + 1 :] *= 100
    mask = padding(length, [length, 36])
    cotangent = torch.randn(q.shape, generator=generator(6))
    cotangent[:, :, t + 1 :] = 0

    def run(*qkv):
        return _grads(lambda a, b, c: favor_rpe_attention(a, b, c, projection, bias, causal=True,
                                                          key_padding_mask=mask, block_size=4), qkv, cotangent)

    before, grads_before = run(q, k, v)
    after, grads_after = run(q2, k2, v2)
    assert torch.isfinite(after).all()
    assert torch.equal(after[:, :, : t + 1], before[:, :, : t + 1])
    for name, got, want in zip("qkv", grads_after, grads_before):
        assert torch.equal(got[:, :, : t + 1], want[:, :, : t + 1]), f"grad {name}"
    assert (after[:, :, t + 1 :] - before[:, :, t + 1 :]).abs().max() > 1e-2  # the future did change


@pytest.mark.parametrize("causal", MODES)
def test_padding_is_invisible(causal):
    q, k, v, projection, bias = _inputs(length=37, window=5)
    mask = padding(37, [37, 26])
    junk = [t.clone() for t in (q, k, v)]
    for t in junk:
        t[1, :, 26:] = torch.nan
    clean = favor_rpe_attention(q, k, v, projection, bias, causal=causal, key_padding_mask=mask, block_size=4)
    dirty = favor_rpe_attention(*junk, projection, bias, causal=causal, key_padding_mask=mask, block_size=4)
    assert torch.equal(dirty, clean)
    assert clean[1, :, 26:].abs().max() == 0
    short = favor_rpe_attention(*(t[1:, :, :26] for t in (q, k, v)), projection, bias, causal=causal, block_size=4)
    torch.testing.assert_close(clean[1:, :, :26], short, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("length", [3, 25], ids=["inside-window", "beyond-window"])
def test_recurrent_step_reproduces_the_parallel_forward(length):
    q, k, v, projection, bias = _inputs(length=length, window=6)
    parallel = favor_rpe_attention(q, k, v, projection, bias, causal=True, block_size=4)
    state = None
    for t in range(length):
        out, state = favor_rpe_causal_step(q[:, :, t], k[:, :, t], v[:, :, t], projection, bias, state)
        torch.testing.assert_close(out, parallel[:, :, t], rtol=1e-10, atol=1e-12)
    assert state.keys.shape[2] == min(length, 6)


def test_saved_activations_are_linear_in_length_and_never_length_x_window_x_features():
    """What autograd keeps for the backward pass: features, band scores [L, 2w + T] and block states,
    never an [L, w, m] tensor; doubling L doubles it."""
    def saved_numel(length: int) -> int:
        q, k, v, projection, bias = _inputs(batch=1, heads=2, length=length, dim=8, nb_features=64, window=32)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel()
            return tensor

        leaves = [t.requires_grad_() for t in (q, k, v)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            favor_rpe_attention(*leaves, projection, bias)
        return total

    small, large = saved_numel(512), saved_numel(1024)
    assert large <= 2.1 * small
    assert large < 2 * 1024 * 32 * 64 / 2  # everything together is half of one heads x L x w x m tensor


def test_bad_windowed_settings_name_the_setting():
    q, k, v, projection, bias = _inputs(length=8, window=3)
    with pytest.raises(ValueError, match=r"rpe_bias.band must be \[heads=3, 2w - 1\]"):
        favor_rpe_attention(q, k, v, projection, WindowedBias(torch.zeros(3, 4, dtype=F64), bias.far))
    with pytest.raises(ValueError, match=r"rpe_bias.band"):
        favor_rpe_attention(q, k, v, projection, WindowedBias(torch.zeros(2, 5, dtype=F64), bias.far))
    with pytest.raises(ValueError, match=r"rpe_bias.band"):  # w = 0
        favor_rpe_attention(q, k, v, projection, WindowedBias(torch.zeros(3, 0, dtype=F64), bias.far))
    with pytest.raises(ValueError, match=r"rpe_bias.far must be \[heads=3, 2\]"):
        favor_rpe_attention(q, k, v, projection, WindowedBias(bias.band, torch.zeros(3, dtype=F64)))
    with pytest.raises(ValueError, match="toeplitz='fft' applies to a full"):
        favor_rpe_attention(q, k, v, projection, bias, toeplitz="fft")
    with pytest.raises(ValueError, match="block_size"):
        favor_rpe_attention(q, k, v, projection, bias, block_size=0)
    with pytest.raises(ValueError, match=r"rpe_bias must be \[heads, 2L - 1\] = \(3, 15\)"):
        favor_rpe_attention(q, k, v, projection, torch.zeros(3, 7, dtype=F64))
    with pytest.raises(ValueError, match=r"rpe_bias.band"):
        favor_rpe_causal_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], projection,
                              WindowedBias(torch.zeros(3, 4, dtype=F64), bias.far))
