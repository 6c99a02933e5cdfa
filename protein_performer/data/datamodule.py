"""ProteinDataModule: a token store (given, or built from FASTA into a cache) -> sharded batch loaders."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader

from protein_performer.data.dataset import BatchSpec, ProteinBatches
from protein_performer.data.errors import DataError
from protein_performer.data.fasta import expand_inputs
from protein_performer.data.splits import SplitSpec
from protein_performer.data.store import FORMAT_VERSION, TokenStore, input_identity
from protein_performer.data.store_writer import build_token_store
from protein_performer.resources import resolve_data_path

__all__ = ["ProteinDataModule", "DataSource", "Loading", "EpochLoader", "ResumableLoader"]

log = logging.getLogger(__name__)

class EpochLoader(DataLoader):
    """A DataLoader (batch_size=None: the dataset yields batches) that sets its dataset's epoch.

    Before each pass it asks `epoch_source` (the Trainer's current epoch, so a resumed run continues
    the same sequence) or, without one, counts its own passes. Workers receive a fresh copy of the
    dataset every pass (persistent_workers=False), epoch included.
    """

    def __init__(self, dataset: ProteinBatches, epoch_source: Callable[[], int | None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self.epoch_source = epoch_source
        self.passes = 0
        self.epoch: int | None = None  # the epoch of the latest pass

    def __iter__(self):  # type: ignore[override]
        epoch = self.epoch_source() if self.epoch_source is not None else None
        self.epoch = self.passes if epoch is None else epoch
        self.passes += 1
        self.dataset.set_epoch(self.epoch)  # type: ignore[attr-defined]
        return super().__iter__()


class ResumableLoader(EpochLoader):
    """The training loader: an EpochLoader that a checkpoint taken mid-epoch resumes exactly.

    Lightning stores `state_dict()` in every checkpoint and hands it back to `load_state_dict` before
    the resumed run's first pass. The state is the epoch and the number of its batches the Trainer had
    consumed (`consumed_source`: the fit loop's processed-batch count; the loader itself cannot tell,
    since Lightning fetches ahead). The resumed pass regenerates that epoch and drops the consumed
    batches: every batch (order, crop, mask) is a function of (seed, epoch, block, batch), so the
    remainder is exactly what the uninterrupted run saw. Dropping costs the data time of those batches,
    a small fraction of the training time they took.
    """

    def __init__(self, dataset: ProteinBatches, epoch_source: Callable[[], int | None] | None = None,
                 consumed_source: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, epoch_source, **kwargs)
        self.consumed_source = consumed_source
        self._resume: tuple[int, int] | None = None  # (epoch, batches to drop) from a checkpoint

    def state_dict(self) -> dict[str, int]:
        consumed = self.consumed_source() if self.consumed_source is not None else None
        epoch = self.epoch if self.epoch is not None else self.passes
        return {"epoch": int(epoch), "consumed": int(consumed or 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["consumed"]))

    def __iter__(self):  # type: ignore[override]
        iterator = super().__iter__()
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch and resume[1] > 0:
            if resume[1] >= len(self.dataset):  # type: ignore[arg-type]
                # Saved after the epoch's last batch: Lightning moves on to the next epoch (and asks
                # for a new pass), so this pass is not used; leave it whole.
                return iterator
            log.info("resuming epoch %d after its first %d batches", self.epoch, resume[1])
            for _ in range(resume[1]):
                next(iterator)
        return iterator


@dataclass(frozen=True)
class DataSource:
    """Where the proteins come from, and how a FASTA becomes the cached token store.

    fasta: a file, a glob or a list (plain or .gz), tokenised on first use into `cache_dir`.
    store: a token store (.h5 from ``python -m protein_performer.preprocess``); when set, used instead of fasta.
    cache_dir: where stores built from fasta are kept, keyed by the inputs and the split settings.
    compression, background_reader: how a cache store is built (see build_token_store).
    build_timeout: seconds a rank waits for another to finish building the cache.
    prepare_data_per_node: Lightning's flag: True would build on every node's local rank 0 (see
        ProteinDataModule for why the default is False).
    """

    fasta: str | Sequence[str] | None = None
    store: str | None = None
    cache_dir: str = ".cache/protein_performer"
    compression: str = "none"
    background_reader: bool = True
    build_timeout: float = 24 * 3600.0
    prepare_data_per_node: bool = False


@dataclass(frozen=True)
class Loading:
    """How the DataLoaders run: worker processes per rank and pinned host memory."""

    num_workers: int = 0
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {self.num_workers}")


# The typed groups ProteinDataModule takes, by their argument names. Flat keys (conf/data/*.yaml,
# `data.max_length=...` on the command line, configs saved by earlier runs) go to the group with a
# field of that name.
_GROUPS: dict[str, type] = {"source": DataSource, "batches": BatchSpec, "splits": SplitSpec, "loading": Loading}


def _deal_settings(settings: dict[str, Any], **given: Any) -> tuple[DataSource, BatchSpec, SplitSpec, Loading]:
    """The four groups: each as given, or built from the flat keys that are its fields (a group given
    whole and flat keys of the same group together are refused, as is a key no group has)."""
    owner = {field.name: name for name, group in _GROUPS.items() for field in fields(group)}
    unknown = sorted(key for key in settings if key not in owner)
    if unknown:
        raise DataError(f"unknown data setting(s) {unknown}; the settings are {sorted([*owner, 'seed'])}")
    groups = []
    for name, group in _GROUPS.items():
        flat = {key: value for key, value in settings.items() if owner[key] == name}
        if given[name] is not None and flat:
            raise TypeError(f"{name} is given both as a {group.__name__} and as flat keys {sorted(flat)}")
        groups.append(given[name] if given[name] is not None else group(**flat))
    return tuple(groups)  # type: ignore[return-value]


class ProteinDataModule(pl.LightningDataModule):
    """Masked- or causal-LM batches of proteins from a token store, for Lightning (DDP-aware).

    Batches: {"input_ids": LongTensor [B, L], "labels": LongTensor [B, L] (-100 = no target),
    "padding_mask": BoolTensor [B, L] (True at padding), or None when nothing in the batch is padded}.
    - mlm: labels hold the original token at the ~15% chosen residue positions (80% of them shown as
      <mask>, 10% as a random amino acid, 10% unchanged).
    - clm: labels[:, i] = input_ids[:, i + 1] (already shifted: logits[:, i] predicts labels[:, i]);
      -100 at the last position and wherever the next token is padding.
    Either way the loss is cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).

    Data: `source.store` if given; otherwise `source.fasta`, tokenised on first use into `cache_dir`
    under a name keyed by the inputs' paths, sizes and mtimes and the split settings, so a changed
    input or setting builds a new store. Relative paths are relative to the working directory, or, if
    nothing is there, to the repository root (so the bundled data/uniprot_sample.fasta is found from
    anywhere). Lightning builds the cache in `prepare_data` on global rank 0 only
    (prepare_data_per_node=False; other ranks wait at its barrier), so a cache on a filesystem shared
    by the nodes is built once per job, not raced by every node's local rank 0. A node whose cache_dir
    is node-local finds no file after the barrier and builds its own copy in `setup` (on its local
    rank 0, the others waiting for the file); `setup` does the same without a Trainer.

    Loaders: train_dataloader (split "train"), val_dataloader ("valid"), test_dataloader
    ([test, ood], matching ProteinLM's eval_split_names), ood_dataloader. Every DDP rank and DataLoader
    worker reads whole, disjoint blocks of the split; training reshuffles every epoch from
    (seed, epoch) and gives every rank the same number of batches.

    Args (small typed groups; each may instead be given as flat keyword settings named like its fields,
    ``ProteinDataModule(fasta=..., max_length=512, valid_fraction=0.05)``, which is what conf/data/*.yaml do):
        source: DataSource: fasta or store, the cache and how it is built.
        batches: BatchSpec: objective, sampling, lengths, batch sizes, the MLM recipe, block sizes.
        splits: SplitSpec: valid/test fractions and the OOD rules, used when building from FASTA (a
            given store carries its own).
        loading: Loading: DataLoader workers and pinned memory.
        seed: data order, crops and masks.
    """

    def __init__(self, source: DataSource | None = None, batches: BatchSpec | None = None,
                 splits: SplitSpec | None = None, loading: Loading | None = None, *, seed: int = 0,
                 **settings: Any) -> None:
        super().__init__()
        if settings.get("clusters") is not None:  # like fasta: a bundled demo file is found from anywhere
            settings["clusters"] = resolve_data_path(str(settings["clusters"]))
        source, batches, splits, loading = _deal_settings(settings, source=source, batches=batches, splits=splits,
                                                          loading=loading)
        self.spec = batches
        self.split_spec = splits
        # Flat, as checkpoints have always stored them: a resume compares these with the checkpoint's.
        self.save_hyperparameters({**asdict(source), **asdict(batches), **asdict(splits), **asdict(loading),
                                   "seed": seed})
        self.prepare_data_per_node = source.prepare_data_per_node
        fasta = source.fasta
        fasta_list = None if fasta is None else ([fasta] if isinstance(fasta, str) else [str(f) for f in fasta])
        self.fasta = None if fasta_list is None else [resolve_data_path(f) for f in fasta_list]
        self.store = None if source.store is None else Path(resolve_data_path(source.store))
        self.cache_dir = Path(source.cache_dir).expanduser().absolute()
        self.num_workers = loading.num_workers
        self.pin_memory = loading.pin_memory
        self.seed = seed
        self.compression = source.compression
        self.background_reader = source.background_reader
        self.build_timeout = source.build_timeout
        self.store_path: Path | None = None  # set by prepare_data / setup
        self.split_sizes: dict[str, int] = {}  # records per split, read by setup

    # ---- the store --------------------------------------------------------------------------------

    def cache_path(self) -> Path:
        """Where the store built from `fasta` lives: named after the first input, keyed by all of them."""
        if self.fasta is None:
            raise DataError("no data: set data.fasta=<FASTA file or glob> (data=uniref50 reads $UNIREF50_FASTA, "
                            "data=trembl and trembl_concat read $TREMBL_FASTA) or data.store=<token store .h5>")
        paths = expand_inputs(self.fasta)
        key = json.dumps({"format_version": FORMAT_VERSION, "inputs": input_identity(paths),
                          "split": self.split_spec.identity(), "compression": self.compression}, sort_keys=True)
        digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        return self.cache_dir / f"{paths[0].name.split('.')[0]}-{digest}.h5"

    def _resolve_store(self, build: bool) -> Path:
        if self.store is not None:
            if not self.store.is_file():
                raise DataError(f"{self.store}: no such token store (data.store); build one with "
                                "python -m protein_performer.preprocess input=<fasta> output=<file.h5>")
            return self.store
        path = self.cache_path()
        if path.is_file():
            return path
        if build:
            log.info("tokenising %s into %s (once; later runs reuse it)", " ".join(self.fasta or []), path)
            summary = build_token_store(self.fasta or [], path, split=self.split_spec, compression=self.compression,
                                        background_reader=self.background_reader, overwrite=True)
            log.info("token store %s:\n%s", path, summary.format())
            return path
        deadline = time.monotonic() + self.build_timeout
        while not path.is_file():  # another rank is building it; the rename makes it appear complete
            if time.monotonic() > deadline:
                raise DataError(f"{path}: waited {self.build_timeout:.0f} s for local rank 0 to build this token "
                                "store; build it first with python -m protein_performer.preprocess")
            time.sleep(1.0)
        return path

    def prepare_data(self) -> None:
        """Build the cached store if needed. Lightning calls this on local rank 0 only."""
        self.store_path = self._resolve_store(build=True)

    def setup(self, stage: str | None = None) -> None:
        """Find (or, outside Lightning, build on local rank 0 / wait for) the store and check it."""
        self.store_path = self._resolve_store(build=self._local_rank() == 0)
        with TokenStore(self.store_path) as store:
            log.info("%r", store)
            self.split_sizes = dict(store.split_sizes)
            if self.store is not None and self.split_spec.clusters is not None and not store.has_clusters:
                raise DataError(f"{self.store}: data.clusters is applied when a store is built, and this store "
                                "(data.store) was built without clusters; rebuild it with python -m "
                                "protein_performer.preprocess ... clusters=<tsv>, or give data.fasta instead")
        # Our __len__ is exact per rank and worker (see ProteinBatches), which Lightning cannot know.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

    # ---- loaders ----------------------------------------------------------------------------------

    def _local_rank(self) -> int:
        if self.trainer is not None:
            return self.trainer.local_rank
        # torchrun sets LOCAL_RANK, srun SLURM_LOCALID; a plain command (Lightning launches the others) is 0.
        return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _consumed(self) -> int | None:
        """Training batches of the current epoch the Trainer has processed (for ResumableLoader)."""
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def dataset(self, split: str, *, rank: int | None = None, world_size: int | None = None) -> ProteinBatches:
        """The batches of `split` ("train", "valid", "test", "ood") for one rank (default: this one)."""
        if self.store_path is None:
            self.setup()
        assert self.store_path is not None
        auto_rank, auto_world = self._rank_and_world()
        return ProteinBatches(self.store_path, split, self.spec, train=split == "train", seed=self.seed,
                              rank=auto_rank if rank is None else rank,
                              world_size=auto_world if world_size is None else world_size,
                              workers=self.num_workers)

    def dataloader(self, split: str, *, rank: int | None = None, world_size: int | None = None) -> EpochLoader:
        return EpochLoader(self.dataset(split, rank=rank, world_size=world_size), epoch_source=self._epoch,
                           num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(self.dataset("train"), epoch_source=self._epoch, consumed_source=self._consumed,
                               num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> EpochLoader:
        return self.dataloader("valid")

    def test_dataloader(self) -> list[EpochLoader]:
        """[test, ood]: the order of ProteinLM's eval_split_names; ood only when that split has records
        (most runs set no data.ood_regex; an empty loader only makes Lightning warn)."""
        if not self.split_sizes:
            self.setup()
        loaders = [self.dataloader("test")]
        if self.split_sizes.get("ood", 0) > 0:
            loaders.append(self.dataloader("ood"))
        return loaders

    def ood_dataloader(self) -> EpochLoader:
        return self.dataloader("ood")
