"""FAVOR+ against its O(L^2) references: exactness (float64, gradients), approximation of softmax
attention, causality (stabiliser included), padding, numerical safety."""

from __future__ import annotations

import math

import pytest
import torch

from protein_performer.ops import (
    FavorState,
    favor_attention,
    favor_causal_step,
    gaussian_orthogonal_random_matrix,
    implied_attention,
    relu_kernel_features,
    softmax_attention,
    softmax_kernel_features,
)
from protein_performer.ops import stabilise
from protein_performer.ops.favor import favor_attention_reference
from protein_performer.ops.stabilise import decayed_scan

from .common import F64, generator, padding, random_projection, random_qkv


def _paper_features(x, projection, kernel: str):
    """The paper's feature maps written out, no stabiliser: x' = x d^-1/4;
    softmax: exp(W x' - |x'|^2 / 2) / sqrt(m); relu: ReLU(W x') + 1e-3."""
    x = x * x.shape[-1] ** -0.25
    if kernel == "relu":
        return torch.relu(x @ projection.T) + 1e-3
    return torch.exp(x @ projection.T - 0.5 * (x * x).sum(dim=-1, keepdim=True)) / math.sqrt(projection.shape[0])


def _paper_formula(q, k, v, projection, *, causal: bool, kernel: str, key_padding_mask=None):
    """Direct transcription of the paper: D^-1 (phi(Q) phi(K)^T [masked]) V."""
    phi_q, phi_k = _paper_features(q, projection, kernel), _paper_features(k, projection, kernel)
    scores = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        scores = scores.tril()
    if key_padding_mask is None:
        return scores / scores.sum(dim=-1, keepdim=True) @ v
    scores = scores.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    out = scores / scores.sum(dim=-1, keepdim=True) @ v
    return out.masked_fill(key_padding_mask[:, None, :, None], 0.0)  # padded queries: zero rows


MODES = [
    pytest.param(causal, kernel, id=f"{'causal' if causal else 'bidir'}-{kernel}")
    for causal in (False, True)
    for kernel in ("softmax", "relu")
]
# Lengths and chunk sizes: a partial last chunk; 100 whole chunks (four groups of the chunk-state
# scan, the last one partial); a chunk size longer than the sequence (one chunk).
SHAPES = [
    pytest.param(37, 8, id="L37-chunk8"),
    pytest.param(200, 2, id="L200-chunk2"),
    pytest.param(21, 128, id="L21-chunk128"),
]


# --------------------------------------------------------------------------------------------------
# projections and features
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nb_features,dim", [(64, 16), (100, 16), (8, 16)], ids=["4blocks", "partial-block", "under-one-block"]
)
def test_orthogonal_projection_blocks_are_orthogonal(nb_features, dim):
    w = gaussian_orthogonal_random_matrix(nb_features, dim, scaling=1, generator=generator(0), dtype=F64)
    assert w.shape == (nb_features, dim)
    torch.testing.assert_close(w.norm(dim=1), torch.full((nb_features,), math.sqrt(dim), dtype=F64))
    for start in range(0, nb_features, dim):
        block = w[start : start + dim] / math.sqrt(dim)
        torch.testing.assert_close(block @ block.T, torch.eye(len(block), dtype=F64))


