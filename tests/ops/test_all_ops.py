"""Every fast attention path (tests/ops/common.py: OPS) against DESIGN.md's invariants: it equals its
O(L^2) reference in float64, gradients included; causal means causal; padding is invisible; every
attention kind of the registry has a case. Family-specific properties live in the test_<family> files."""
from __future__ import annotations

import pytest
import torch

from protein_performer.config import ATTENTION

from .common import DIM, F64, HEADS, MODES, OP_PARAMS, OPS, OpCase, generator, padding, random_qkv

LENGTH = 23  # not a multiple of any block, chunk or window size of the cases


def test_every_attention_kind_has_an_op_case() -> None:
    assert set(ATTENTION) <= {case.kind for case in OPS}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("case", OP_PARAMS)
def test_fast_path_equals_its_reference_with_gradients(case: OpCase, causal: bool, padded: bool) -> None:
    q, k, v = random_qkv(2, HEADS, LENGTH, DIM, seed=1)
    mask = padding(LENGTH, [LENGTH, LENGTH - 6]) if padded else None
    cotangent = torch.randn(v.shape, generator=generator(2), dtype=F64)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, causal, mask)
        return out.detach(), torch.autograd.grad((out * cotangent).sum(), leaves)

    fast, fast_grads = run(case.fast)
    reference, reference_grads = run(case.reference)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
    for name, got, want in zip("qkv", fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("case", OP_PARAMS)
def test_causal_output_and_gradients_ignore_the_future(case: OpCase) -> None:
    """Louder future queries, keys and values change no past output and no gradient of a loss on the past
    (bit for bit where the path is exactly causal; to rounding for the FFT path)."""
    t = 9
    q, k, v = random_qkv(2, HEADS, LENGTH, DIM, seed=3)
    loud = [x.clone() for x in (q, k, v)]
    for x in loud:
        x[:, :, t + 1:] = torch.randn(x[:, :, t + 1:].shape, generator=generator(4), dtype=F64) * 3

    def past(*qkv):
        leaves = [x.clone().requires_grad_() for x in qkv]
        out = case.fast(*leaves, True, None)
        grads = torch.autograd.grad(out[:, :, : t + 1].square().sum(), leaves)
        return out.detach(), [g[:, :, : t + 1] for g in grads], grads

    before, before_grads, all_grads = past(q, k, v)
    after, after_grads, _ = past(*loud)
    tolerance = {} if case.exactly_causal else {"rtol": 1e-9, "atol": 1e-11}
    if case.exactly_causal:
        assert torch.equal(after[:, :, : t + 1], before[:, :, : t + 1])
        for name, got, want in zip("qkv", after_grads, before_grads, strict=True):
            assert torch.equal(got, want), f"grad {name}"
    else:
        torch.testing.assert_close(after[:, :, : t + 1], before[:, :, : t + 1], **tolerance)
    for name, grad in zip("qkv", all_grads, strict=True):  # the past's loss reaches no future input
        assert grad[:, :, t + 1:].abs().max() <= (0 if case.exactly_causal else 1e-9), f"grad {name}"
    assert (after[:, :, t + 1:] - before[:, :, t + 1:]).abs().max() > 1e-3  # the future did change


@pytest.mark.parametrize("junk_value", [1e4, float("inf"), float("nan")], ids=["large", "inf", "nan"])
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("case", OP_PARAMS)
def test_padding_is_invisible(case: OpCase, causal: bool, junk_value: float) -> None:
    """Junk at padded positions (large, infinite or NaN) changes nothing; a padded sequence's real outputs
    equal those of the sequence alone; padded inputs get zero (finite) gradients from the real outputs."""
    short = 15
    q, k, v = random_qkv(2, HEADS, LENGTH, DIM, seed=5)
    mask = padding(LENGTH, [LENGTH, short])
    junk = [x.clone() for x in (q, k, v)]
    for x in junk:
        x[1, :, short:] = junk_value
    junk = [x.requires_grad_() for x in junk]
    clean = case.fast(q, k, v, causal, mask)
    dirty = case.fast(*junk, causal, mask)
    assert torch.equal(dirty[0], clean[0]) and torch.equal(dirty[1, :, :short], clean[1, :, :short])
    alone = case.fast(*(x[1:, :, :short] for x in (q, k, v)), causal, None)
    torch.testing.assert_close(clean[1:, :, :short], alone, rtol=1e-10, atol=1e-12)
    for name, grad in zip("qkv", torch.autograd.grad(dirty[:, :, :short].sum(), junk), strict=True):
        assert torch.isfinite(grad).all(), f"grad {name}"
        assert grad[1, :, short:].abs().max() == 0, f"grad {name}"
