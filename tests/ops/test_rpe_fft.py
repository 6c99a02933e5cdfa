"""FAVOR+ with relative positions against its dense O(L^2) reference, for both Toeplitz algorithms
(FFT and blocked dense): exactness and gradients in float64, b = 0 is plain FAVOR+, float32 accuracy
with wide biases, causality, padding, chunking, the algorithm choice, the bias-slicing helper."""
from __future__ import annotations

import pytest
import torch

from protein_performer.ops import (
    favor_attention,
    favor_rpe_attention,
    gaussian_orthogonal_random_matrix,
    implied_rpe_attention,
    slice_rpe_bias,
)
from protein_performer.ops.rpe import dense, fft

from .common import F64, generator, padding


def _inputs(batch=2, heads=3, length=37, dim=8, nb_features=16, *, seed=0, dtype=F64, bias_scale=1.0):
    g = generator(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g, dtype=dtype) for _ in range(3))
    projection = gaussian_orthogonal_random_matrix(nb_features, dim, generator=g, dtype=dtype)
    bias = torch.randn(heads, 2 * length - 1, generator=g, dtype=dtype) * bias_scale
    return q, k, v, projection, bias


def _row_relative_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """max over each output row of |out - ref|, relative to that row's largest |ref|."""
    return ((out - ref).abs().amax(dim=-1) / ref.abs().amax(dim=-1).clamp_min(1e-300)).amax()


MODES = [pytest.param(False, id="bidir"), pytest.param(True, id="causal")]
TOEPLITZ = ["fft", "dense"]
PADDING = [pytest.param(None, id="nopad"), pytest.param([37, 26], id="pad")]


@pytest.mark.parametrize("valid", PADDING)
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("toeplitz", TOEPLITZ)
def test_output_equals_dense_reference_float64(toeplitz, causal, valid):
    q, k, v, projection, bias = _inputs()
    mask = None if valid is None else padding(37, valid)
    out = favor_rpe_attention(q, k, v, projection, bias, causal=causal, key_padding_mask=mask, toeplitz=toeplitz)
    weights = implied_rpe_attention(q, k, projection, bias, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, weights @ v, rtol=1e-10, atol=1e-10)
    rows = torch.ones_like(weights[..., 0]) if mask is None else (~mask[:, None, :]).to(F64).expand_as(weights[..., 0])
    torch.testing.assert_close(weights.sum(dim=-1), rows, rtol=0, atol=1e-12)  # padded queries: zero rows
    if causal:
        assert weights.triu(diagonal=1).abs().max() == 0
    if mask is not None:
        assert weights.masked_select(mask[:, None, None, :]).abs().max() == 0


@pytest.mark.parametrize("length", [1, 2, 5], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("toeplitz", TOEPLITZ)
def test_tiny_lengths_match_reference(toeplitz, causal, length):
    q, k, v, projection, bias = _inputs(length=length)
    out = favor_rpe_attention(q, k, v, projection, bias, causal=causal, toeplitz=toeplitz)
    torch.testing.assert_close(out, implied_rpe_attention(q, k, projection, bias, causal=causal) @ v)


@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("toeplitz", TOEPLITZ)
def test_bias_reaches_the_right_offsets(toeplitz, causal):
    """One large bias entry at offset j - i = delta: query i's weight concentrates on key i + delta."""
    length, delta = 12, -3
    q, k, v, projection, bias = _inputs(batch=1, heads=1, length=length, bias_scale=0.0)
    bias[0, delta + length - 1] = 40.0
    weights = implied_rpe_attention(q, k, projection, bias, causal=causal)[0, 0]
    rows = torch.arange(-delta, length)
    assert (weights[rows, rows + delta] > 0.999).all()
    out = favor_rpe_attention(q, k, v, projection, bias, causal=causal, toeplitz=toeplitz)[0, 0]
    torch.testing.assert_close(out[rows], v[0, 0, rows + delta], rtol=0, atol=1e-3)


@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("toeplitz", TOEPLITZ)
def test_gradients_match_dense_reference(toeplitz, causal):
    q, k, v, projection, bias = _inputs(length=29)
    mask = padding(29, [29, 21])
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    cotangent = torch.randn(2, 3, 29, 8, generator=generator(5), dtype=F64)

    def grads(fn):
        qq, kk, vv, bb = (t.detach().clone().requires_grad_() for t in leaves)
        (fn(qq, kk, vv, bb) * cotangent).sum().backward()
        return [t.grad for t in (qq, kk, vv, bb)]

    fast = grads(
        lambda a, b_, c, d: favor_rpe_attention(
            a, b_, c, projection, d, causal=causal, key_padding_mask=mask, toeplitz=toeplitz
        )
    )
    dense = grads(
        lambda a, b_, c, d: implied_rpe_attention(a, b_, projection, d, causal=causal, key_padding_mask=mask) @ c
    )
    for name, got, want in zip("qkvb", fast, dense):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")
    if causal:  # offsets j - i > 0 are never read
        assert fast[3][:, 29:].abs().max() == 0


@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("toeplitz", TOEPLITZ)
def test_gradcheck(toeplitz, causal):
    """Finite differences w.r.t. q, k, v and b (fast mode: random projections of the Jacobian; the
    full Jacobian is covered by the comparison with the dense reference's autograd above)."""
    q, k, v, projection, bias = _inputs(batch=2, heads=2, length=6, dim=3, nb_features=4, seed=3)
    mask = padding(6, [6, 5])
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v, bias))
    assert torch.autograd.gradcheck(
        lambda a, b_, c, d: favor_rpe_attention(
            a, b_, c, projection, d, causal=causal, key_padding_mask=mask, toeplitz=toeplitz
        ),
        inputs,
        fast_mode=True,
    )


