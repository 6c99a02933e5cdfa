"""ProteinDataModule: the batch contract, complete and disjoint sharding, per-epoch shuffling, the cache."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from protein_performer.data import (
    IGNORE_INDEX,
    BatchSpec,
    DataError,
    DataSource,
    Loading,
    ProteinDataModule,
    SplitSpec,
    TokenStore,
)

SAMPLE = dict(valid_fraction=0.05, test_fraction=0.05, ood_regex="OS=Homo sapiens", max_length=128,
              tokens_per_batch=1024, batch_size=4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def make_datamodule(sample_fasta, cache_dir):
    def make(**settings) -> ProteinDataModule:
        datamodule = ProteinDataModule(fasta=str(sample_fasta), cache_dir=str(cache_dir), **{**SAMPLE, **settings})
        datamodule.prepare_data()
        datamodule.setup("fit")
        return datamodule
    return make


def rows(batches, alphabet) -> list[tuple[int, ...]]:
    """Each example's tokens without <cls>, <eos> and padding (exact for CLM, whose inputs are unmasked);
    an evaluation rank's scoring-free filler batches hold no example."""
    drop = [alphabet.cls_idx, alphabet.eos_idx, alphabet.pad_idx]
    return [tuple(t for t in row.tolist() if t not in drop) for batch in batches if not is_filler(batch)
            for row in batch["input_ids"]]


def is_filler(batch) -> bool:
    return bool((batch["labels"] == IGNORE_INDEX).all())


def split_records(store_path, split) -> list[np.ndarray]:
    with TokenStore(store_path) as store:
        offsets = store.offsets(split)
        return [store.read_tokens(split, a, b) for a, b in zip(offsets[:-1], offsets[1:])]


@pytest.mark.parametrize("sampling", ["single", "concat"])
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_batches_follow_the_contract(sampling, objective, make_datamodule, alphabet):
    datamodule = make_datamodule(sampling=sampling, objective=objective)
    for loader in [datamodule.train_dataloader(), datamodule.val_dataloader(), *datamodule.test_dataloader()]:
        batches = list(loader)
        assert len(batches) == len(loader) > 0
        for batch in batches:
            ids, labels, padding = batch["input_ids"], batch["labels"], batch["padding_mask"]
            assert set(batch) == {"input_ids", "labels", "padding_mask"}
            if padding is None:  # only a batch without padding comes without a mask
                assert (ids != alphabet.pad_idx).all()
                padding = torch.zeros_like(ids, dtype=torch.bool)
            else:
                assert padding.any()
            assert ids.dtype == labels.dtype == torch.int64 and padding.dtype == torch.bool
            assert ids.shape == labels.shape == padding.shape and ids.shape[1] <= 128
            assert torch.equal(padding, ids == alphabet.pad_idx)
            assert (labels[padding] == IGNORE_INDEX).all()
            if sampling == "single":
                assert ids.numel() <= 1024 and (ids[:, 0] == alphabet.cls_idx).all()
                last = (~padding).sum(dim=1) - 1
                assert (ids[torch.arange(len(ids)), last] == alphabet.eos_idx).all()
            else:
                assert ids.shape[1] == 128 and ids.shape[0] <= 4
            if objective == "clm":
                targets = ids[:, 1:][~padding[:, 1:]]
                assert torch.equal(labels[:, :-1][~padding[:, 1:]], targets) and (labels[:, -1] == IGNORE_INDEX).all()
            else:
                chosen = labels != IGNORE_INDEX
                assert chosen.any(dim=1).all() and torch.isin(labels[chosen], torch.from_numpy(
                    alphabet.residue_indices)).all()


def test_test_loaders_hold_ood_only_when_that_split_has_records(make_datamodule):
    with_ood = make_datamodule()
    assert with_ood.split_sizes["ood"] > 0 and len(with_ood.test_dataloader()) == 2
    without = make_datamodule(ood_regex=None)  # most runs: no ood split, so no empty loader for Lightning
    assert without.split_sizes.get("ood", 0) == 0 and len(without.test_dataloader()) == 1
    assert len(without.test_dataloader()[0]) > 0


def test_evaluation_scores_every_residue_of_the_split_once(make_datamodule, alphabet):
    datamodule = make_datamodule(objective="clm")
    for split, loader in [("valid", datamodule.val_dataloader()), ("test", datamodule.test_dataloader()[0]),
                          ("ood", datamodule.ood_dataloader())]:
        expected = Counter()
        for record in split_records(datamodule.store_path, split):  # windows of 126 residues, one by one
            for start in range(0, len(record), 126):
                expected[tuple(record[start:start + 126].tolist())] += 1
        assert Counter(rows(loader, alphabet)) == expected, split


