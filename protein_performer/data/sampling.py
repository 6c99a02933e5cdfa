"""How a split becomes examples and batches, as pure numpy functions (the dataset does the I/O).

The Performer paper's two protein settings:
- single: one protein per example, `<cls> residues <eos>`, at most `max_length` tokens. Training
  takes a random crop of a longer protein; evaluation takes the first `max_length - 2` residues
  ("start") or cuts the protein into consecutive windows ("windows") so every residue is scored once.
  Examples are batched by a token budget: sorted by length within a block of records, so a batch
  holds proteins of similar length and little padding.
- concat: the split's proteins joined into one stream, each followed by <eos>, cut into
  non-overlapping windows of `max_length` tokens (the last one padded).

A split is cut into blocks (consecutive records, or consecutive windows), the unit of reading and of
sharding: every (DDP rank, DataLoader worker) pair gets whole blocks, balanced by their batch counts
(`plan_epoch`).
"""
from __future__ import annotations

import heapq
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
]

SAMPLINGS = ("single", "concat")
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
