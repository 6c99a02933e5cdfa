"""The bidirectional exact band's Function (`ops.favor.window_bidirectional`): its hand-written backward
against finite differences, its folded window products against their plain definitions, and its scale
handling where attention is sharp. Outputs and gradients against the dense reference run in
test_all_ops.py (exact_window cases)."""
from __future__ import annotations

import pytest
import torch

from protein_performer import ops
from protein_performer.ops.favor import window_bidirectional as wb

from .common import F64, generator, padding, random_projection, random_qkv


@pytest.mark.parametrize("masked, oprf", [(False, False), (True, False), (True, True)],
                         ids=["plain", "padding", "padding-oprf"])
def test_hand_written_backward_matches_finite_differences(masked: bool, oprf: bool) -> None:
    """gradcheck of the Function itself: 2 rows of 3 blocks, padding inside a block and a whole padded
    block, FAVOR++'s A per row."""
    R, T, D, m = 2, 3, 4, 6
    L = 3 * T
    q, k, v = (torch.randn(R, L, D, generator=generator(seed), dtype=F64) for seed in (1, 2, 3))
    valid = None
    if masked:
        valid = torch.ones(R, L, dtype=torch.bool)
        valid[0, -2:] = False
        valid[1, :T] = False
        q, k, v = (x * valid[..., None] for x in (q, k, v))
    projection = random_projection(m, D)
    a = torch.tensor([-0.2, -0.05], dtype=F64) if oprf else None
    inputs = tuple(x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: wb._BidirectionalBand.apply(q, k, v, projection, valid, a, T),
                                    inputs, eps=1e-6, atol=1e-7)


def test_folded_product_is_the_adjoint_of_the_neighbour_windows() -> None:
    """_fold_product(W, X) = the adjoint of _neighbour_windows applied to W^T X (what autograd's unfold
    backward gives), for several rows whose end windows are masked as the Function masks them."""
    R, n, T, F = 3, 4, 2, 5
    weights = torch.rand(R * n, T, 3 * T, generator=generator(5), dtype=F64)
    weights.view(R, n, T, 3, T)[:, 0, :, 0] = 0  # a row's end windows read other rows' keys: masked
    weights.view(R, n, T, 3, T)[:, -1, :, 2] = 0
    y = torch.randn(R * n, T, F, generator=generator(6), dtype=F64)
    x = torch.zeros(R, n * T, F, dtype=F64, requires_grad=True)
    windows = wb._neighbour_windows(x, T).transpose(-1, -2)  # (R n, 3 T, F)
    (windows * (weights.transpose(-1, -2) @ y)).sum().backward()
    torch.testing.assert_close(wb._fold_product(weights, y, T).view(R, n * T, F), x.grad)


@pytest.mark.parametrize("scale", [4.0, 12.0])
def test_sharp_attention_stays_finite_and_exact(scale: float) -> None:
    """Large q, k (band logits far above the far half's scale, and the reverse in other rows): every
    factor is kept <= 1, so float32 gives the float64 reference's outputs and finite gradients."""
    q, k, v = random_qkv(2, 2, 40, 8, seed=7, scale=scale)
    projection = random_projection(16, 8)
    mask = padding(40, [40, 29])
    want = ops.implied_window_attention(q, k, projection, 8, key_padding_mask=mask) @ v
    q32, k32, v32 = (x.float().requires_grad_() for x in (q, k, v))
    out = ops.favor_window_attention(q32, k32, v32, projection.float(), 8, key_padding_mask=mask)
    out.square().sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=2e-4, atol=2e-5)
    assert all(torch.isfinite(x.grad).all() for x in (q32, k32, v32))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_half_precision_inputs_get_outputs_in_their_dtype(causal: bool) -> None:
    """bf16 q, k, v are computed in float32 and the output comes back in v's dtype, close to the reference."""
    q, k, v = random_qkv(1, 2, 50, 8, seed=8)
    projection = random_projection(16, 8)
    want = ops.implied_window_attention(q, k, projection, 8, causal=causal) @ v
    out = ops.favor_window_attention(*(x.bfloat16() for x in (q, k, v)), projection.float(), 8, causal=causal)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("batch", [1, 2])
def test_transposed_inputs_as_a_model_passes_them(batch: int) -> None:
    """q, k, v as views of [batch, length, heads, dim] (how attention layers split heads) give the contiguous
    inputs' outputs and gradients. With one batch element (or one per row chunk) the rows are a strided
    view, not a copy."""
    q, k, v = random_qkv(batch, 3, 24, 4, seed=11)
    projection = random_projection(8, 4)
    grad = torch.randn(batch, 3, 24, 4, generator=generator(12), dtype=F64)
    results = []
    for layout in ("contiguous", "transposed"):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        if layout == "transposed":
            leaves = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
            inputs = leaves
            args = [x.transpose(1, 2) for x in leaves]
            assert not args[0].is_contiguous()
        else:
            args = inputs
        out = ops.favor_window_attention(*args, projection, 8)
        out.backward(grad)
        grads = [x.grad.transpose(1, 2) if layout == "transposed" else x.grad for x in inputs]
        results.append([out.detach(), *grads])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
