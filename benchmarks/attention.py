"""Forward+backward time and peak memory of attention implementations; prints Markdown tables.

    python benchmarks/attention.py                        # L in 1024..16384 (~15 min on 2 cores)
    python benchmarks/attention.py --lengths 1024 2048 --repeats 1   # a quick look
    python benchmarks/attention.py --methods favor sdpa   # a subset (names from METHODS)

Every (method, length) pair runs in a fresh worker process (this script with ``--worker``), so that
no allocator cache, page-fault history or stray thread from one measurement leaks into the next.

Time: wall-clock of ``out = attention(q, k, v); out.backward(grad)`` after a small warm-up call at
L=128 (lazy initialisation, kernel selection). A cell runs again until its runs add up to
``--min-time`` seconds or ``--repeats`` runs were made (at least one), and reports the minimum: short
cells get several runs, a 30-second cell gets one.

Peak memory: the operating system's view. Torch's CPU allocator keeps no statistics, and Python's
tracemalloc does not see tensor storage, so the worker reads its resident set size (RSS) just before
the first measured forward+backward and the kernel's high-water mark ``ru_maxrss`` just after; the
difference is every byte that forward, autograd graph, backward and temporaries made resident at
once. q, k, v exist before the baseline and are not counted; their gradients are allocated during
backward and are. It includes allocator slack, so it is an upper bound on tensor bytes.

Ratios (``x``) are speed-ups: baseline time / method time, measured in the same run. Add a method by
appending a :class:`Method` to ``METHODS`` (its ``build`` gets the :class:`Shape` and returns the
attention callable).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: q, k, v are [batch, heads, length, head_dim]."""

    batch: int
    heads: int
    length: int
    head_dim: int
    nb_features: int


@dataclass(frozen=True)
class Method:
    """A row of the benchmark.

    name: short label (also the ``--methods`` key); causal: which table it belongs to;
    build: Shape -> attention callable (draw random projections etc. here, outside the timing);
    baseline: compared against by every other method of the same table (speed-up columns);
    available: False skips the method (e.g. an optional package is missing);
    max_length: longer sequences are skipped (reported as such) when a method is hopeless there.
    """

    name: str
    causal: bool
    build: Callable[[Shape], Attention]
    baseline: bool = False
    available: Callable[[], bool] = lambda: True
    max_length: int | None = None
    skip_reason: str = ""


def _favor(causal: bool) -> Callable[[Shape], Attention]:
    def build(shape: Shape) -> Attention:
        from protein_performer.ops import favor_attention, gaussian_orthogonal_random_matrix

        projection = gaussian_orthogonal_random_matrix(
            shape.nb_features, shape.head_dim, generator=torch.Generator().manual_seed(0)
        )
        return lambda q, k, v: favor_attention(q, k, v, projection, causal=causal)

    return build


def _favor_variant(causal: bool, oprf: bool, window: int) -> Callable[[Shape], Attention]:
    """FAVOR+ with issue 21's options: FAVOR++ features (A from the batch's statistic bidirectionally, a
    fixed per-head A causally, as a model's running estimate) and/or an exact band of ``window`` (0 = off)."""

    def build(shape: Shape) -> Attention:
        from protein_performer.ops import (
            favor_attention,
            favor_window_attention,
            gaussian_orthogonal_random_matrix,
            oprf_coefficient,
            oprf_statistic,
        )

        projection = gaussian_orthogonal_random_matrix(
            shape.nb_features, shape.head_dim, generator=torch.Generator().manual_seed(0)
        )
        fixed_a = oprf_coefficient(torch.full((shape.heads,), 4.0), shape.head_dim)

        def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            a = None
            if oprf:
                a = fixed_a if causal else oprf_coefficient(oprf_statistic(q, k), shape.head_dim)
            if window:
                return favor_window_attention(q, k, v, projection, window, causal=causal, oprf_a=a)
            return favor_attention(q, k, v, projection, causal=causal, oprf_a=a)

        return attention

    return build


def _sdpa(causal: bool) -> Callable[[Shape], Attention]:
    def build(shape: Shape) -> Attention:
        from protein_performer.ops import softmax_attention

        return lambda q, k, v: softmax_attention(q, k, v, causal=causal)

    return build


def _favor_rpe(causal: bool, window: int | None) -> Callable[[Shape], Attention]:
    """favor_rpe with a windowed bias (window w: band [heads, 2w - 1] + far [heads, 2]) or, for
    ``window=None``, the full bias over every offset (FFT/dense, ``toeplitz="auto"``)."""

    def build(shape: Shape) -> Attention:
        from protein_performer.ops import WindowedBias, favor_rpe_attention, gaussian_orthogonal_random_matrix

        g = torch.Generator().manual_seed(0)
        projection = gaussian_orthogonal_random_matrix(shape.nb_features, shape.head_dim, generator=g)
        # A learned bias in a model: it takes a gradient too.
        if window is None:
            bias = torch.randn(shape.heads, 2 * shape.length - 1, generator=g).requires_grad_()
        else:
            bias = WindowedBias(torch.randn(shape.heads, 2 * window - 1, generator=g).requires_grad_(),
                                torch.randn(shape.heads, 2, generator=g).requires_grad_())
        return lambda q, k, v: favor_rpe_attention(q, k, v, projection, bias, causal=causal)

    return build