def test_projection_is_reproducible_and_iid_rows_are_not_orthogonal():
    a = gaussian_orthogonal_random_matrix(32, 16, generator=generator(3))
    b = gaussian_orthogonal_random_matrix(32, 16, generator=generator(3))
    c = gaussian_orthogonal_random_matrix(32, 16, generator=generator(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.get_default_dtype()
    iid = gaussian_orthogonal_random_matrix(16, 16, orthogonal=False, generator=generator(3), dtype=F64)
    gram = iid @ iid.T
    assert (gram - torch.diag(gram.diagonal())).abs().max() > 1.0


def test_chi_scaled_rows_have_gaussian_norms():
    # scaling=0: row norms ~ chi(dim), so E|w|^2 = dim.
    w = gaussian_orthogonal_random_matrix(512, 16, generator=generator(0), dtype=F64)
    assert abs(w.pow(2).sum(dim=1).mean().item() - 16) < 1.0  # 4 standard errors
    assert w.norm(dim=1).std() > 0.5


def test_feature_maps_follow_the_paper():
    x, _, _ = random_qkv(1, 2, 9, 8, seed=21)
    w = random_projection(16, 8)
    torch.testing.assert_close(
        softmax_kernel_features(x, w, is_query=False, stabilize=False), _paper_features(x, w, "softmax")
    )
    torch.testing.assert_close(relu_kernel_features(x, w), _paper_features(x, w, "relu"))


def test_stabilised_features_are_scaled_unbiased_features():
    q, k, _ = random_qkv(2, 2, 9, 8)
    w = random_projection(16, 8)
    exact_q = softmax_kernel_features(q, w, is_query=True, stabilize=False)
    exact_k = softmax_kernel_features(k, w, is_query=False, stabilize=False)
    stable_q = softmax_kernel_features(q, w, is_query=True)
    stable_k = softmax_kernel_features(k, w, is_query=False)
    # queries: one constant per row; keys: one constant per (batch, head).
    ratio_q = exact_q / stable_q
    ratio_k = exact_k / stable_k
    torch.testing.assert_close(ratio_q, ratio_q[..., :1].expand_as(ratio_q))
    torch.testing.assert_close(ratio_k, ratio_k[..., :1, :1].expand_as(ratio_k))
    assert stable_q.amax(dim=-1).eq(1).all() and stable_k.amax(dim=(-2, -1)).eq(1).all()


# --------------------------------------------------------------------------------------------------
# 1. exactness against the O(L^2) references (float64)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,chunk_size", SHAPES)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("causal,kernel", MODES)
def test_favor_equals_its_references_with_gradients(causal, kernel, padded, length, chunk_size):
    # fast path == dense implied matrix @ v == the paper's unstabilised formula == plain autograd loop
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 3, length, 16))
    w = random_projection(32, 16)
    mask = padding(length, [length, length - 5]) if padded else None
    kwargs = dict(causal=causal, kernel=kernel, key_padding_mask=mask)
    out = favor_attention(q, k, v, w, chunk_size=chunk_size, **kwargs)
    implied = implied_attention(q, k, w, **kwargs)
    references = {
        "implied": implied @ v,
        "paper": _paper_formula(q, k, v, w, **kwargs),
        "plain-autograd": favor_attention_reference(q, k, v, w, chunk_size=chunk_size, **kwargs),
    }
    grad_out = torch.randn(out.shape, generator=generator(9), dtype=F64)
    grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v))
    for ref_name, reference in references.items():
        torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12, msg=lambda m, r=ref_name: f"{r}: {m}")
        ref_grads = torch.autograd.grad((reference * grad_out).sum(), (q, k, v), retain_graph=True)
        for name, a, b in zip("qkv", grads, ref_grads, strict=True):
            torch.testing.assert_close(
                a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name, r=ref_name: f"{r} grad {n}: {m}"
            )
    if causal:
        assert implied.triu(diagonal=1).eq(0).all()
    valid = torch.ones(2, length, dtype=torch.bool) if mask is None else ~mask
    rows = implied.detach().sum(dim=-1)
    torch.testing.assert_close(rows, valid[:, None, :].to(F64).expand_as(rows))