@pytest.mark.parametrize("valid", PADDING)
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("toeplitz", TOEPLITZ)
def test_zero_bias_is_plain_favor(toeplitz, causal, valid):
    q, k, v, projection, bias = _inputs()
    mask = None if valid is None else padding(37, valid)
    zero = torch.zeros_like(bias)
    out = favor_rpe_attention(q, k, v, projection, zero, causal=causal, key_padding_mask=mask, toeplitz=toeplitz)
    torch.testing.assert_close(out, favor_attention(q, k, v, projection, causal=causal, key_padding_mask=mask))


def _wide_biases(length: int) -> dict[str, torch.Tensor]:
    offsets = torch.arange(-(length - 1), length, dtype=F64)
    return {
        "uniform": torch.rand(2, 2 * length - 1, generator=generator(7), dtype=F64) * 20 - 10,
        "ramp": torch.stack([offsets, -offsets]) * (10 / length),  # each row sees a different maximum
    }


@pytest.mark.parametrize("shape", ["uniform", "ramp"])
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("toeplitz", TOEPLITZ)
def test_float32_matches_float64_with_wide_bias(toeplitz, causal, shape):
    """b spanning [-10, 10]: early causal rows see a few offsets only, ramp rows see different maxima;
    both put e^20 between the terms of one row and the largest terms of the convolution."""
    length = 300
    q, k, v, projection, _ = _inputs(batch=1, heads=2, length=length, dim=16, nb_features=32, seed=2)
    bias = _wide_biases(length)[shape]
    mask = padding(length, [280])
    ref = implied_rpe_attention(q, k, projection, bias, causal=causal, key_padding_mask=mask) @ v
    out = favor_rpe_attention(
        q.float(), k.float(), v.float(), projection.float(), bias.float(),
        causal=causal, key_padding_mask=mask, toeplitz=toeplitz,
    )
    assert out.dtype == torch.float32
    assert _row_relative_error(out.double(), ref) < 1e-4


@pytest.mark.parametrize("toeplitz", TOEPLITZ)
def test_causal_output_ignores_future(toeplitz):
    q, k, v, projection, bias = _inputs(length=40)
    t = 17
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = generator(11)
    # Louder future keys also move the shared key stabiliser; it must cancel.
    q2[:, :, t + 1 :] = torch.randn(q2[:, :, t + 1 :].shape, generator=g, dtype=F64) * 3
    k2[:, :, t + 1 :] = torch.randn(k2[:, :, t + 1 :].shape, generator=g, dtype=F64) * 3
    v2[:, :, t + 1 :] = v2[:, :, t + 1 :] * 100
    before = favor_rpe_attention(q, k, v, projection, bias, causal=True, toeplitz=toeplitz)
    after = favor_rpe_attention(q2, k2, v2, projection, bias, causal=True, toeplitz=toeplitz)
    torch.testing.assert_close(after[:, :, : t + 1], before[:, :, : t + 1], rtol=1e-8, atol=1e-8)
    assert (after[:, :, t + 1 :] - before[:, :, t + 1 :]).abs().max() > 1e-2  # the future did change