def _combiner(causal: bool, variant: str) -> Callable[[Shape], Attention]:
    def build(shape: Shape) -> Attention:
        from protein_performer.ops import combiner_attention

        return lambda q, k, v: combiner_attention(q, k, v, causal=causal, variant=variant)

    return build


def _performer_pytorch_available() -> bool:
    try:
        import performer_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _performer_pytorch(causal: bool) -> Callable[[Shape], Attention]:
    def build(shape: Shape) -> Attention:
        from performer_pytorch import FastAttention

        torch.manual_seed(0)
        return FastAttention(dim_heads=shape.head_dim, nb_features=shape.nb_features, causal=causal)

    return build


METHODS: list[Method] = [
    Method("sdpa", causal=False, build=_sdpa(False), baseline=True),
    Method(
        "performer-pytorch",
        causal=False,
        build=_performer_pytorch(False),
        baseline=True,
        available=_performer_pytorch_available,
    ),
    Method("favor", causal=False, build=_favor(False), baseline=True),
    Method("sdpa", causal=True, build=_sdpa(True), baseline=True),
    Method(
        "performer-pytorch",
        causal=True,
        build=_performer_pytorch(True),
        baseline=True,
        available=_performer_pytorch_available,
        max_length=8192,
        skip_reason="not run: its CPU path keeps [L, m, d]-sized tensors for backward (~5 GB measured at 8192)",
    ),
    Method("favor", causal=True, build=_favor(True), baseline=True),
]
# Kernelized attention with relative positions: the windowed bias (w = 128, the default; issue 11) and
# the full bias over every offset (issue 6, FFT/dense); Combiner (block size ceil(sqrt(L))).
_RPE_SKIP = "not run: O(L^2 (m + d)) dense or O(L log L m d) FFT work, ~minutes per fwd+bwd at 16384 on 2 cores"
METHODS += [
    Method("favor_rpe", causal=False, build=_favor_rpe(False, 128)),
    Method("favor_rpe-full", causal=False, build=_favor_rpe(False, None), max_length=8192, skip_reason=_RPE_SKIP),
    Method("combiner", causal=False, build=_combiner(False, "fixed")),
    Method("combiner-axial", causal=False, build=_combiner(False, "axial")),
    Method("favor_rpe", causal=True, build=_favor_rpe(True, 128)),
    Method("favor_rpe-full", causal=True, build=_favor_rpe(True, None), max_length=8192, skip_reason=_RPE_SKIP),
    Method("combiner", causal=True, build=_combiner(True, "fixed")),
    Method("combiner-axial", causal=True, build=_combiner(True, "axial")),
]