@pytest.mark.parametrize("group", [4, stabilise.SCAN_GROUP], ids=lambda g: f"group{g}")
@pytest.mark.parametrize("reverse", [False, True], ids=["prefix", "suffix"])
@pytest.mark.parametrize("n", [1, 32, 75], ids=lambda n: f"n{n}")
def test_chunk_state_scan_equals_a_loop(n, reverse, group, monkeypatch):
    # The two-level decayed scan of the causal path against its definition, offsets jumping around.
    monkeypatch.setattr(stabilise, "SCAN_GROUP", group)
    g = generator(20)
    x = torch.rand(3, n, 5, generator=g, dtype=F64)
    end = torch.cumsum(torch.rand(3, n, generator=g, dtype=F64) * 30, dim=1)  # nondecreasing
    previous = torch.cat([end[:, :1] - 1.0, end[:, :-1]], dim=1)
    source, target = (-previous, -end) if reverse else (end, previous)
    expected = torch.zeros_like(x)
    for c in range(n):
        for c_ in range(c + 1, n) if reverse else range(c):
            expected[:, c] += x[:, c_] * torch.exp(source[:, c_] - target[:, c])[:, None]
    torch.testing.assert_close(decayed_scan(x, source, target, reverse=reverse), expected, rtol=1e-12, atol=1e-300)
    plain = decayed_scan(x, None, None, reverse=reverse)
    cumsum = x.flip(1).cumsum(dim=1).flip(1) if reverse else x.cumsum(dim=1)
    torch.testing.assert_close(plain, cumsum - x)


