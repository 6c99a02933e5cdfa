"""FAVOR+'s variance-reduced variants and the exact local band (issue 21): FAVOR++ (OPRF) features,
simplex coupling, exact_window. The shared op invariants (reference, causality, padding) run on their
cases in test_all_ops.py; here the properties of each variant."""
from __future__ import annotations

import math

import pytest
import torch

from protein_performer import ops

from .common import F64, generator, padding, random_projection, random_qkv


def _log_second_moment(a: torch.Tensor, u: float, d: int) -> torch.Tensor:
    """Pair mean of log E[(phi(x) phi(y))^2] up to terms free of A, for the pair mean u of |x + y|^2."""
    return d * torch.log(1 - 4 * a) - d / 2 * torch.log(1 - 8 * a) + 2 * (1 - 4 * a) * u / (1 - 8 * a)


@pytest.mark.parametrize("d", [8, 32, 64])
@pytest.mark.parametrize("u", [0.3, 2.0, 8.0, 40.0])
def test_oprf_coefficient_minimises_the_second_moment(d: int, u: float) -> None:
    """The closed form A* against a grid search of the variance objective (A < 1/8)."""
    grid = torch.linspace(-2.0, 0.124, 400_001, dtype=F64)  # A* >= -1.4 for these (u, d)
    best = grid[_log_second_moment(grid, u, d).argmin()]
    closed = ops.oprf_coefficient(torch.tensor(u, dtype=F64), d)
    assert closed <= 0
    assert abs(float(closed - best)) < 2e-5


def test_oprf_with_a_zero_is_favor_plus() -> None:
    q, k, v = random_qkv(2, 2, 13, 6, seed=0)
    projection = random_projection(8, 6)
    zero = torch.zeros(2, 2, dtype=F64)
    assert ops.oprf_coefficient(torch.zeros(3, dtype=F64), 6).eq(0).all()
    for is_query in (True, False):
        assert torch.equal(ops.softmax_kernel_features(q, projection, is_query=is_query, oprf_a=zero),
                           ops.softmax_kernel_features(q, projection, is_query=is_query))
    for causal in (False, True):
        torch.testing.assert_close(ops.favor_attention(q, k, v, projection, causal=causal, oprf_a=zero),
                                   ops.favor_attention(q, k, v, projection, causal=causal), rtol=1e-13, atol=1e-14)


def test_oprf_statistic_ignores_padding_and_is_the_pair_mean() -> None:
    q, k, _ = random_qkv(2, 2, 9, 4, seed=1)
    mask = padding(9, [9, 5])
    junk_q, junk_k = q.clone(), k.clone()
    junk_q[1, :, 5:], junk_k[1, :, 5:] = float("nan"), 1e6
    u = ops.oprf_statistic(junk_q, junk_k, mask)
    scale = 4**-0.25
    for b, n in ((0, 9), (1, 5)):
        pairs = (q[b, :, :n, None] + k[b, :, None, :n]) * scale  # (H, n, n, D)
        torch.testing.assert_close(u[b], pairs.square().sum(-1).mean(dim=(-2, -1)))


def _estimates(x, y, coupling: str, oprf: bool, draws: int) -> torch.Tensor:
    """phi(x) . phi(y) (unstabilised, the estimator itself) with m = d features, for `draws` independent
    projections: the blocks of one [draws * d, d] matrix are independent draws."""
    d = x.shape[-1]
    u = ((x + y) * d**-0.25).square().sum()
    a = ops.oprf_coefficient(u, d).reshape(1) if oprf else None
    w = ops.gaussian_orthogonal_random_matrix(draws * d, d, coupling=coupling, generator=generator(7), dtype=F64)
    fx = ops.softmax_kernel_features(x.view(1, 1, 1, d), w, is_query=True, stabilize=False, oprf_a=a)
    fy = ops.softmax_kernel_features(y.view(1, 1, 1, d), w, is_query=False, stabilize=False, oprf_a=a)
    return (fx * fy).view(draws, d).sum(dim=1) * draws  # each feature was divided by sqrt(draws * d), not sqrt(d)


@pytest.mark.parametrize("coupling", ["orthogonal", "simplex"])
@pytest.mark.parametrize("oprf", [False, True], ids=["positive", "oprf"])
def test_features_estimate_the_softmax_kernel_without_bias(coupling: str, oprf: bool) -> None:
    """Monte Carlo: the mean of N independent estimates lies within 5 standard errors (from the sample
    variance) of exp(x.y / sqrt(d)); a biased estimator (say, a dropped D or A |w|^2 term) fails it."""
    d, draws = 8, 20000
    g = generator(3)
    x, y = torch.randn(d, generator=g, dtype=F64) * 0.7, torch.randn(d, generator=g, dtype=F64) * 0.7
    estimates = _estimates(x, y, coupling, oprf, draws)
    exact = math.exp(float(x @ y) / math.sqrt(d))
    standard_error = float(estimates.std()) / math.sqrt(draws)
    assert abs(float(estimates.mean()) - exact) < 5 * standard_error
    assert standard_error < 0.1 * exact  # the test has power: the tolerance is tight


