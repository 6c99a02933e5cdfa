"""Homolog windows (data.sampling=homologs): whole clusters packed as <cls> m1 <eos> m2 <eos> ..., sampled by
cluster, deterministic, resumable and sharded like the other samplings; both objectives."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from protein_performer.data import IGNORE_INDEX, BatchSpec, DataError, ProteinDataModule, TokenStore
from protein_performer.data.dataset import ProteinBatches
from protein_performer.data.sampling import Clusters, homolog_segment, pack_segments, segment_lengths
from protein_performer.train import compose_config, train

LENGTH = 512  # short windows keep these tests quick; the layout rules do not depend on the length


@pytest.mark.parametrize("open_windows", [1, 4])
@pytest.mark.parametrize("max_length", [16, 100])
def test_first_fit_packs_every_segment_once_within_the_window(max_length, open_windows):
    lengths = np.random.default_rng(0).integers(1, max_length + 1, size=300)
    window = pack_segments(lengths, max_length, open_windows)
    count = window.max() + 1
    assert window[0] == 0 and set(window.tolist()) == set(range(count))
    filled = np.bincount(window, weights=lengths, minlength=count)
    assert (filled <= max_length).all()
    first = [int(np.flatnonzero(window == w)[0]) for w in range(count)]
    assert first == sorted(first)  # windows are numbered in the order they open
    for w, i in enumerate(first[1:], start=1):
        # A window opens only when the segment fits none of the open ones: with room counted before it.
        earlier = np.arange(max(0, w - open_windows), w)
        room = max_length - np.array([lengths[:i][window[:i] == e].sum() for e in earlier])
        assert (room < lengths[i]).all()
    if open_windows == 1:  # next fit: windows are consecutive runs
        assert (np.diff(window) >= 0).all()


def test_clusters_group_records_by_key_and_drop_small_ones():
    keys = np.array([7, -3, 7, 5, 7, -3], dtype=np.int64)
    clusters = Clusters.from_keys(keys)
    assert clusters.keys.tolist() == [-3, 5, 7]
    assert [clusters.of(c).tolist() for c in range(3)] == [[1, 5], [3], [0, 2, 4]]
    at_least_two = Clusters.from_keys(keys, min_members=2)
    assert at_least_two.keys.tolist() == [-3, 7]
    assert [at_least_two.of(c).tolist() for c in range(2)] == [[1, 5], [0, 2, 4]]
    lengths = np.array([600, 10, 20, 30, 40, 50])
    # <cls> + each member (cropped to 510 residues) and its <eos>, at most 512 tokens.
    assert segment_lengths(clusters, lengths, 512).tolist() == [1 + 11 + 51, 1 + 31, 512]
    assert segment_lengths(clusters, lengths, 1024).tolist() == [63, 32, 1 + 601 + 21 + 41]


def test_a_segment_is_cls_then_members_each_followed_by_eos_cut_at_its_length():
    members = [np.arange(10, 15), np.arange(20, 23), np.arange(30, 40)]
    segment = homolog_segment(iter(members), 13, 0, 2, 64, None)
    assert segment.tolist() == [0, 10, 11, 12, 13, 14, 2, 20, 21, 22, 2, 30, 31]
    cropped = homolog_segment(iter(members), 7, 0, 2, 6, np.random.default_rng(0))  # members cropped to 4 residues
    assert cropped[0] == 0 and cropped[5] == 2 and len(cropped) == 7 and cropped[6] in range(20, 23)
    assert set(np.diff(cropped[1:5]).tolist()) == {1} and 10 <= cropped[1] <= 11


def dataset(store_path, split="train", *, objective="clm", train=True, seed=0, rank=0, world_size=1, workers=0,
            **options):
    spec = BatchSpec(objective=objective, sampling="homologs", max_length=LENGTH, batch_size=4, **options)
    return ProteinBatches(store_path, split, spec, train=train, seed=seed, rank=rank, world_size=world_size,
                          workers=workers)


def segments(batches, alphabet):
    """Every window's segments as lists of members (tuples of residue ids); CLM inputs are unmasked."""
    out = []
    for batch in batches:
        if (batch["labels"] == IGNORE_INDEX).all():
            continue  # an evaluation rank's scoring-free filler batch
        for row in batch["input_ids"].tolist():
            row = [t for t in row if t != alphabet.pad_idx]
            assert row[0] == alphabet.cls_idx  # a window starts with a cluster
            cuts = [i for i, t in enumerate(row) if t == alphabet.cls_idx] + [len(row)]
            window = []
            for a, b in zip(cuts[:-1], cuts[1:]):
                members, current = [], []
                for t in row[a + 1:b]:
                    if t == alphabet.eos_idx:
                        members.append(tuple(current))
                        current = []
                    else:
                        current.append(t)
                if current:
                    members.append(tuple(current))  # the last member, cut by the window's length
                window.append(members)
            out.append(window)
    return out