@pytest.mark.parametrize("causal,kernel", MODES)
def test_favor_gradcheck(causal, kernel):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 11, 4, seed=3))
    w = random_projection(8, 4)
    mask = padding(11, [9])

    def fn(q, k, v):
        return favor_attention(q, k, v, w, causal=causal, kernel=kernel, key_padding_mask=mask, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_recurrent_step_equals_parallel_causal(kernel):
    q, k, v = random_qkv(2, 3, 23, 8, seed=4)
    w = random_projection(16, 8)
    state = None
    outputs = []
    for t in range(q.shape[2]):
        out_t, state = favor_causal_step(q[:, :, t], k[:, :, t], v[:, :, t], w, state, kernel=kernel)
        outputs.append(out_t)
    assert isinstance(state, FavorState) and state.kv.shape == (2, 3, 16, 8)
    parallel = favor_attention(q, k, v, w, causal=True, kernel=kernel, chunk_size=8)
    torch.testing.assert_close(torch.stack(outputs, dim=2), parallel, rtol=1e-10, atol=1e-12)


def test_recurrent_step_survives_a_dominant_later_key():
    # A later key far above the running max must rescale, not overflow, the carried state.
    q, k, v = random_qkv(1, 1, 6, 8, seed=5, dtype=torch.float32)
    w = random_projection(16, 8, dtype=torch.float32) * 4
    k[0, 0, 4] = w[w.norm(dim=1).argmax()] * 8**0.25  # x' = w: logit |w|^2 / 2, far above the others
    state, outputs = None, []
    for t in range(6):
        out_t, state = favor_causal_step(q[:, :, t], k[:, :, t], v[:, :, t], w, state)
        outputs.append(out_t)
    torch.testing.assert_close(
        torch.stack(outputs, dim=2), favor_attention(q, k, v, w, causal=True), rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------------------------------
# 2. approximation of softmax attention (the paper's Figure 4 claims)
# --------------------------------------------------------------------------------------------------


def test_error_shrinks_like_inverse_sqrt_features():
    q, k, v = random_qkv(1, 2, 32, 16, seed=6, scale=0.5)
    exact = softmax_attention(q, k, v)
    features = [32, 128, 512, 2048]
    rmse = []
    for m in features:
        mse = [(favor_attention(q, k, v, random_projection(m, 16, seed=100 + s)) - exact).pow(2).mean() for s in range(8)]
        rmse.append(torch.stack(mse).mean().sqrt().item())
    slope = (math.log(rmse[-1]) - math.log(rmse[0])) / (math.log(features[-1]) - math.log(features[0]))
    assert all(a > b for a, b in zip(rmse[:-1], rmse[1:], strict=True)), rmse
    assert -0.75 < slope < -0.35, (slope, rmse)


def _kernel_mse(x, y, nb_features: int, *, features: str, orthogonal: bool, draws: int) -> float:
    """Mean squared error of the kernel estimate phi(x).phi(y) of exp(x.y / sqrt(d)), over random
    draws of the projection and over the pairs (x, y) [pairs, d]."""
    dim = x.shape[-1]
    exact = torch.exp((x * y).sum(dim=-1) / math.sqrt(dim))
    # All draws stacked into one projection [draws * m, d]: one call, then split per draw. The
    # 1/sqrt(rows) normalisation then counts draws * m rows, hence the factor `draws` below.
    w = torch.cat([random_projection(nb_features, dim, seed=seed, orthogonal=orthogonal) for seed in range(draws)])
    if features == "positive":
        phi_x = softmax_kernel_features(x[None, None], w, is_query=True, stabilize=False)[0, 0]
        phi_y = softmax_kernel_features(y[None, None], w, is_query=False, stabilize=False)[0, 0]
        products = phi_x * phi_y  # (pairs, draws * m)
    else:
        products = (_trigonometric_features(x, w) * _trigonometric_features(y, w)).sum(dim=0)  # sin.sin + cos.cos
    estimates = products.view(len(x), draws, nb_features).sum(dim=-1) * draws  # (pairs, draws)
    return (estimates - exact[:, None]).pow(2).mean().item()


def _trigonometric_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """The classic random Fourier features of the softmax kernel (the paper's baseline):
    exp(|x'|^2 / 2) [sin(W x'), cos(W x')] / sqrt(m), x' = x d^-1/4; [2, ..., m] (sin, cos)."""
    x = x * x.shape[-1] ** -0.25
    projected = x @ projection.T
    scale = torch.exp(0.5 * (x * x).sum(dim=-1, keepdim=True)) / math.sqrt(projection.shape[0])
    return scale * torch.stack([projected.sin(), projected.cos()])  # [2, ..., m]


def _pairs(count: int, dim: int, norm: float, *, seed: int):
    g = generator(seed)
    x, y = torch.randn(2, count, dim, generator=g, dtype=F64)
    return x / x.norm(dim=-1, keepdim=True) * norm, y / y.norm(dim=-1, keepdim=True) * norm


def test_orthogonal_features_beat_iid_features():
    # Moderate norms: at larger ones the heavy tail of exp() makes the MSE itself too noisy to rank
    # with a few hundred draws (the measured ratio here is ~0.8 across pair seeds).
    x, y = _pairs(200, 16, 1.5, seed=7)
    orthogonal = _kernel_mse(x, y, 16, features="positive", orthogonal=True, draws=400)
    iid = _kernel_mse(x, y, 16, features="positive", orthogonal=False, draws=400)
    assert orthogonal < 0.9 * iid, (orthogonal, iid)


def test_positive_features_beat_trigonometric_where_kernel_is_small():
    x, noise = _pairs(300, 16, 2.0, seed=8)
    y = -x + 0.3 * noise  # nearly opposite: kernel values exp(x.y / 4) ~ e^-1 and below
    assert torch.exp((x * y).sum(dim=-1) / 4).max() < 0.6
    positive = _kernel_mse(x, y, 64, features="positive", orthogonal=True, draws=100)
    trigonometric = _kernel_mse(x, y, 64, features="trigonometric", orthogonal=True, draws=100)
    assert positive < 0.1 * trigonometric, (positive, trigonometric)


# --------------------------------------------------------------------------------------------------
# 3. causality, stabiliser included
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("position", [0, 13, 15, 16, 30], ids=lambda p: f"i{p}")
def test_causal_output_ignores_future(kernel, position):
    q, k, v = random_qkv(1, 2, 40, 16, seed=9, dtype=torch.float32)
    w = random_projection(32, 16, dtype=torch.float32)
    before = favor_attention(q, k, v, w, causal=True, kernel=kernel, chunk_size=16)
    g = generator(10)
    future = slice(position + 1, None)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, future] = torch.randn(t[:, :, future].shape, generator=g) * 5
    after = favor_attention(q2, k2, v2, w, causal=True, kernel=kernel, chunk_size=16)
    torch.testing.assert_close(after[:, :, : position + 1], before[:, :, : position + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, :, position + 1 :], before[:, :, position + 1 :])


def test_causal_stabiliser_ignores_a_dominant_future_key():
    # A future key whose feature logits sit ~hundreds above the rest would underflow every earlier
    # key to zero under a max taken over the sequence or over the chunk; the running max must not.
    q, k, v = random_qkv(1, 1, 24, 16, seed=11, dtype=torch.float32)
    w = random_projection(32, 16, dtype=torch.float32) * 4
    before = favor_attention(q, k, v, w, causal=True, chunk_size=16)
    k2 = k.clone()
    k2[0, 0, 10] = w[w.norm(dim=1).argmax()] * 16**0.25  # x' = w: logit |w|^2 / 2 (~ several hundred)
    after = favor_attention(q, k2, v, w, causal=True, chunk_size=16)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after[:, :, :10], before[:, :, :10], rtol=0, atol=1e-6)
    implied = implied_attention(q, k2, w, causal=True)
    torch.testing.assert_close(
        implied[:, :, :10], implied_attention(q, k, w, causal=True)[:, :, :10], rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_causal_gradients_do_not_flow_from_past_outputs_to_future_inputs(kernel):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 30, 8, seed=12))
    w = random_projection(16, 8)
    out = favor_attention(q, k, v, w, causal=True, kernel=kernel, chunk_size=8)
    grads = torch.autograd.grad(out[:, :, :12].sum(), (q, k, v))
    for name, grad in zip("qkv", grads, strict=True):
        assert grad[:, :, 12:].eq(0).all(), name
        assert grad[:, :, :12].abs().sum() > 0, name