def test_oprf_and_simplex_lower_the_variance() -> None:
    """FAVOR++ beats FAVOR+ where FAVOR+ is noisiest (an aligned pair, |x + y| large); simplex coupling beats
    orthogonal blocks on a moderate pair (there the positive features' heavy tail does not swamp a
    sample variance). Same count of draws, same generator."""
    d = 8
    g = generator(5)
    x = torch.randn(d, generator=g, dtype=F64)
    y = x + 0.3 * torch.randn(d, generator=g, dtype=F64)
    assert _estimates(x, y, "orthogonal", True, 5000).var() < 0.7 * _estimates(x, y, "orthogonal", False, 5000).var()
    x, y = torch.randn(d, generator=g, dtype=F64) * 0.5, torch.randn(d, generator=g, dtype=F64) * 0.5
    assert _estimates(x, y, "simplex", False, 20000).var() < 0.8 * _estimates(x, y, "orthogonal", False, 20000).var()


def test_simplex_blocks_are_regular_simplices_with_chi_norms() -> None:
    d = 6
    w = ops.gaussian_orthogonal_random_matrix(2 * d + 3, d, coupling="simplex", generator=generator(0), dtype=F64)
    assert w.shape == (2 * d + 3, d)
    for block in (w[:d], w[d : 2 * d]):
        unit = block / block.norm(dim=1, keepdim=True)
        cosines = unit @ unit.T
        off_diagonal = cosines[~torch.eye(d, dtype=torch.bool)]
        torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, -1 / (d - 1)))
    assert w.norm(dim=1).std() > 0  # chi-distributed norms, not a fixed length
    with pytest.raises(ValueError, match="coupling"):
        ops.gaussian_orthogonal_random_matrix(4, d, coupling="hexagonal")


# ----------------------------------------------------------------------------------------------------
# the exact local band
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_a_window_covering_the_sequence_is_exact_softmax(causal: bool) -> None:
    q, k, v = random_qkv(2, 2, 19, 6, seed=2, scale=1.5)
    mask = padding(19, [19, 12])
    projection = random_projection(8, 6)
    got = ops.favor_window_attention(q, k, v, projection, 10, causal=causal, key_padding_mask=mask)
    want = ops.softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(masked_rows(got, mask), masked_rows(want, mask), rtol=1e-10, atol=1e-12)


def masked_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(mask[:, None, :, None], 0.0)