# Issue 21: FAVOR++ features and the exact local band (w = 64), each mode.
METHODS += [
    Method(name, causal=causal, build=_favor_variant(causal, oprf, window))
    for causal in (False, True)
    for name, oprf, window in (("favor-oprf", True, 0), ("favor-window64", False, 64),
                               ("favor-oprf-window64", True, 64))
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(shape: Shape, seed: int = 0) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """(q, k, v) requiring grad, and the output gradient; all [batch, heads, length, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    dims = (shape.batch, shape.heads, shape.length, shape.head_dim)
    q, k, v = (torch.randn(dims, generator=g).requires_grad_() for _ in range(3))
    return (q, k, v), torch.randn(dims, generator=g)


def _worker(method: Method, shape: Shape, repeats: int, min_time: float) -> dict[str, float]:
    """Measure one (method, shape) in this process; returns seconds and peak MiB."""
    warm = Shape(shape.batch, shape.heads, 128, shape.head_dim, shape.nb_features)
    (q, k, v), grad = _inputs(warm)
    method.build(warm)(q, k, v).backward(grad)

    attention = method.build(shape)
    (q, k, v), grad = _inputs(shape)
    times = []
    baseline = _rss_bytes()
    while not times or (len(times) < repeats and sum(times) < min_time):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        attention(q, k, v).backward(grad)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"seconds": min(times), "peak_mib": peak / 2**20, "runs": len(times)}


def _measure(method: Method, shape: Shape, repeats: int, min_time: float) -> dict[str, float] | None:
    """Run one measurement in a fresh process; None if the worker failed (reported on stderr)."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        method.name,
        "--causal" if method.causal else "--bidirectional",
        "--lengths",
        str(shape.length),
        "--heads",
        str(shape.heads),
        "--head-dim",
        str(shape.head_dim),
        "--nb-features",
        str(shape.nb_features),
        "--batch",
        str(shape.batch),
        "--repeats",
        str(repeats),
        "--min-time",
        str(min_time),
        "--threads",
        str(torch.get_num_threads()),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"[{method.name} L={shape.length}] worker failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(methods: list[Method], lengths: list[int], results: dict[tuple[str, int], dict | str]) -> str:
    """One row per (L, method): seconds, peak MiB, and speed-up against every baseline of the table."""
    baselines = [m for m in methods if m.baseline]
    header = ["L", "method", "fwd+bwd s", "peak MiB"] + [f"vs {b.name}" for b in baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for length in lengths:
        for m in methods:
            r = results.get((m.name, length))
            if not isinstance(r, dict):
                cells = [str(length), m.name, r or "n/a", ""] + [""] * len(baselines)
                lines.append("| " + " | ".join(cells) + " |")
                continue
            cells = [str(length), m.name, f"{r['seconds']:.3f}", f"{r['peak_mib']:.0f}"]
            for b in baselines:
                rb = results.get((b.name, length))
                cells.append("" if b is m or not isinstance(rb, dict) else f"{rb['seconds'] / r['seconds']:.1f}x")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _memory_growth(methods: list[Method], lengths: list[int], results: dict) -> list[str]:
    """Peak memory ratio per doubling of L between the two longest measured lengths (2.0 = linear)."""
    notes = []
    for m in methods:
        measured = [(n, results[(m.name, n)]) for n in lengths if isinstance(results.get((m.name, n)), dict)]
        if len(measured) >= 2:
            (n0, r0), (n1, r1) = measured[-2], measured[-1]
            per_doubling = (r1["peak_mib"] / max(r0["peak_mib"], 1e-9)) ** (1 / math.log2(n1 / n0))
            notes.append(f"{m.name}: peak memory x{per_doubling:.2f} per doubling of L ({n0} -> {n1})")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--methods", nargs="+", default=None, help="names from METHODS (default: all available)")
    parser.add_argument("--repeats", type=int, default=5, help="at most this many timed runs per cell (min reported)")
    parser.add_argument("--min-time", type=float, default=3.0, help="stop repeating once a cell's runs sum to this")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--nb-features", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: torch's choice); 1 steadies ratios on a shared machine")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--causal", action="store_true", help=argparse.SUPPRESS)
    direction.add_argument("--bidirectional", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    def shape(length: int) -> Shape:
        return Shape(args.batch, args.heads, length, args.head_dim, args.nb_features)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        method = next(m for m in METHODS if m.name == args.worker and m.causal == args.causal)
        print(json.dumps(_worker(method, shape(args.lengths[0]), args.repeats, args.min_time)))
        return

    unknown = set(args.methods or []) - {m.name for m in METHODS}
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {sorted({m.name for m in METHODS})}")
    selected = [m for m in METHODS if (args.methods is None or m.name in args.methods)]
    missing = [m.name for m in selected if not m.available()]
    selected = [m for m in selected if m.available()]
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    print(
        f"Machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}\n"
        f"Forward+backward, fp32, batch {args.batch}, {args.heads} heads, head dim {args.head_dim}, "
        f"{args.nb_features} features; min of 1-{args.repeats} runs (until {args.min_time:g} s per cell); "
        "peak = RSS high-water mark minus RSS before.\n"
        "Speed-up columns (vs ...): baseline seconds / method seconds, measured in the same run."
    )
    if missing:
        print(f"Not installed, skipped: {sorted(set(missing))} (pip install performer-pytorch==1.1.4)")
    for causal in (False, True):
        methods = [m for m in selected if m.causal == causal]
        if not methods:
            continue
        results: dict[tuple[str, int], dict | str] = {}
        for length in args.lengths:
            for m in methods:
                if m.max_length is not None and length > m.max_length:
                    results[(m.name, length)] = "skipped"
                    continue
                print(
                    f"  {'causal' if causal else 'bidirectional'} {m.name} L={length} ...", file=sys.stderr, flush=True
                )
                results[(m.name, length)] = _measure(m, shape(length), args.repeats, args.min_time) or "failed"
        print(f"\n### {'Causal' if causal else 'Bidirectional'}\n")
        print(_table(methods, args.lengths, results))
        for note in _memory_growth(methods, args.lengths, results):
            print(f"- {note}")
        for m in methods:
            if m.max_length is not None and max(args.lengths) > m.max_length:
                print(f"- {m.name} above L={m.max_length}: {m.skip_reason or 'skipped'}")


if __name__ == "__main__":
    main()