# --------------------------------------------------------------------------------------------------
# 4. padding is invisible
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("junk", [1e3, float("inf"), float("nan")], ids=["large", "inf", "nan"])
@pytest.mark.parametrize("causal,kernel", MODES)
def test_padding_is_invisible_whatever_the_junk(causal, kernel, junk):
    short, long = 19, 33
    q, k, v = random_qkv(2, 2, long, 16, seed=13, dtype=torch.float32)
    w = random_projection(32, 16, dtype=torch.float32)
    alone = favor_attention(
        q[:1, :, :short], k[:1, :, :short], v[:1, :, :short], w, causal=causal, kernel=kernel, chunk_size=8
    )
    for t in (q, k, v):
        t[0, :, short:] = junk
    mask = padding(long, [short, long])
    padded = favor_attention(q, k, v, w, causal=causal, kernel=kernel, key_padding_mask=mask, chunk_size=8)
    torch.testing.assert_close(padded[:1, :, :short], alone, rtol=0, atol=1e-5)
    assert torch.isfinite(padded[1]).all()


@pytest.mark.parametrize("causal,kernel", MODES)
def test_padded_positions_get_zero_gradients_and_real_ones_stay_finite(causal, kernel):
    q, k, v = random_qkv(2, 2, 21, 8, seed=18, dtype=torch.float32)
    for t in (q, k, v):
        t[0, :, 15:] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    w = random_projection(16, 8, dtype=torch.float32)
    mask = padding(21, [15, 21])
    out = favor_attention(q, k, v, w, causal=causal, kernel=kernel, key_padding_mask=mask, chunk_size=8)
    assert out[0, :, 15:].eq(0).all()
    for name, grad in zip("qkv", torch.autograd.grad(out.sum(), (q, k, v)), strict=True):
        assert torch.isfinite(grad).all(), name
        assert grad[0, :, 15:].eq(0).all(), name