@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("toeplitz", TOEPLITZ)
def test_padding_is_invisible(toeplitz, causal):
    q, k, v, projection, bias = _inputs()
    mask = padding(37, [37, 26])
    junk = [t.clone() for t in (q, k, v)]
    for t in junk:
        t[1, :, 26:] = torch.nan
    clean = favor_rpe_attention(q, k, v, projection, bias, causal=causal, key_padding_mask=mask, toeplitz=toeplitz)
    dirty = favor_rpe_attention(*junk, projection, bias, causal=causal, key_padding_mask=mask, toeplitz=toeplitz)
    assert torch.equal(dirty, clean)
    assert clean[1, :, 26:].abs().max() == 0  # padded queries are dropped, as in favor_attention


@pytest.mark.parametrize("toeplitz", TOEPLITZ)
def test_fully_padded_sequence_gives_zero_rows(toeplitz):
    q, k, v, projection, bias = _inputs()
    out = favor_rpe_attention(q, k, v, projection, bias, key_padding_mask=padding(37, [37, 0]), toeplitz=toeplitz)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0


# FFT: n_fft = 40 and D + 1 = 9 columns make 360 elements per (row, feature); 6 rows, 5 features.
# Dense: 6 rows x 20 keys = 120 elements per query.
CHUNKINGS = [
    pytest.param("fft", 1500, id="fft-rows-4+2-features-1"),
    pytest.param("fft", 4320, id="fft-rows-6-features-2+2+1"),
    pytest.param("dense", 1500, id="dense-queries-12+8"),
    pytest.param("dense", 100, id="dense-queries-1-each"),
]


