"""How a split becomes examples and batches, as pure numpy functions (the dataset does the I/O).

The Performer paper's two protein settings:
- single: one protein per example, `<cls> residues <eos>`, at most `max_length` tokens. Training
  takes a random crop of a longer protein; evaluation takes the first `max_length - 2` residues
  ("start") or cuts the protein into consecutive windows ("windows") so every residue is scored once.
  Examples are batched by a token budget: sorted by length within a block of records, so a batch
  holds proteins of similar length and little padding.
- concat: the split's proteins joined into one stream, each followed by <eos>, cut into
  non-overlapping windows of `max_length` tokens (the last one padded).
- homologs: windows of whole clusters of homologs (a store built with clusters). Each cluster
  contributes one segment per epoch, `<cls> m1 <eos> m2 <eos> ...`, its members in an order drawn from
  (seed, epoch, cluster), each cropped to max_length - 2 residues, the segment cut at max_length
  tokens; segments are packed whole into windows of max_length (first fit over a few open windows,
  in a cluster order drawn per epoch). One segment per cluster and epoch is sampling by cluster (as ESM
  and PoET do): a 400-member cluster gets one window's worth of members, not 400 proteins' worth.
  Packing small clusters together instead of one cluster per window wastes far less to padding
  (benchmarks/homolog_windows.py, windows of 4096 on the bundled subset: 0.6% of the tokens are
  padding, against 86% with one cluster per window and 14% with plain next fit).

A split is cut into blocks (consecutive records, or consecutive windows), the unit of reading and of
sharding: every (DDP rank, DataLoader worker) pair gets whole blocks, balanced by their batch counts
(`plan_epoch`).
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CROPS",
    "SAMPLINGS",
    "Examples",
    "single_examples",
    "example_token_counts",
    "budget_batches",
    "count_budget_batches",
    "join_with_eos",
    "EpochPlan",
    "plan_epoch",
    "Clusters",
    "segment_lengths",
    "pack_segments",
    "homolog_segment",
]

SAMPLINGS = ("single", "concat", "homologs")
CROPS = ("random", "start", "windows")


@dataclass(frozen=True)
class Examples:
    """Single-protein examples cut from a block's records: residues record[i][start[i]:start[i] + take[i]]."""

    record: np.ndarray  # int64 [E] record index within the block
    start: np.ndarray  # int64 [E] first residue taken
    take: np.ndarray  # int64 [E] residues taken (the example is take + 2 tokens with <cls>, <eos>)

    def __len__(self) -> int:
        return len(self.record)