def window_order(data) -> list[int]:
    """The windows one process reads, in its order: its blocks as the plan deals them."""
    blocks = data.plan().shard_blocks[0].tolist()
    total = len(data.homolog_layout(data._plan_epoch)[1]) - 1
    return [w for b in blocks for w in range(b * data.block_size, min((b + 1) * data.block_size, total))]


@pytest.mark.parametrize("train", [True, False], ids=["training", "evaluation"])
def test_windows_pack_whole_clusters_once_each_as_planned(train, clustered_store_path, alphabet):
    """Each segment holds distinct members of the cluster the layout planned (crops of its records), each
    cluster gives one segment per epoch of the planned length, and packing leaves little padding."""
    data = dataset(clustered_store_path, "valid", train=train)  # the small split, read as training or evaluation
    batches = list(data)
    assert len(batches) == len(data) > 0
    windows = segments(batches, alphabet)
    order, bounds = data.homolog_layout(data._plan_epoch)
    assert sorted(order.tolist()) == list(range(len(data.clusters)))  # every cluster once
    read = window_order(data)
    assert len(read) == len(windows) == len(bounds) - 1
    with TokenStore(clustered_store_path) as store:
        for w, window in zip(read, windows):
            planned = order[bounds[w]:bounds[w + 1]]
            assert len(window) == len(planned)
            for c, members in zip(planned.tolist(), window):
                assert len(set(members)) == len(members)
                records = [store.read_tokens(data.split, int(data.record_offsets[m]), int(data.record_offsets[m + 1]))
                           .astype(np.int64).tobytes() for m in data.clusters.of(c)]
                assert all(any(np.asarray(m, dtype=np.int64).tobytes() in r for r in records) for m in members)
                # A member cut by the segment's end lacks its <eos>, which the count below adds.
                assert 1 + sum(len(m) + 1 for m in members) - data.segment_lengths[c] in (0, 1)
    padded = sum(int((b["input_ids"] == alphabet.pad_idx).sum()) for b in batches)
    assert padded / sum(b["input_ids"].numel() for b in batches) < 0.1


def test_big_clusters_do_not_dominate_training_windows(clustered_store_path):
    data = dataset(clustered_store_path, "train")
    sizes = np.diff(data.clusters.bounds)
    lengths = np.diff(data.record_offsets)
    biggest = int(np.argmax(sizes))
    held = int(lengths[data.clusters.of(biggest)].sum())  # residues its members hold
    assert sizes[biggest] >= 20 and held > 4 * LENGTH
    # One segment per cluster and epoch, capped at the window: the biggest cluster's share of an epoch is
    # one window's worth, about its share of clusters, not of proteins.
    order, bounds = data.homolog_layout(0)
    assert np.count_nonzero(order == biggest) == 1 and data.segment_lengths[biggest] == LENGTH
    assert data.segment_lengths.sum() < 0.85 * (lengths.sum() + len(lengths))


def test_min_cluster_members_keeps_multi_member_clusters_only(clustered_store_path, alphabet):
    data = dataset(clustered_store_path, "train", min_cluster_members=2)
    assert (np.diff(data.clusters.bounds) >= 2).all()
    windows = segments(itertools.islice(data, 5), alphabet)
    assert all(len(members) >= 2 or 1 + len(members[0]) + 1 >= LENGTH for w in windows for members in w)


def flat(batches):
    return [torch.cat([b["input_ids"].reshape(-1), b["labels"].reshape(-1)]) for b in batches]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_epochs_are_reproducible_reshuffled_and_seeded(clustered_store_path):
    def training(**options):  # the valid split read as training (shuffled per epoch): small and quick
        return dataset(clustered_store_path, "valid", train=True, objective="mlm", **options)

    data = training()
    first = flat(data)
    assert same(first, flat(training()))
    data.set_epoch(1)
    assert not same(first, flat(data))
    assert not same(first, flat(training(seed=1)))
    valid = dataset(clustered_store_path, "valid", train=False, objective="mlm")
    before = flat(valid)
    valid.set_epoch(3)
    assert same(before, flat(valid))  # evaluation: the same windows and masks every time


