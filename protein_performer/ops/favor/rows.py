"""Long inputs in chunks of (batch, head) rows, so that each chunk's fresh tensors come from the heap.

Fresh tensors above glibc's mmap threshold (at most 32 MiB) are mapped and unmapped on every call: their
page faults cost about as much as the pass that fills them (measured: a fresh 68 MB result 34 ms, the
same subtraction into an existing one 5 ms). FAVOR+'s features ([L, m] per row) and the exact band's
weights ([L, 3 w] per row) are such tensors at L = 8192. Called on chunks of rows whose largest tensor
stays under CHUNK_BYTES, the same work runs 1.2-1.5x faster (docs/benchmarks.md). Every (batch, head)
row is independent in these ops (their stabilisers are per row), so chunking changes no result. Only CPU
tensors are chunked: CUDA's caching allocator reuses its blocks, and one call keeps its kernels large.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["CHUNK_BYTES", "rows_per_chunk", "map_row_chunks"]

CHUNK_BYTES = 8 << 20  # largest per-chunk tensor, in bytes


def rows_per_chunk(elements_per_row: int, dtype: torch.dtype) -> int:
    """(batch, head) rows per call so that a chunk's largest tensor, `elements_per_row` per row, stays
    within CHUNK_BYTES (at least 1)."""
    return max(1, CHUNK_BYTES // (elements_per_row * torch.finfo(dtype).bits // 8))


RowFunction = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None"], Tensor]


def map_row_chunks(function: RowFunction, rows: int, q: Tensor, k: Tensor, v: Tensor,
                   key_padding_mask: Tensor | None, oprf_a: Tensor | None) -> Tensor:
    """function(q, k, v, key_padding_mask, oprf_a) on chunks of at most `rows` (batch, head) rows, joined.

    One call when all rows fit or the tensors are not on the CPU; otherwise one batch element at a time, `min(rows, heads)` heads per call,
    with each chunk's slices of the padding mask ([batch, length]) and of FAVOR++'s A ([heads] or
    [batch, heads]). Chunks are cut with `split`, not slices: a slice's backward zero-fills a full-size
    gradient per chunk; split's concatenates once.
    """
    B, H = v.shape[:2]
    if rows >= B * H or q.device.type != "cpu":  # the page faults are glibc's: a GPU's caching allocator
        return function(q, k, v, key_padding_mask, oprf_a)  # has none, and many small calls would only cost launches
    step = min(rows, H)

    def a_of(b: int, h: int) -> Tensor | None:
        if oprf_a is None:
            return None
        return oprf_a[h:h + step] if oprf_a.dim() == 1 else oprf_a[b:b + 1, h:h + step]

    chunks = [[x.split(step, dim=1) for x in (qb, kb, vb)] for qb, kb, vb in zip(*(x.split(1) for x in (q, k, v)))]
    return torch.cat([
        torch.cat([
            function(qc, kc, vc, None if key_padding_mask is None else key_padding_mask[b:b + 1], a_of(b, c * step))
            for c, (qc, kc, vc) in enumerate(zip(*chunks[b]))], dim=1)
        for b in range(B)], dim=0)