def single_examples(lengths: np.ndarray, max_length: int, crop: str,
                    rng: np.random.Generator | None = None) -> Examples:
    """Examples of at most `max_length` tokens from records of `lengths` residues (int64 [n]).

    crop="random": one example per record, a uniformly random window of a longer protein (needs rng);
    crop="start": one example per record, its first max_length - 2 residues;
    crop="windows": ceil(length / (max_length - 2)) examples per record, consecutive and disjoint.
    """
    room = max_length - 2
    if room < 1:
        raise ValueError(f"max_length must be >= 3 (<cls>, a residue, <eos>), got {max_length}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if crop == "windows":
        pieces = np.maximum(-(-lengths // room), 1)
        record = np.repeat(np.arange(len(lengths)), pieces)
        first_piece = np.cumsum(pieces) - pieces
        start = (np.arange(len(record)) - np.repeat(first_piece, pieces)) * room
        take = np.minimum(lengths[record] - start, room)
        return Examples(record, start, take)
    take = np.minimum(lengths, room)
    if crop == "start":
        start = np.zeros(len(lengths), dtype=np.int64)
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng")
        start = rng.integers(0, lengths - take + 1)
    else:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    return Examples(np.arange(len(lengths)), start.astype(np.int64), take)


def example_token_counts(lengths: np.ndarray, max_length: int, crop: str) -> np.ndarray:
    """Tokens (<cls> + residues + <eos>) of each example `single_examples` makes; random crops
    change where a window starts, never its length, so no rng is needed."""
    return single_examples(lengths, max_length, "start" if crop == "random" else crop).take + 2


def budget_batches(token_counts: np.ndarray, tokens_per_batch: int, rows: np.ndarray | None = None, *,
                   oversize: str = "raise") -> list[np.ndarray]:
    """Group examples so that a batch padded to its longest example holds <= tokens_per_batch tokens.

    Longest first, ties in input order: a batch starts at the longest remaining example and takes as
    many of the next (shorter or equal) ones as the budget allows, so neighbours have similar lengths
    and the grouping depends on the counts alone. The one token-budget batcher: training batches and
    embedding batches both come from here.

    rows: rows of the batch each example fills (int [n], default 1 each; an embedded protein cut into
        windows fills one row per window, each `token_counts` long).
    oversize: an example over the budget on its own: "raise" (ValueError), or "alone" (a batch of its own).
    Returns index arrays into token_counts.
    """
    counts = np.asarray(token_counts)
    order = np.argsort(-counts, kind="stable")
    ordered_rows = None if rows is None else np.asarray(rows)[order]
    sizes = _batch_sizes(counts[order], tokens_per_batch, ordered_rows, oversize)
    return np.split(order, np.cumsum(sizes)[:-1]) if sizes else []


def count_budget_batches(token_counts: np.ndarray, tokens_per_batch: int) -> int:
    """len(budget_batches(...)) without building the batches."""
    return len(_batch_sizes(np.sort(np.asarray(token_counts))[::-1], tokens_per_batch, None, "raise"))


def _batch_sizes(descending: np.ndarray, tokens_per_batch: int, rows: np.ndarray | None,
                 oversize: str) -> list[int]:
    """Examples per batch, for examples sorted longest first (one step per batch, not per example)."""
    if oversize not in ("raise", "alone"):
        raise ValueError(f"oversize must be 'raise' or 'alone', got {oversize!r}")
    if oversize == "raise" and len(descending):
        padded = descending if rows is None else descending * rows
        if padded.max() > tokens_per_batch:
            raise ValueError(f"an example of {padded.max()} tokens exceeds tokens_per_batch={tokens_per_batch}")
    counts = descending.tolist()
    filled = None if rows is None else np.cumsum(rows)  # rows of examples [0, i] together
    sizes = []
    i = 0
    while i < len(counts):
        room = tokens_per_batch // counts[i]  # rows that fit at this batch's width
        if filled is None:
            size = min(room, len(counts) - i)
        else:
            before = int(filled[i - 1]) if i else 0
            size = int(np.searchsorted(filled, before + room, side="right")) - i
        size = max(size, 1)  # only an oversize example ("alone") fits nothing
        sizes.append(size)
        i += size
    return sizes


def join_with_eos(tokens: np.ndarray, offsets: np.ndarray, eos_idx: int) -> np.ndarray:
    """Records tokens[offsets[i]:offsets[i + 1]] (offsets relative, int64 [n + 1]) each followed by
    <eos>, as one uint8 stream of len(tokens) + n tokens."""
    count = len(offsets) - 1
    stream = np.empty(len(tokens) + count, dtype=np.uint8)
    eos_positions = offsets[1:] + np.arange(count)
    is_residue = np.ones(len(stream), dtype=bool)
    is_residue[eos_positions] = False
    stream[is_residue] = tokens
    stream[eos_positions] = eos_idx
    return stream


@dataclass(frozen=True)
class EpochPlan:
    """Which (rank, worker) shard reads which blocks in one epoch, and how many batches it yields.

    shard_blocks[s]: block indices of shard s = rank * workers + worker, in reading order.
    quota[rank, worker]: batches that shard yields (its blocks may hold more: see plan_epoch).
    """

    shard_blocks: list[np.ndarray]
    quota: np.ndarray  # int64 [world_size, workers]

    def batches_of_rank(self, rank: int) -> int:
        return int(self.quota[rank].sum())


def plan_epoch(block_batches: np.ndarray, order: np.ndarray, world_size: int, workers: int,
               equal_ranks: bool) -> EpochPlan:
    """Deal blocks (in `order`) to world_size * workers shards, each to the shard with fewest batches.

    Every rank and worker computes the same plan from the same inputs, so shards are disjoint and
    together cover every block. Greedy balancing keeps shard loads within one block's batches of
    each other.

    equal_ranks (training): every rank yields exactly as many batches as the poorest rank, because
    under DDP a rank that runs out first would leave the others waiting in a collective forever.
    The few batches cut come from the richest workers and differ from epoch to epoch (the order
    does). Evaluation keeps every batch (equal_ranks=False) and so sees the whole split.
    """
    shards = world_size * workers
    load = np.zeros(shards, dtype=np.int64)
    owner = np.empty(len(order), dtype=np.int64)
    heap = [(0, shard) for shard in range(shards)]
    for position, block in enumerate(order.tolist()):
        current, shard = heapq.heappop(heap)
        owner[position] = shard
        heapq.heappush(heap, (current + int(block_batches[block]), shard))
        load[shard] = current + int(block_batches[block])
    by_shard = np.argsort(owner, kind="stable")  # keeps each shard's blocks in dealing order
    shard_blocks = np.split(order[by_shard], np.cumsum(np.bincount(owner, minlength=shards))[:-1])
    quota = load.reshape(world_size, workers)
    if equal_ranks:
        quota = _cap_ranks(quota, int(quota.sum(axis=1).min()))
    return EpochPlan(shard_blocks, quota)


def _cap_ranks(load: np.ndarray, target: int) -> np.ndarray:
    """Per-worker quotas summing to `target` on every rank, cut one batch at a time from the most
    loaded worker (the excess is at most about one block per worker, so this loop is short)."""
    quota = load.copy()
    for rank in range(len(quota)):
        for _ in range(int(quota[rank].sum()) - target):
            quota[rank, int(np.argmax(quota[rank]))] -= 1
    return quota


@dataclass(frozen=True)
class Clusters:
    """A split's records grouped by cluster: cluster c holds records members[bounds[c]:bounds[c + 1]]
    (in store order), and its key is keys[c] (the store's cluster key; clusters ordered by key)."""

    members: np.ndarray  # int64 [n]
    bounds: np.ndarray  # int64 [C + 1]
    keys: np.ndarray  # int64 [C]

    @classmethod
    def from_keys(cls, record_keys: np.ndarray, min_members: int = 1) -> Clusters:
        """Group records by their cluster keys (int64 [n]); clusters of fewer than min_members records are left out."""
        order = np.argsort(record_keys, kind="stable")
        ordered = record_keys[order]
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]])) if len(order) else order
        bounds = np.append(starts, len(order)).astype(np.int64)
        sizes = np.diff(bounds)
        kept = np.flatnonzero(sizes >= min_members)
        members = order[np.repeat(sizes >= min_members, sizes)]
        return cls(members.astype(np.int64), np.concatenate([[0], np.cumsum(sizes[kept])]).astype(np.int64),
                   ordered[starts[kept]] if len(kept) else ordered[:0])

    def __len__(self) -> int:
        return len(self.keys)

    def of(self, c: int) -> np.ndarray:
        return self.members[self.bounds[c]:self.bounds[c + 1]]