@pytest.mark.parametrize("world_size, workers", [(2, 1), (1, 3), (2, 2)])
def test_ranks_and_workers_read_disjoint_clusters_that_cover_the_split(world_size, workers, clustered_store_path,
                                                                       alphabet):
    whole = segments(list(dataset(clustered_store_path, "valid", train=False)), alphabet)
    parts = [segments(list(dataset(clustered_store_path, "valid", train=False, rank=rank, world_size=world_size,
                                   workers=workers)), alphabet) for rank in range(world_size)]
    pieces = sorted(map(str, (seg for part in parts for w in part for seg in w)))
    assert pieces == sorted(map(str, (seg for w in whole for seg in w)))
    train = [len(dataset(clustered_store_path, rank=rank, world_size=world_size, workers=workers))
             for rank in range(world_size)]
    assert len(set(train)) == 1  # training ranks run equally many batches


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_batches_follow_the_contract_for_both_objectives(objective, clustered_store_path, alphabet):
    for batch in itertools.islice(dataset(clustered_store_path, objective=objective), 20):
        ids, labels, padding = batch["input_ids"], batch["labels"], batch["padding_mask"]
        assert ids.shape == labels.shape and ids.shape[1] <= LENGTH and ids.dtype == labels.dtype == torch.int64
        mask = ids == alphabet.pad_idx
        assert (padding is None and not mask.any()) or torch.equal(padding, mask)
        assert (labels[mask] == IGNORE_INDEX).all()
        if objective == "clm":
            keep = ~mask[:, 1:]
            assert torch.equal(labels[:, :-1][keep], ids[:, 1:][keep])
        else:
            chosen = labels != IGNORE_INDEX
            assert chosen.any(dim=1).all()
            assert torch.isin(labels[chosen], torch.from_numpy(alphabet.residue_indices)).all()
            assert (ids[:, 0] == alphabet.cls_idx).all()  # specials are never masked


def test_homologs_need_a_store_built_with_clusters(sample_store_path):
    with pytest.raises(DataError, match=r"sample\.h5: data\.sampling=homologs needs a token store built with clusters"):
        dataset(sample_store_path)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_pass_saved_mid_epoch_resumes_with_the_batches_not_yet_consumed(num_workers, subset_fasta,
                                                                         subset_clusters, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "homolog-cache"

    def loader():
        datamodule = ProteinDataModule(fasta=str(subset_fasta), clusters=str(subset_clusters), cache_dir=str(cache),
                                       sampling="homologs", max_length=LENGTH, batch_size=8, valid_fraction=0.05,
                                       test_fraction=0.05, num_workers=num_workers, objective="mlm",
                                       min_cluster_members=5)  # the big clusters only: a short epoch
        datamodule.setup("fit")
        return datamodule.train_dataloader()

    first = loader()
    list(first)  # epoch 0
    epoch1 = list(first)
    consumed = 5
    first.consumed_source = lambda: consumed
    state = first.state_dict()
    assert state == {"epoch": 1, "consumed": consumed}
    fresh = loader()
    fresh.epoch_source = lambda: 1
    fresh.load_state_dict(state)
    assert same(flat(list(fresh)), flat(epoch1[consumed:]))


def test_a_given_store_without_clusters_is_refused_with_data_clusters(sample_store_path, subset_clusters):
    datamodule = ProteinDataModule(store=str(sample_store_path), clusters=str(subset_clusters))
    with pytest.raises(DataError, match=r"sample\.h5: data\.clusters is applied when a store is built"):
        datamodule.setup("fit")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_a_tiny_run_trains_on_homolog_windows(objective, tmp_path):
    cfg = compose_config(["experiment=homologs", "model=tiny", f"objective={objective}", "trainer.max_steps=3",
                          "trainer.val_check_interval=3", "trainer.num_sanity_val_steps=0", "logger=none",
                          "trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "data.max_length=256",
                          "model.max_length=256", "callbacks.progress_bar.refresh_rate=0",
                          f"data.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    assert cfg.data.sampling == "homologs" and cfg.data.clusters.endswith("swissprot_subset.clusters50.tsv.gz")
    result = train(cfg)
    assert np.isfinite(result.val_perplexity) and result.val_perplexity < 30