def test_trainable_projection_gets_the_reference_gradient():
    q, k, v = random_qkv(1, 2, 13, 8, seed=19)
    w = random_projection(16, 8).requires_grad_()
    for causal in (False, True):
        out = favor_attention(q, k, v, w, causal=causal, chunk_size=4)
        (grad,) = torch.autograd.grad(out.square().sum(), w)
        (expected,) = torch.autograd.grad((implied_attention(q, k, w, causal=causal) @ v).square().sum(), w)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-11)


def test_padding_reaches_the_denominator_not_only_the_values():
    # Masking only v (the reference JAX code, performer-pytorch) leaves padded keys in the denominator.
    q, k, v = random_qkv(1, 1, 12, 8, seed=14)
    w = random_projection(16, 8)
    mask = padding(12, [7])
    masked = favor_attention(q, k, v, w, key_padding_mask=mask)
    v_only = favor_attention(q, k, v.masked_fill(mask[:, None, :, None], 0.0), w)
    assert not torch.allclose(masked, v_only)
    alone = favor_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], w)
    torch.testing.assert_close(masked[:, :, :7], alone)


# --------------------------------------------------------------------------------------------------
# 5. numerical safety
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_no_nan_or_inf_for_large_norms_at_8192(causal, autocast):
    q, k, v = random_qkv(1, 1, 8192, 64, seed=15, dtype=torch.float32)
    q, k = q * 10, k * 10
    w = random_projection(256, 64, dtype=torch.float32)
    if autocast:
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = favor_attention(q, k, v, w, causal=causal)
    assert out.dtype == v.dtype
    assert torch.isfinite(out).all()
    assert out.abs().amax(dim=-1).gt(0).float().mean() > 0.99  # a real output, not zeroed rows


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("causal,kernel", MODES)
def test_backward_under_autocast_gives_the_float32_gradients(causal, kernel, padded):
    """A user's own loop may call backward inside the autocast region: the hand-written backward must
    still run in float32 (autocast would turn its matmuls into bf16 and break the in-place updates).
    The ReLU kernel's features are differentiated by autograd, whose built-in backward follows autocast
    as PyTorch defines it: those gradients agree to bf16 accuracy."""
    q, k, v = (t.float().requires_grad_() for t in random_qkv(2, 2, 37, 8, seed=16))
    w = random_projection(16, 8, dtype=torch.float32)
    mask = padding(37, [37, 30]) if padded else None
    grad = torch.randn(2, 2, 37, 8, generator=generator(17))

    def gradients(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = favor_attention(q, k, v, w, causal=causal, kernel=kernel, key_padding_mask=mask, chunk_size=8)
            return torch.autograd.grad(out, (q, k, v), grad)

    for inside, outside in zip(gradients(True), gradients(False), strict=True):
        assert inside.dtype == torch.float32
        if kernel == "softmax":
            torch.testing.assert_close(inside, outside)
        else:
            torch.testing.assert_close(inside, outside, rtol=0, atol=2e-2 * float(outside.abs().max()))


def test_features_are_float32_under_autocast():
    x = torch.randn(1, 1, 5, 8).bfloat16()
    w = random_projection(16, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert softmax_kernel_features(x, w, is_query=True).dtype == torch.float32
        assert relu_kernel_features(x, w).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"q": torch.zeros(2, 5, 8)}, "batch, heads, length, dim"),
        ({"projection": torch.zeros(16, 7)}, "nb_features, head_dim=8"),
        ({"kernel": "cosine"}, "kernel must be"),
        ({"key_padding_mask": torch.zeros(1, 5)}, "key_padding_mask must be bool"),
    ],
    ids=["3d-query", "projection-dim", "kernel", "mask-dtype"],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = {
        "q": torch.zeros(1, 2, 5, 8),
        "k": torch.zeros(1, 2, 5, 8),
        "v": torch.zeros(1, 2, 5, 8),
        "projection": torch.zeros(16, 8),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        favor_attention(**args)
