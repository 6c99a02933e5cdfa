"""Batches of one split of a token store, sharded over DDP ranks and DataLoader workers.

`ProteinBatches` is an IterableDataset that yields whole batches (a DataLoader with batch_size=None
passes them through). Per epoch, every process computes the same `EpochPlan` from (seed, epoch):
the split's blocks in a shuffled order, dealt to the world_size * workers shards. A shard reads its
blocks with two contiguous slices each (offsets, then tokens), which is what a compressed chunked
HDF5 file is fast at, and turns them into batches:

    {"input_ids": LongTensor [B, L], "labels": LongTensor [B, L] (-100: no target),
     "padding_mask": BoolTensor [B, L] (True at padding), or None when no position is padded}

A batch without padding (every concat window but a split's last) carries no mask at all: the check
runs here on the CPU, so the model never needs a host sync to learn that it may take an attention
kernel's unmasked fast path (SDPA's flash and memory-efficient kernels refuse a mask).

All randomness (block order, crops, batch order, masking) comes from generators seeded by
(seed, epoch, split, block, batch), so a batch is reproducible whatever the number of workers
and whichever worker builds it. Evaluation splits use epoch 0 every time: the same crops and masks
at every validation, so curves compare like with like.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from protein_performer.data.alphabet import Alphabet, frame
from protein_performer.data.errors import DataError
from protein_performer.data.masking import IGNORE_INDEX, OBJECTIVES, causal_lm_labels, mask_for_mlm
from protein_performer.data.sampling import (
    SAMPLINGS,
    Clusters,
    EpochPlan,
    budget_batches,
    count_budget_batches,
    example_token_counts,
    join_with_eos,
    homolog_segment,
    pack_segments,
    plan_epoch,
    segment_lengths,
    single_examples,
)
from protein_performer.data.splits import SPLITS
from protein_performer.data.store import TokenStore

__all__ = ["BatchSpec", "ProteinBatches", "Batch"]

Batch = dict[str, torch.Tensor]
_OFFSETS_PER_READ = 1 << 20  # records per read when scanning a split's lengths
_MIN_BLOCKS_PER_SHARD = 4  # small splits get small blocks, so every shard has some to balance
# How each sampling reads one block into batches: the method of ProteinBatches, by SAMPLINGS name.
_BLOCK_READERS = {"single": "_single_block", "concat": "_concat_block", "homologs": "_homologs_block"}


@dataclass(frozen=True)
class BatchSpec:
    """How examples and batches are made (the DataModule's arguments of the same names)."""

    objective: str = "mlm"  # "mlm" | "clm"
    sampling: str = "single"  # "single" | "concat" | "homologs" (a store built with clusters)
    max_length: int = 1024  # tokens per example (single: incl. <cls> and <eos>) or per window (concat, homologs)
    tokens_per_batch: int = 16384  # single: padded tokens per batch (batch size x longest example)
    batch_size: int = 8  # concat, homologs: windows per batch
    eval_crop: str = "windows"  # single, evaluation: "windows" (every residue once) | "start"
    mask_probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    block_records: int = 2048  # single: records per block (the unit of reading and sharding), at most
    block_batches: int = 8  # concat, homologs: batches per block, at most
    min_cluster_members: int = 1  # homologs: clusters with fewer members (in the split) are left out

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise DataError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.sampling not in SAMPLINGS:
            raise DataError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.eval_crop not in ("windows", "start"):
            raise DataError(f"eval_crop must be 'windows' or 'start', got {self.eval_crop!r}")
        if self.max_length < 3:
            raise DataError(f"max_length must be >= 3, got {self.max_length}")
        if self.sampling == "single" and self.tokens_per_batch < self.max_length:
            raise DataError(f"tokens_per_batch ({self.tokens_per_batch}) must be >= max_length ({self.max_length}): "
                            "a batch must hold at least one full-length protein")
        if self.batch_size < 1 or self.block_records < 1 or self.block_batches < 1 or self.min_cluster_members < 1:
            raise DataError("batch_size, block_records, block_batches and min_cluster_members must be >= 1")


class ProteinBatches(IterableDataset):
    """The batches of one split for one DDP rank; DataLoader workers split them further.

    Args:
        store: path of the token store.
        split: "train", "valid", "test" or "ood".
        train: random crops, shuffled blocks and batches, a new plan every epoch, and equal batch
            counts on every rank; otherwise deterministic crops and every batch of the split, after
            which a rank with fewer batches than the richest adds scoring-free ones (see
            `scoring_free_batch`), so that evaluation too runs the same number of steps on every rank.
        rank, world_size: this process's place in DDP (0, 1 without DDP).
        workers: the DataLoader's num_workers (0 = the main process reads).
    """

    def __init__(self, store: str | Path, split: str, spec: BatchSpec, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int = 0) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.store_path = Path(store)
        self.split = split
        self.split_code = SPLITS.index(split)
        self.spec = spec
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = max(workers, 1)
        self.alphabet = Alphabet()
        self.epoch = 0
        self._store: TokenStore | None = None
        store_now = self._open()
        self.records = store_now.split_sizes[split]
        self.residues = store_now.split_residues[split]
        self.clusters: Clusters | None = None  # homologs: the split's clusters, their segments and offsets
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None  # homologs: (epoch, cluster order, windows)
        if spec.sampling == "homologs":
            self._group_clusters(store_now)
        self.block_batches, self.block_size = self._blocks(store_now)
        store_now.close()  # workers open their own handle; none is inherited across the fork
        self._plan: tuple[int, EpochPlan, np.ndarray] | None = None  # (epoch, plan, fillers [workers])

    # ---- the plan ---------------------------------------------------------------------------------

    def _open(self) -> TokenStore:
        # One handle per process: a TokenStore reopens itself after a fork.
        if self._store is None:
            self._store = TokenStore(self.store_path)
        return self._store

    @property
    def stream_tokens(self) -> int:
        """concat: length of the split's stream (every record followed by <eos>)."""
        return self.residues + self.records

    def _group_clusters(self, store: TokenStore) -> None:
        """homologs: the split's clusters (held in memory: 8 bytes per record for keys and for offsets)."""
        if not store.has_clusters:
            raise DataError(f"{store.path}: data.sampling=homologs needs a token store built with clusters: set "
                            "data.clusters=<representative TAB member .tsv> (or preprocess ... clusters=...)")
        self.record_offsets = store.offsets(self.split)
        self.clusters = Clusters.from_keys(store.clusters(self.split), self.spec.min_cluster_members)
        self.segment_lengths = segment_lengths(self.clusters, np.diff(self.record_offsets), self.spec.max_length)

    def _blocks(self, store: TokenStore) -> tuple[np.ndarray, int]:
        """(batches per block int64 [n_blocks], block size in records (single) or windows (concat, homologs))."""
        shards = self.world_size * self.workers
        spec = self.spec
        if self.spec.sampling in ("concat", "homologs"):
            if self.spec.sampling == "concat":
                windows = math.ceil(self.stream_tokens / spec.max_length) if self.records else 0
            else:
                windows = len(self.homolog_layout(0)[1]) - 1
            batches = math.ceil(windows / spec.batch_size)
            per_block = min(spec.block_batches, max(1, math.ceil(batches / (_MIN_BLOCKS_PER_SHARD * shards))))
            size = per_block * spec.batch_size
            return self._window_blocks(windows, size), size
        size = min(spec.block_records, max(1, math.ceil(self.records / (_MIN_BLOCKS_PER_SHARD * shards))))
        crop = "random" if self.train else spec.eval_crop
        counts = []
        step = size * max(1, _OFFSETS_PER_READ // size)  # whole blocks per read
        # One pass over the split's offsets, about a million records at a time: constant memory.
        for first in range(0, self.records, step):
            offsets = store.offsets(self.split, first, min(first + step, self.records))
            lengths = np.diff(offsets)
            for begin in range(0, len(lengths), size):
                tokens = example_token_counts(lengths[begin:begin + size], spec.max_length, crop)
                counts.append(count_budget_batches(tokens, spec.tokens_per_batch))
        return np.asarray(counts, dtype=np.int64), size

    def _window_blocks(self, windows: int, size: int) -> np.ndarray:
        """Batches per block when `windows` windows are cut into blocks of `size`, int64 [n_blocks]."""
        per_block = size // self.spec.batch_size
        counts = np.full(math.ceil(windows / size), per_block, dtype=np.int64)
        if windows % size:
            counts[-1] = math.ceil((windows % size) / self.spec.batch_size)
        return counts

    def homolog_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """homologs: (cluster order int64 [C], window bounds int64 [W + 1]) of an epoch: window w packs
        the segments of clusters order[bounds[w]:bounds[w + 1]]. Training draws the order from
        (seed, epoch); evaluation keeps the clusters' own order."""
        if self._layout is None or self._layout[0] != epoch:
            assert self.clusters is not None
            order = np.arange(len(self.clusters))
            if self.train:
                # The trailing 1 keeps this stream apart from the block order's (seed, epoch, split).
                order = np.random.default_rng((self.seed, epoch, self.split_code, 1)).permutation(order)
            window = pack_segments(self.segment_lengths[order], self.spec.max_length)
            by_window = np.argsort(window, kind="stable")  # each window's clusters in the order they came
            bounds = np.concatenate([[0], np.cumsum(np.bincount(window))]) if len(window) else np.zeros(1, np.int64)
            self._layout = (epoch, order[by_window], bounds.astype(np.int64))
        return self._layout[1], self._layout[2]

    def set_epoch(self, epoch: int) -> None:
        """Training reshuffles per epoch; call before iterating (the DataModule's loaders do)."""
        self.epoch = epoch

    @property
    def _plan_epoch(self) -> int:
        return self.epoch if self.train else 0

    def plan(self) -> EpochPlan:
        epoch = self._plan_epoch
        if self._plan is None or self._plan[0] != epoch:
            block_batches = self.block_batches
            if self.spec.sampling == "homologs":  # packing differs a little from epoch to epoch
                block_batches = self._window_blocks(len(self.homolog_layout(epoch)[1]) - 1, self.block_size)
            order = np.arange(len(block_batches))
            if self.train:
                order = np.random.default_rng((self.seed, epoch, self.split_code)).permutation(order)
            plan = plan_epoch(block_batches, order, self.world_size, self.workers, equal_ranks=self.train)
            self._plan = (epoch, plan, self._fillers(plan))
        return self._plan[1]

    def _fillers(self, plan: EpochPlan) -> np.ndarray:
        """int64 [workers]: scoring-free batches each worker of this rank adds after its real ones.

        Evaluation keeps every batch, so ranks hold different numbers; but every forward of a
        distributed model is collective (FSDP all-gathers parameters, DDP broadcasts buffers), so a
        rank that stopped early would leave the others waiting forever. Each rank tops up to the
        richest rank's count, giving the extra batches to its least loaded workers. Every rank
        computes the same plan, so this needs no communication. (Training ranks are already equal.)
        """
        fillers = np.zeros(self.workers, dtype=np.int64)
        load = plan.quota[self.rank].copy()
        for _ in range(int(plan.quota.sum(axis=1).max()) - plan.batches_of_rank(self.rank)):
            worker = int(np.argmin(load))
            load[worker] += 1
            fillers[worker] += 1
        return fillers

    def __len__(self) -> int:
        """Batches this rank yields this epoch (all of its workers together, scoring-free ones included)."""
        plan = self.plan()
        assert self._plan is not None
        return plan.batches_of_rank(self.rank) + int(self._plan[2].sum())

    def scoring_free_batch(self) -> Batch:
        """<cls> <eos> with no target: runs the model like any batch but adds nothing to a loss or metric
        (every label is IGNORE_INDEX, so summed loss, correct and scored tokens are all zero)."""
        ids = torch.from_numpy(frame(self.alphabet, np.empty(0, dtype=np.int64), [0], [0]))
        return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX), "padding_mask": None}

    # ---- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is not None:
            if info.num_workers != self.workers:
                raise RuntimeError(f"dataset planned for {self.workers} workers, DataLoader has {info.num_workers}")
            yield from self._worker_batches(info.id)
            return
        # In the main process: all of this rank's worker shards, interleaved in the order a
        # DataLoader with `workers` workers would deliver them (round robin, skipping exhausted ones).
        streams = [self._worker_batches(worker) for worker in range(self.workers)]
        while streams:
            for stream in list(streams):
                batch = next(stream, None)
                if batch is None:
                    streams.remove(stream)
                else:
                    yield batch

    def _worker_batches(self, worker: int) -> Iterator[Batch]:
        yield from self._real_batches(worker)
        assert self._plan is not None
        for _ in range(int(self._plan[2][worker])):
            yield self.scoring_free_batch()

    def _real_batches(self, worker: int) -> Iterator[Batch]:
        plan = self.plan()
        quota = int(plan.quota[self.rank, worker])
        blocks = plan.shard_blocks[self.rank * self.workers + worker]
        produced = 0
        for block in blocks.tolist():
            if produced == quota:
                return
            for batch in getattr(self, _BLOCK_READERS[self.spec.sampling])(block):
                yield batch
                produced += 1
                if produced == quota:
                    return

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self._plan_epoch, self.split_code, *keys))

    def _single_block(self, block: int) -> Iterator[Batch]:
        store = self._open()
        first = block * self.block_size
        offsets = store.offsets(self.split, first, min(first + self.block_size, self.records))
        tokens = store.read_tokens(self.split, int(offsets[0]), int(offsets[-1]))
        offsets = offsets - offsets[0]
        rng = self._rng(block)
        examples = single_examples(np.diff(offsets), self.spec.max_length,
                                   "random" if self.train else self.spec.eval_crop, rng)
        batches = budget_batches(examples.take + 2, self.spec.tokens_per_batch)
        if self.train:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for number, rows in enumerate(batches):
            source = offsets[examples.record[rows]] + examples.start[rows]
            ids = frame(self.alphabet, tokens, source, examples.take[rows])
            yield self._targets(ids, self._rng(block, number))

    def _concat_block(self, block: int) -> Iterator[Batch]:
        length = self.spec.max_length
        begin = block * self.block_size * length
        end = min(begin + self.block_size * length, self.stream_tokens)
        first, last = self._record_at(begin), self._record_at(end - 1)
        store = self._open()
        offsets = store.offsets(self.split, first, last + 1)
        tokens = store.read_tokens(self.split, int(offsets[0]), int(offsets[-1]))
        stream_start = int(offsets[0]) + first  # stream position of record `first`
        stream = join_with_eos(tokens, offsets - offsets[0], self.alphabet.eos_idx)
        piece = stream[begin - stream_start:end - stream_start]
        windows = math.ceil(len(piece) / length)
        ids = np.full((windows, length), self.alphabet.pad_idx, dtype=np.int64)
        ids.reshape(-1)[:len(piece)] = piece
        for number, start in enumerate(range(0, windows, self.spec.batch_size)):
            yield self._targets(ids[start:start + self.spec.batch_size], self._rng(block, number))

    def _homologs_block(self, block: int) -> Iterator[Batch]:
        order, bounds = self.homolog_layout(self._plan_epoch)
        assert self.clusters is not None
        store = self._open()
        first = block * self.block_size
        windows = range(first, min(first + self.block_size, len(bounds) - 1))
        for number, start in enumerate(range(0, len(windows), self.spec.batch_size)):
            rows = []
            for window in windows[start:start + self.spec.batch_size]:
                segments = []
                for c in order[bounds[window]:bounds[window + 1]].tolist():
                    rng = self._rng(int(self.clusters.keys[c].view(np.uint64)))  # the same for a cluster anywhere
                    members = rng.permutation(self.clusters.of(c))
                    offsets = self.record_offsets
                    tokens = (store.read_tokens(self.split, int(offsets[m]), int(offsets[m + 1]))
                              for m in members.tolist())
                    segments.append(homolog_segment(tokens, int(self.segment_lengths[c]), self.alphabet.cls_idx,
                                                    self.alphabet.eos_idx, self.spec.max_length,
                                                    rng if self.train else None))
                rows.append(np.concatenate(segments))
            ids = np.full((len(rows), max(map(len, rows))), self.alphabet.pad_idx, dtype=np.int64)
            for row, tokens in zip(ids, rows):
                row[:len(tokens)] = tokens
            yield self._targets(ids, self._rng(block, number))

    def _record_at(self, position: int) -> int:
        """The record whose stream span (residues and its <eos>) holds stream `position`: the last
        record r with offsets[r] + r <= position, by binary search over the on-disk offsets."""
        store = self._open()
        low, high = 0, self.records - 1
        while low < high:
            middle = (low + high + 1) // 2
            if store.offset(self.split, middle) + middle <= position:
                low = middle
            else:
                high = middle - 1
        return low

    def _targets(self, ids: np.ndarray, rng: np.random.Generator) -> Batch:
        padding = ids == self.alphabet.pad_idx
        if self.spec.objective == "mlm":
            inputs, labels = mask_for_mlm(ids, self.alphabet, rng, probability=self.spec.mask_probability,
                                          mask_fraction=self.spec.mask_fraction,
                                          random_fraction=self.spec.random_fraction)
        else:
            inputs, labels = ids, causal_lm_labels(ids, self.alphabet.pad_idx)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "padding_mask": torch.from_numpy(padding) if padding.any() else None}