@pytest.mark.parametrize("toeplitz,chunk_elements", CHUNKINGS)
@pytest.mark.parametrize("causal", MODES)
def test_chunking_changes_nothing(causal, toeplitz, chunk_elements, monkeypatch):
    q, k, v, projection, bias = _inputs(length=20, nb_features=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    whole = favor_rpe_attention(*leaves[:3], projection, leaves[3], causal=causal, toeplitz=toeplitz)
    whole.square().sum().backward()
    expected = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    monkeypatch.setattr(fft if toeplitz == "fft" else dense, "_CHUNK_ELEMENTS", chunk_elements)
    chunked = favor_rpe_attention(*leaves[:3], projection, leaves[3], causal=causal, toeplitz=toeplitz)
    chunked.square().sum().backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for got, want in zip((t.grad for t in leaves), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_slice_rpe_bias_keeps_the_centre_offsets():
    max_length, length = 10, 4
    offsets = torch.arange(-(max_length - 1), max_length, dtype=F64)
    bias = torch.stack([offsets, 2 * offsets])  # entry value = its offset j - i (times head + 1)
    sliced = slice_rpe_bias(bias, length)
    expected = torch.arange(-(length - 1), length, dtype=F64)
    torch.testing.assert_close(sliced, torch.stack([expected, 2 * expected]))
    q, k, v, projection, _ = _inputs(batch=1, heads=2, length=length)
    torch.testing.assert_close(
        favor_rpe_attention(q, k, v, projection, sliced),
        implied_rpe_attention(q, k, projection, torch.stack([expected, 2 * expected])) @ v,
    )


def test_wrongly_sized_bias_is_rejected_with_a_hint():
    q, k, v, projection, _ = _inputs(length=8, heads=3)
    with pytest.raises(ValueError, match="slice_rpe_bias"):
        favor_rpe_attention(q, k, v, projection, torch.zeros(3, 2 * 16 - 1, dtype=F64))
    with pytest.raises(ValueError, match="max_length=4"):
        slice_rpe_bias(torch.zeros(3, 7), 8)


def test_fft_size_is_the_smallest_5_smooth_length():
    def smooth(n: int) -> bool:
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1

    for n in range(1, 600):
        size = fft.fft_size(n)
        assert size >= n and smooth(size)
        assert not any(smooth(c) for c in range(n, size)), n


def test_auto_picks_dense_for_short_and_fft_for_long_sequences():
    assert not fft.use_fft(1024, 256, 65, causal=False)
    assert fft.use_fft(1 << 17, 256, 65, causal=False)
    # causal attention is always dense: the FFT mixes every position's rounding into every output
    assert fft.use_fft(1 << 16, 256, 65, causal=False)
    assert not any(fft.use_fft(1 << e, 256, 65, causal=True) for e in (10, 16, 20))


def test_the_fft_cost_is_per_device_type_and_overridable(monkeypatch):
    """A device type without a step cost never picks the FFT by itself; setting one turns the model on."""
    assert not any(fft.use_fft(1 << e, 256, 65, causal=False, device_type="cuda") for e in (10, 17, 20))
    monkeypatch.setitem(fft.FFT_STEP_COST, "cuda", fft.FFT_STEP_COST["cpu"])
    assert fft.use_fft(1 << 17, 256, 65, causal=False, device_type="cuda")
    monkeypatch.setitem(fft.FFT_STEP_COST, "cpu", 1e9)  # an FFT step as dear as a billion multiply-adds
    assert not fft.use_fft(1 << 17, 256, 65, causal=False)


def test_auto_and_bad_algorithm_names():
    q, k, v, projection, bias = _inputs()
    torch.testing.assert_close(
        favor_rpe_attention(q, k, v, projection, bias),
        favor_rpe_attention(q, k, v, projection, bias, toeplitz="fft"),
    )
    with pytest.raises(ValueError, match="toeplitz"):
        favor_rpe_attention(q, k, v, projection, bias, toeplitz="direct")


def _loud_future(q, k, v, projection, t: int):
    """Copies of q, k, v whose positions > t are replaced: fresh queries, values x100, fresh keys
    of which one has 30x the norm and one sits at the largest logit any key can reach (k' = w_a for
    the projection row of largest norm: logit |w_a|^2 / 2)."""
    g = generator(13)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    future = q2[:, :, t + 1 :].shape
    q2[:, :, t + 1 :] = torch.randn(future, generator=g, dtype=q.dtype)
    k2[:, :, t + 1 :] = torch.randn(future, generator=g, dtype=q.dtype)
    k2[:, :, t + 1] *= 30
    k2[:, :, t + 3] = projection[projection.norm(dim=1).argmax()] * q.shape[-1] ** 0.25
    v2[:, :, t + 1 :] *= 100
    return q2, k2, v2


@pytest.mark.parametrize(
    "chunk_elements",
    # 6 rows x 40 keys: one query block, or blocks of 8 (t = 17 inside the third, keys before it
    # rescaled through the offset at its start)
    [pytest.param(None, id="one-block"), pytest.param(6 * 40 * 8, id="blocks-of-8")],
)
@pytest.mark.parametrize("toeplitz", ["auto", "dense"])
def test_causal_float32_ignores_loud_future_keys(toeplitz, chunk_elements, monkeypatch):
    """Causal means causal, stabilisers included, in float32. Past keys of 6x the usual norm have
    logits 50-150 nats below the future key at the logit maximum: one key max shared by the whole
    sequence underflows their features and moves past outputs by O(1) (at 3x, where nothing
    underflows, its rounding alone moves them by 2.5e-6). Running key offsets make past outputs and
    past gradients independent of the future. "auto" never picks the FFT path for causal attention
    (it mixes every position's rounding into every output), so dense is the path to hold to this."""
    if chunk_elements is not None:
        monkeypatch.setattr(dense, "_CHUNK_ELEMENTS", chunk_elements)  # causal "auto" is dense
    length, t = 40, 17
    q, k, v, projection, bias = _inputs(length=length, dim=32, nb_features=64, seed=4, dtype=torch.float32)
    k = k * 6
    q2, k2, v2 = _loud_future(q, k, v, projection, t)
    mask = padding(length, [length, 36])
    cotangent = torch.randn(q.shape, generator=generator(6))
    cotangent[:, :, t + 1 :] = 0  # a loss on the past outputs only

    def run(*qkv):
        leaves = [x.clone().requires_grad_() for x in qkv]
        out = favor_rpe_attention(*leaves, projection, bias, causal=True, key_padding_mask=mask, toeplitz=toeplitz)
        (out * cotangent).sum().backward()
        return out.detach(), [x.grad[:, :, : t + 1] for x in leaves]

    before, grads_before = run(q, k, v)
    after, grads_after = run(q2, k2, v2)
    assert torch.isfinite(after).all() and (before[:, :, : t + 1].abs().amax(dim=-1) > 1e-3).all()
    torch.testing.assert_close(after[:, :, : t + 1], before[:, :, : t + 1], rtol=1e-6, atol=1e-6)
    for name, got, want in zip("qkv", grads_after, grads_before):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"grad {name}: {m}")
    assert (after[:, :, t + 1 :] - before[:, :, t + 1 :]).abs().max() > 1e-2  # the future did change
