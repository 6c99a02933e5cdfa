"""Homolog windows: padding waste of three ways to lay out clusters, and loading speed, measured in one run.

    python benchmarks/homolog_windows.py [--lengths 1024 4096 8192] [--batches 200]

Data: the bundled Swiss-Prot subset (18,070 proteins) with its MMseqs2 clusters at 50% identity
(data/swissprot_subset.clusters50.tsv.gz), training split, epoch 0. Every cluster gives one segment,
<cls> m1 <eos> m2 <eos> ... cut at the window length (sampling by cluster). Layouts:
- one cluster per window (the baseline): each segment padded to the window length;
- next fit: segments packed one after another, a new window when the next does not fit;
- first fit over 16 open windows (what data.sampling=homologs does).
Waste is the share of window tokens that are padding; "tokens/window" is the real tokens a window
carries, as a ratio to the baseline's. Then loading: batches of homolog windows and of the concat
sampler's windows (the same split, same window length) from the token store on one core, tokens/s.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from protein_performer.data import BatchSpec, SplitSpec, build_token_store
from protein_performer.data.dataset import ProteinBatches
from protein_performer.data.sampling import pack_segments

REPO = Path(__file__).resolve().parent.parent
FASTA = REPO / "data" / "swissprot_subset.fasta.gz"
CLUSTERS = REPO / "data" / "swissprot_subset.clusters50.tsv.gz"


def waste(lengths: np.ndarray, window: np.ndarray, max_length: int) -> tuple[float, float]:
    """(padding share of all window tokens, real tokens per window) for a layout."""
    windows = int(window.max()) + 1
    return 1.0 - lengths.sum() / (windows * max_length), lengths.sum() / windows


def layouts(store: Path, max_length: int, min_members: int) -> list[tuple[str, float, float]]:
    data = ProteinBatches(store, "train", BatchSpec(sampling="homologs", max_length=max_length,
                                                    min_cluster_members=min_members), train=True)
    order, _ = data.homolog_layout(0)
    lengths = data.segment_lengths[np.sort(order)]  # any fixed order: the permutation of epoch 0
    lengths = lengths[np.random.default_rng(0).permutation(len(lengths))]
    rows = [("one cluster per window", np.arange(len(lengths))),
            ("next fit", pack_segments(lengths, max_length, open_windows=1)),
            ("first fit, 16 open windows (homologs)", pack_segments(lengths, max_length))]
    return [(name, *waste(lengths, window, max_length)) for name, window in rows]


def loading(store: Path, max_length: int, batches: int) -> list[tuple[str, float]]:
    result = []
    for sampling in ("concat", "homologs"):
        data = ProteinBatches(store, "train", BatchSpec(sampling=sampling, max_length=max_length, batch_size=2),
                              train=True)
        started = time.perf_counter()
        tokens = 0
        for number, batch in enumerate(data):
            tokens += int(batch["input_ids"].numel())
            if number + 1 == batches:
                break
        result.append((sampling, tokens / (time.perf_counter() - started)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--batches", type=int, default=200, help="batches timed per sampler")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "subset.h5"
        build_token_store(FASTA, store, split=SplitSpec(valid_fraction=0.02, test_fraction=0.02,
                                                        clusters=str(CLUSTERS)), progress=False)
        print("| window | clusters | layout | padding | real tokens / window | vs one cluster per window |")
        print("|---:|---|---|---:|---:|---:|")
        for max_length in args.lengths:
            for min_members, label in ((1, "all"), (2, ">= 2 members")):
                rows = layouts(store, max_length, min_members)
                baseline = rows[0][2]
                for name, padding, per_window in rows:
                    print(f"| {max_length} | {label} | {name} | {padding:.1%} | {per_window:,.0f} | "
                          f"{per_window / baseline:.2f}x |")
        print("\n| window | sampler | tokens/s (one core, no workers) | vs concat |")
        print("|---:|---|---:|---:|")
        for max_length in args.lengths:
            rows = loading(store, max_length, args.batches)
            for name, rate in rows:
                print(f"| {max_length} | {name} | {rate:,.0f} | {rate / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