def segment_lengths(clusters: Clusters, lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Tokens of each cluster's segment, int64 [C]: <cls>, then every member (cropped to max_length - 2
    residues) and its <eos>, at most max_length. The length depends on the members, not their order."""
    member_tokens = np.minimum(lengths[clusters.members], max_length - 2) + 1
    totals = np.add.reduceat(member_tokens, clusters.bounds[:-1]) if len(clusters) else member_tokens[:0]
    return np.minimum(totals + 1, max_length).astype(np.int64)


def pack_segments(lengths: np.ndarray, max_length: int, open_windows: int = 16) -> np.ndarray:
    """Window of each segment (token counts, in order), int64 [n]: first fit over the last
    `open_windows` windows. A segment goes to the earliest open window with room for it, else opens a
    new one; opening one more than `open_windows` closes the oldest. Windows are numbered in the order
    they open; each holds at most max_length tokens. open_windows=1 is next fit; 16 cut the padding of
    the bundled subset's windows from 22% to 3.6% at 1024 tokens and from 14% to 0.6% at 4096."""
    window = np.empty(len(lengths), dtype=np.int64)
    rooms: list[int] = []  # room left in the open windows, oldest first
    first_open = 0  # number of the oldest open window
    for i, length in enumerate(lengths.tolist()):
        for j, room in enumerate(rooms):
            if length <= room:
                rooms[j] -= length
                window[i] = first_open + j
                break
        else:
            if len(rooms) == open_windows:
                rooms.pop(0)
                first_open += 1
            rooms.append(max_length - length)
            window[i] = first_open + len(rooms) - 1
    return window


def homolog_segment(members: Iterable[np.ndarray], length: int, cls_idx: int, eos_idx: int, max_length: int,
                    rng: np.random.Generator | None) -> np.ndarray:
    """One cluster's segment, int64 [length]: <cls> m1 <eos> m2 <eos> ... cut at `length` tokens.

    members: residue tokens of the members in segment order (read lazily: those past the cut are not);
    each is cropped to max_length - 2 residues, at a random place with `rng`, else at its start.
    """
    pieces = [np.array([cls_idx])]
    filled = 1
    for tokens in members:
        if filled >= length:
            break
        take = min(len(tokens), max_length - 2)
        start = int(rng.integers(0, len(tokens) - take + 1)) if rng is not None else 0
        pieces += [tokens[start:start + take], np.array([eos_idx])]
        filled += take + 1
    return np.concatenate(pieces).astype(np.int64)[:length]