def test_concat_windows_cut_the_eos_joined_stream(make_datamodule, alphabet):
    datamodule = make_datamodule(objective="clm", sampling="concat")
    stream = np.concatenate([np.append(r, alphabet.eos_idx) for r in split_records(datamodule.store_path, "valid")])
    windows = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in datamodule.val_dataloader()])
    assert len(windows) == 128 * -(-len(stream) // 128)
    np.testing.assert_array_equal(windows[:len(stream)], stream)
    assert (windows[len(stream):] == alphabet.pad_idx).all()


def protein_of_each_example(examples, records) -> list[tuple[int, ...]]:
    """The whole protein each example was cut from (a crop of 126 residues is found in one protein only;
    the sample holds a few identical sequences under different accessions, which count as one protein)."""
    whole = {tuple(r.tolist()) for r in records}
    text = "|".join(bytes(r).decode("latin-1") for r in records)
    starts = np.cumsum([0] + [len(r) + 1 for r in records])
    found = []
    for example in examples:
        if example in whole:
            found.append(example)
            continue
        needle = bytes(example).decode("latin-1")
        positions, position = [], text.find(needle)
        while position >= 0:
            positions.append(position)
            position = text.find(needle, position + 1)
        owners = {tuple(records[int(np.searchsorted(starts, p, side="right")) - 1].tolist()) for p in positions}
        assert len(owners) == 1, "a crop that fits two different proteins"
        found.append(owners.pop())
    return found


def test_training_epoch_takes_one_crop_of_every_protein(make_datamodule, alphabet):
    datamodule = make_datamodule(objective="clm")
    records = split_records(datamodule.store_path, "train")
    found = protein_of_each_example(rows(datamodule.train_dataloader(), alphabet), records)
    assert Counter(found) == Counter(tuple(r.tolist()) for r in records)


@pytest.mark.parametrize("sampling", ["single", "concat"])
def test_two_ranks_see_disjoint_examples_whose_union_is_the_split(sampling, make_datamodule, alphabet):
    datamodule = make_datamodule(objective="clm", sampling=sampling)
    for split in ("valid", "test", "ood"):
        alone = Counter(rows(datamodule.dataloader(split, rank=0, world_size=1), alphabet))
        ranks = [Counter(rows(datamodule.dataloader(split, rank=r, world_size=2), alphabet)) for r in (0, 1)]
        assert ranks[0] + ranks[1] == alone, split  # multisets: nothing twice, nothing missing
        assert ranks[0] and ranks[1]
    if sampling == "single":  # training: every rank the same number of batches, no protein on both
        records = split_records(datamodule.store_path, "train")
        loaders = [datamodule.dataloader("train", rank=r, world_size=2) for r in (0, 1)]
        batches = [list(loader) for loader in loaders]
        assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == len(loaders[1])
        seen = [Counter(protein_of_each_example(rows(b, alphabet), records)) for b in batches]
        union = seen[0] + seen[1]
        assert not union - Counter(tuple(r.tolist()) for r in records)  # no protein more often than it exists
        assert union.total() > 0.9 * len(records)  # equalising the ranks cuts only a few batches


@pytest.mark.parametrize("world_size", [2, 3, 16])
def test_evaluation_ranks_run_equally_many_batches_and_fillers_score_nothing(world_size, make_datamodule, alphabet):
    """Every forward of FSDP (and DDP's buffer broadcast) is collective: evaluation ranks must run the
    same number of batches, also when a split (ood: 8 records) has fewer records than there are ranks."""
    datamodule = make_datamodule(objective="clm", num_workers=2)
    filled = 0
    for split in ("valid", "test", "ood"):
        alone = Counter(rows(datamodule.dataset(split, rank=0, world_size=1), alphabet))
        datasets = [datamodule.dataset(split, rank=r, world_size=world_size) for r in range(world_size)]
        batches = [list(dataset) for dataset in datasets]  # both workers' shards, interleaved
        assert len({len(b) for b in batches} | {len(d) for d in datasets}) == 1, split
        assert sum((Counter(rows(b, alphabet)) for b in batches), Counter()) == alone, split
        fillers = [batch for rank in batches for batch in rank if is_filler(batch)]
        filled += len(fillers)
        if world_size == 16 and split == "ood":
            assert any(all(is_filler(batch) for batch in rank) for rank in batches)  # ranks without a record
        for batch in fillers:
            assert batch["padding_mask"] is None and batch["input_ids"].shape == (1, 2)
    assert filled  # the splits do not divide evenly: this test exercises the fillers


def test_dataloader_workers_deliver_the_batches_of_the_main_process(make_datamodule):
    datamodule = make_datamodule(num_workers=2)
    loader = datamodule.train_dataloader()
    in_process = list(loader.dataset)  # interleaves the two workers' shards as a DataLoader does
    from_workers = list(loader)  # two processes, each opening the HDF5 file itself
    assert len(from_workers) == len(in_process) == len(loader)
    for a, b in zip(in_process, from_workers):
        for key in a:
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_training_pass_saved_mid_epoch_resumes_with_the_batches_not_yet_consumed(num_workers, make_datamodule):
    datamodule = make_datamodule(num_workers=num_workers)
    loader = datamodule.train_dataloader()
    list(loader)  # epoch 0
    epoch1 = list(loader)
    consumed = 3
    loader.consumed_source = lambda: consumed  # a Trainer reports its processed-batch count
    state = loader.state_dict()
    assert state == {"epoch": 1, "consumed": consumed}

    fresh = make_datamodule(num_workers=num_workers).train_dataloader()
    fresh.epoch_source = lambda: 1  # as a resumed Trainer's current epoch
    fresh.load_state_dict(state)
    remainder = list(fresh)
    assert len(remainder) == len(epoch1) - consumed
    for a, b in zip(remainder, epoch1[consumed:]):
        for key in a:
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key
    assert len(list(fresh)) == len(epoch1)  # only the resumed pass is shortened


def test_training_reshuffles_every_epoch_reproducibly_and_evaluation_never(make_datamodule):
    datamodule = make_datamodule()

    def epoch(loader):
        return [torch.cat([b["input_ids"].reshape(-1), b["labels"].reshape(-1)]) for b in loader]

    train = datamodule.train_dataloader()
    first, second = epoch(train), epoch(train)  # the loader counts passes without a Trainer
    again = epoch(make_datamodule().train_dataloader())
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    assert len(first) != len(second) or not all(torch.equal(a, b) for a, b in zip(first, second))
    valid = datamodule.val_dataloader()
    assert all(torch.equal(a, b) for a, b in zip(epoch(valid), epoch(valid)))
    other_seed = epoch(make_datamodule(seed=1).train_dataloader())
    assert len(first) != len(other_seed) or not all(torch.equal(a, b) for a, b in zip(first, other_seed))


def test_the_cache_is_reused_and_rebuilt_when_inputs_or_settings_change(sample_fasta, tmp_path):
    fasta = tmp_path / "proteins.fasta"
    fasta.write_bytes(sample_fasta.read_bytes())
    cache = tmp_path / "cache"

    def store_path(**settings) -> Path:
        datamodule = ProteinDataModule(fasta=str(fasta), cache_dir=str(cache), **settings)
        datamodule.prepare_data()
        return datamodule.store_path

    first = store_path()
    built = first.stat().st_mtime_ns
    assert store_path() == first and first.stat().st_mtime_ns == built  # reused, not rebuilt
    assert first.name.startswith("proteins-") and first.parent == cache
    assert store_path(valid_fraction=0.1) != first  # a split setting is part of the key
    # So is the compression: a cache built with the former default (scaleoffset) is not taken for today's (none).
    assert store_path(compression="scaleoffset") != first
    with h5py.File(first) as h5:
        assert h5["train/tokens"].compression is None and h5["train/tokens"].scaleoffset is None
    with open(fasta, "ab") as handle:
        handle.write(b">sp|NEW1|NEW_HUMAN an added protein\nMKVLAAGIVGLLLAAGCSS\n")
    changed = store_path()
    assert changed != first and len(TokenStore(changed)) == 501
    assert sorted(p.suffix for p in cache.iterdir()) == [".h5"] * 4  # no temporary files left


def test_the_cache_is_built_once_per_job_and_by_nodes_that_cannot_see_it(sample_fasta, tmp_path, monkeypatch):
    """Lightning runs prepare_data on global rank 0 only (not once per node, which would race every
    node's builder on a shared filesystem); a node whose cache_dir is its own builds a copy in setup."""
    shared = tmp_path / "shared"
    first = ProteinDataModule(fasta=str(sample_fasta), cache_dir=str(shared))
    assert first.prepare_data_per_node is False
    first.prepare_data()  # global rank 0
    built = first.store_path.stat().st_mtime_ns
    monkeypatch.setenv("LOCAL_RANK", "0")  # another node's local rank 0, after Lightning's barrier
    other_node = ProteinDataModule(fasta=str(sample_fasta), cache_dir=str(shared))
    other_node.setup("fit")
    assert other_node.store_path == first.store_path and first.store_path.stat().st_mtime_ns == built
    local = ProteinDataModule(fasta=str(sample_fasta), cache_dir=str(tmp_path / "node-local"))
    local.setup("fit")
    assert local.store_path.is_file() and local.store_path.parent == tmp_path / "node-local"


def test_stores_are_read_without_requiring_file_locks(sample_store_path, monkeypatch):
    """Some shared filesystems (NFS, Lustre mounts) refuse HDF5's file locks and every open would fail:
    stores are read-only once named, so readers ask for locks only where the filesystem has them."""
    import h5py

    from protein_performer.data import store as store_module

    opened = []
    real_file = h5py.File
    monkeypatch.setattr(store_module.h5py, "File", lambda *a, **k: opened.append((a[1:], k)) or real_file(*a, **k))
    with TokenStore(sample_store_path) as store:
        assert len(store) == 500
    assert opened == [(("r",), {"locking": "best-effort"})]


def test_missing_data_is_explained(tmp_path):
    with pytest.raises(DataError, match=r"no data: set data\.fasta=.*UNIREF50_FASTA"):
        ProteinDataModule(cache_dir=str(tmp_path)).prepare_data()
    with pytest.raises(DataError, match="missing.h5: no such token store"):
        ProteinDataModule(store=str(tmp_path / "missing.h5")).setup()
    with pytest.raises(DataError, match="no-such.fasta: no such file"):
        ProteinDataModule(fasta=str(tmp_path / "no-such.fasta"), cache_dir=str(tmp_path)).prepare_data()
    with pytest.raises(DataError, match="tokens_per_batch .* must be >= max_length"):
        ProteinDataModule(max_length=1024, tokens_per_batch=512)


def test_flat_settings_are_dealt_to_the_typed_groups(sample_fasta, tmp_path):
    """conf/data/*.yaml, `data.<key>=...` and configs saved by earlier runs stay flat; the module holds typed
    groups, and its hparams (what a checkpoint stores and a resume compares) stay the flat keys they always were."""
    flat = ProteinDataModule(fasta=str(sample_fasta), cache_dir=str(tmp_path), sampling="concat", max_length=256,
                             batch_size=3, valid_fraction=0.1, num_workers=2, seed=7)
    grouped = ProteinDataModule(DataSource(fasta=str(sample_fasta), cache_dir=str(tmp_path)),
                                BatchSpec(sampling="concat", max_length=256, batch_size=3),
                                SplitSpec(valid_fraction=0.1), Loading(num_workers=2), seed=7)
    assert flat.spec == grouped.spec == BatchSpec(sampling="concat", max_length=256, batch_size=3)
    assert flat.split_spec == grouped.split_spec and flat.num_workers == grouped.num_workers == 2
    assert dict(flat.hparams) == dict(grouped.hparams)
    assert set(flat.hparams) == {
        "objective", "sampling", "max_length", "fasta", "store", "cache_dir", "tokens_per_batch", "batch_size",
        "eval_crop", "valid_fraction", "test_fraction", "ood_accessions", "ood_regex", "clusters", "num_workers",
        "pin_memory", "seed", "mask_probability", "mask_fraction", "random_fraction", "block_records", "block_batches",
        "min_cluster_members", "compression", "background_reader", "build_timeout", "prepare_data_per_node"}
    assert flat.hparams["seed"] == 7 and flat.hparams["max_length"] == 256
    with pytest.raises(DataError, match=r"unknown data setting\(s\) \['max_lenght'\]"):
        ProteinDataModule(max_lenght=256)
    with pytest.raises(TypeError, match=r"batches is given both as a BatchSpec and as flat keys \['max_length'\]"):
        ProteinDataModule(batches=BatchSpec(), max_length=256)
    with pytest.raises(DataError, match="num_workers must be >= 0"):
        Loading(num_workers=-1)


def test_the_bundled_sample_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    datamodule = ProteinDataModule(fasta="data/uniprot_sample.fasta", cache_dir="cache", **SAMPLE)
    datamodule.prepare_data()
    assert datamodule.store_path.parent == tmp_path / "cache"  # the cache stays under the working directory
    assert len(TokenStore(datamodule.store_path)) == 500
    assert not os.path.exists(tmp_path / "data")


class _Recorder(pl.LightningModule):
    """The least a LightningModule can be: one parameter, and a note of what each epoch trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.evaluated = Counter()

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch["input_ids"])
        return self.weight * batch["labels"].clamp(min=0).float().mean()

    def validation_step(self, batch, batch_idx):
        self.evaluated["valid"] += 1

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self.evaluated[("test", "ood")[dataloader_idx]] += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_trainer_runs_epochs_on_reshuffled_data_and_evaluates_every_split(make_datamodule):
    datamodule = make_datamodule()
    module = _Recorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    epochs = [torch.cat([ids.reshape(-1) for ids in module.seen[e]]) for e in (0, 1)]
    assert len(epochs[0]) != len(epochs[1]) or not torch.equal(*epochs)
    assert len(module.seen[0]) == trainer.num_training_batches
    lengths = {split: len(datamodule.dataloader(split)) for split in ("valid", "test", "ood")}
    assert module.evaluated == {"valid": 2 * lengths["valid"], "test": lengths["test"], "ood": lengths["ood"]}
