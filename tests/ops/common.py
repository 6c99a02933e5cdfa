"""What the ops tests share: seeded inputs, padding masks, and OPS, one case per fast path with its reference.

Each OpCase calls a fast path and its O(L^2) reference with the same contract, (q, k, v, causal,
key_padding_mask) -> [batch, heads, length, value_dim], with whatever else the op needs (a projection,
a bias, a block size) drawn once from a fixed seed. `test_all_ops.py` holds every case to the
invariants of DESIGN.md; adding an op (or an attention kind) means adding its case here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from protein_performer import ops

F64 = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_qkv(batch: int, heads: int, length: int, dim: int, *, seed: int = 0, dtype: torch.dtype = F64,
               scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [batch, heads, length, dim] ~ N(0, scale^2), from one seeded generator."""
    g = generator(seed)
    return tuple(torch.randn(batch, heads, length, dim, generator=g, dtype=dtype) * scale for _ in range(3))


def random_projection(nb_features: int, dim: int, *, seed: int = 1, dtype: torch.dtype = F64,
                      orthogonal: bool = True, coupling: str = "orthogonal") -> Tensor:
    return ops.gaussian_orthogonal_random_matrix(nb_features, dim, orthogonal=orthogonal, coupling=coupling,
                                                 generator=generator(seed), dtype=dtype)


def padding(length: int, valid: list[int]) -> Tensor:
    """Right padding, bool [len(valid), length]: sequence b has valid[b] real positions (True at padding)."""
    return torch.arange(length)[None, :] >= torch.tensor(valid)[:, None]


# --------------------------------------------------------------------------------------------------
# every fast path beside its reference
# --------------------------------------------------------------------------------------------------

HEADS, DIM, FEATURES, WINDOW = 2, 6, 8, 5
Attention = Callable[[Tensor, Tensor, Tensor, bool, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class OpCase:
    """One fast path and its reference; `kind` is the attention kind (config.ATTENTION) it serves."""

    name: str
    kind: str
    fast: Attention
    reference: Attention
    exactly_causal: bool = True  # False: causal in exact arithmetic only (an FFT mixes every position's rounding)


_projection = random_projection(FEATURES, DIM, seed=11)
_windowed = ops.WindowedBias(torch.randn(HEADS, 2 * WINDOW - 1, generator=generator(12), dtype=F64),
                             torch.randn(HEADS, 2, generator=generator(13), dtype=F64))
_full_bias = torch.randn(HEADS, 2 * 64 - 1, generator=generator(14), dtype=F64)  # cut to each length


def _favor(kernel: str) -> OpCase:
    return OpCase(
        f"favor-{kernel}", "favor" if kernel == "softmax" else "favor_relu",
        lambda q, k, v, causal, mask: ops.favor_attention(q, k, v, _projection, causal=causal, kernel=kernel,
                                                          key_padding_mask=mask, chunk_size=8),
        lambda q, k, v, causal, mask: ops.implied_attention(q, k, _projection, causal=causal, kernel=kernel,
                                                            key_padding_mask=mask) @ v)


_simplex_projection = random_projection(FEATURES, DIM, seed=11, coupling="simplex")
_fixed_oprf_a = torch.tensor([-0.05, -0.12], dtype=F64)  # causal FAVOR++: A fixed (a running estimate in a model)


def oprf_a_for(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None) -> Tensor:
    """FAVOR++'s A as a model uses it: from the valid tokens of each (batch, head) bidirectionally, fixed
    per head causally (no statistic may see the future)."""
    if causal:
        return _fixed_oprf_a
    return ops.oprf_coefficient(ops.oprf_statistic(q, k, mask), q.shape[-1])


def _favor_variant(name: str, projection: Tensor, oprf: bool) -> OpCase:
    def a(q, k, causal, mask):
        return oprf_a_for(q, k, causal, mask) if oprf else None

    return OpCase(
        f"favor-{name}", "favor",
        lambda q, k, v, causal, mask: ops.favor_attention(q, k, v, projection, causal=causal, key_padding_mask=mask,
                                                          chunk_size=8, oprf_a=a(q, k, causal, mask)),
        lambda q, k, v, causal, mask: ops.implied_attention(q, k, projection, causal=causal, key_padding_mask=mask,
                                                            oprf_a=a(q, k, causal, mask)) @ v)


def _window_variant(name: str, window: int, oprf: bool) -> OpCase:
    def a(q, k, causal, mask):
        return oprf_a_for(q, k, causal, mask) if oprf else None

    return OpCase(
        f"favor-{name}", "favor",
        lambda q, k, v, causal, mask: ops.favor_window_attention(
            q, k, v, _projection, window, causal=causal, key_padding_mask=mask,
            oprf_a=a(q, k, causal, mask)),
        lambda q, k, v, causal, mask: ops.implied_window_attention(
            q, k, _projection, window, causal=causal, key_padding_mask=mask, oprf_a=a(q, k, causal, mask)) @ v)


def _rpe_full(toeplitz: str) -> OpCase:
    def bias(q: Tensor) -> Tensor:
        return ops.slice_rpe_bias(_full_bias, q.shape[2])

    return OpCase(
        f"favor_rpe-{toeplitz}", "favor_rpe",
        lambda q, k, v, causal, mask: ops.favor_rpe_attention(q, k, v, _projection, bias(q), causal=causal,
                                                              key_padding_mask=mask, toeplitz=toeplitz),
        lambda q, k, v, causal, mask: ops.implied_rpe_attention(q, k, _projection, bias(q), causal=causal,
                                                                key_padding_mask=mask) @ v,
        exactly_causal=toeplitz != "fft")


def _combiner(variant: str) -> OpCase:
    return OpCase(
        f"combiner-{variant}", "combiner",
        lambda q, k, v, causal, mask: ops.combiner_attention(q, k, v, causal=causal, block_size=4, variant=variant,
                                                             key_padding_mask=mask),
        lambda q, k, v, causal, mask: ops.combiner_attention_weights(q, k, causal=causal, block_size=4,
                                                                     variant=variant, key_padding_mask=mask) @ v)


OPS = [
    OpCase("softmax", "softmax",
           lambda q, k, v, causal, mask: ops.softmax_attention(q, k, v, causal=causal, key_padding_mask=mask),
           lambda q, k, v, causal, mask: ops.softmax_attention_weights(q, k, causal=causal,
                                                                       key_padding_mask=mask) @ v),
    _favor("softmax"),
    _favor("relu"),
    _favor_variant("oprf", _projection, oprf=True),
    _favor_variant("simplex", _simplex_projection, oprf=False),
    _favor_variant("oprf-simplex", _simplex_projection, oprf=True),
    _window_variant("exact_window", WINDOW, oprf=False),
    _window_variant("exact_window-1", 1, oprf=False),
    _window_variant("exact_window-oprf", WINDOW, oprf=True),
    OpCase("favor_rpe-window", "favor_rpe",
           lambda q, k, v, causal, mask: ops.favor_rpe_attention(q, k, v, _projection, _windowed, causal=causal,
                                                                 key_padding_mask=mask, block_size=4),
           lambda q, k, v, causal, mask: ops.implied_rpe_attention(q, k, _projection, _windowed, causal=causal,
                                                                   key_padding_mask=mask) @ v),
    _rpe_full("fft"),
    _rpe_full("dense"),
    _combiner("fixed"),
    _combiner("axial"),
]
OP_PARAMS = [pytest.param(case, id=case.name) for case in OPS]
MODES = [pytest.param(False, id="bidir"), pytest.param(True, id="causal")]