def test_the_band_is_exact_and_the_rest_is_the_favor_estimate() -> None:
    """The implied matrix, unnormalised back by its row sums, is exp(q.k / sqrt(d)) on the neighbour
    blocks of w and the FAVOR+ kernel estimate off them (checked as ratios to the exact weights)."""
    q, k, _ = random_qkv(1, 1, 12, 4, seed=4)
    projection = random_projection(16, 4)
    window = 3
    matrix = ops.implied_window_attention(q, k, projection, window)[0, 0]
    exact = torch.exp(q[0, 0] @ k[0, 0].T / 2.0)
    favor = (ops.softmax_kernel_features(q, projection, is_query=True, stabilize=False)
             @ ops.softmax_kernel_features(k, projection, is_query=False, stabilize=False).transpose(-1, -2))[0, 0]
    i = torch.arange(12)
    band = (i[:, None] // window - i[None, :] // window).abs() <= 1
    assert band[(i[:, None] - i[None, :]).abs() < window].all() and not band.all()
    want = torch.where(band, exact, favor)
    torch.testing.assert_close(matrix, want / want.sum(dim=-1, keepdim=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("oprf", [False, True], ids=["positive", "oprf"])
def test_window_decode_step_equals_the_parallel_forward(window: int, oprf: bool) -> None:
    q, k, v = random_qkv(2, 2, 15, 6, seed=6, scale=1.3)
    projection = random_projection(8, 6)
    a = torch.tensor([-0.1, -0.03], dtype=F64) if oprf else None
    parallel = ops.favor_window_attention(q, k, v, projection, window, causal=True, oprf_a=a)
    state = None
    for t in range(15):
        out, state = ops.favor_window_causal_step(q[:, :, t], k[:, :, t], v[:, :, t], projection, window, state,
                                                  oprf_a=a)
        torch.testing.assert_close(out, parallel[:, :, t], rtol=1e-10, atol=1e-12)
        raw = t + 1 if t < window else window + t % window + 1  # blocks b - 1 and b (to t) stay raw
        assert state.keys.shape[2] == raw


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("oprf", [None, "heads", "batch_heads"])
def test_window_rows_in_chunks_equal_one_call(monkeypatch: pytest.MonkeyPatch, causal: bool, oprf: str | None) -> None:
    """Long inputs run in chunks of (batch, head) rows (fresh tensors under the mmap threshold): with a
    chunk budget small enough for one row per call, outputs and gradients equal the single call."""
    from protein_performer.ops.favor import window as window_module
    from protein_performer.ops.favor import rows as rows_module

    q, k, v = (x.requires_grad_() for x in random_qkv(2, 3, 11, 4, seed=9, scale=1.2))
    mask = padding(11, [11, 7])
    projection = random_projection(8, 4)
    a = {None: None, "heads": torch.tensor([-0.1, -0.02, -0.05], dtype=F64),
         "batch_heads": torch.tensor([[-0.1, -0.02, -0.05], [-0.03, -0.08, 0.0]], dtype=F64)}[oprf]
    grad = torch.randn(2, 3, 11, 4, generator=generator(10), dtype=F64)

    def run() -> list[torch.Tensor]:
        for x in (q, k, v):
            x.grad = None
        out = ops.favor_window_attention(q, k, v, projection, 3, causal=causal, key_padding_mask=mask, oprf_a=a)
        out.backward(grad)
        return [out.detach(), q.grad, k.grad, v.grad]

    assert window_module._rows_per_chunk(11, 4, 8, 3, F64) >= 6  # the default: one call
    whole = run()
    monkeypatch.setattr(rows_module, "CHUNK_BYTES", 1)
    assert window_module._rows_per_chunk(11, 4, 8, 3, F64) == 1
    for got, want in zip(run(), whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel, oprf", [("softmax", None), ("softmax", "heads"), ("softmax", "batch_heads"),
                                          ("relu", None)])
def test_favor_rows_in_chunks_equal_one_call(monkeypatch: pytest.MonkeyPatch, causal: bool, kernel: str,
                                             oprf: str | None) -> None:
    """favor_attention runs long inputs in chunks of (batch, head) rows too: one row per call (a chunk budget
    of 1 byte) gives the single call's outputs and gradients, padding, FAVOR++'s per-row A and a causal
    length that is no multiple of the chunk size included."""
    from protein_performer.ops.favor import attention as attention_module
    from protein_performer.ops.favor import rows as rows_module

    q, k, v = (x.requires_grad_() for x in random_qkv(2, 3, 11, 4, seed=19, scale=1.2))
    mask = padding(11, [11, 7])
    projection = random_projection(8, 4)
    a = {None: None, "heads": torch.tensor([-0.1, -0.02, -0.05], dtype=F64),
         "batch_heads": torch.tensor([[-0.1, -0.02, -0.05], [-0.03, -0.08, 0.0]], dtype=F64)}[oprf]
    grad = torch.randn(2, 3, 11, 4, generator=generator(20), dtype=F64)
    calls = []
    one_chunk = attention_module._favor_rows

    def counted(q, *rest):
        calls.append(q.shape[:2])
        return one_chunk(q, *rest)

    monkeypatch.setattr(attention_module, "_favor_rows", counted)

    def run() -> list[torch.Tensor]:
        for x in (q, k, v):
            x.grad = None
        out = ops.favor_attention(q, k, v, projection, causal=causal, kernel=kernel, key_padding_mask=mask,
                                  chunk_size=4, oprf_a=a)
        out.backward(grad)
        return [out.detach(), q.grad, k.grad, v.grad]

    whole = run()
    assert calls == [(2, 3)]  # the default budget: one call
    monkeypatch.setattr(rows_module, "CHUNK_BYTES", 1)
    calls.clear()
    for got, want in zip(run(), whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert calls == [(1, 1)] * 6  # one (batch, head) row per call


def test_only_cpu_rows_are_chunked() -> None:
    """The chunking saves glibc's page faults; on another device (here "meta") the rows go in one call."""
    from protein_performer.ops.favor.rows import map_row_chunks

    calls = []

    def record(q, k, v, mask, a):
        calls.append((q.device.type, tuple(q.shape[:2])))
        return v

    for device in ("cpu", "meta"):
        q = torch.zeros(2, 3, 5, 4, device=device)
        out = map_row_chunks(record, 1, q, q, q, None, None)
        assert out.shape == q.shape and out.device.type == device
    assert calls == [("cpu", (1, 1))] * 6 + [("meta", (2, 3))]


def test_oprf_decode_step_equals_the_parallel_forward() -> None:
    q, k, v = random_qkv(2, 2, 15, 6, seed=8)
    projection = random_projection(8, 6)
    a = torch.tensor([-0.2, -0.05], dtype=F64)
    parallel = ops.favor_attention(q, k, v, projection, causal=True, oprf_a=a, chunk_size=4)
    state = None
    for t in range(15):
        out, state = ops.favor_causal_step(q[:, :, t], k[:, :, t], v[:, :, t], projection, state, oprf_a=a)
        torch.testing.assert_close(out, parallel[:, :, t], rtol=1e-10, atol=1e-12)


def test_bad_arguments_are_refused() -> None:
    q, k, v = random_qkv(1, 2, 5, 4)
    projection = random_projection(8, 4)
    with pytest.raises(ValueError, match="window"):
        ops.favor_window_attention(q, k, v, projection, 0)
    with pytest.raises(ValueError, match="oprf_a"):
        ops.favor_attention(q, k, v, projection, kernel="relu", oprf_a=torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="oprf_a"):
        ops.favor_attention(q, k, v, projection, oprf_a=torch.zeros(3, dtype=F64))
