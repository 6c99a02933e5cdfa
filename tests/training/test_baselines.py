"""Context-free baselines: token counts of a split, and the perplexities they give on scored targets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protein_performer.data import IGNORE_INDEX, Alphabet, SplitSpec, TokenStore, build_token_store
from protein_performer.training.baselines import STANDARD_AMINO_ACIDS, context_free_baselines, token_counts


@pytest.fixture(scope="module")
def alphabet() -> Alphabet:
    return Alphabet()


def test_token_counts_equal_a_direct_count_of_the_split(data_dir, tmp_path, alphabet: Alphabet):
    path = tmp_path / "sample.h5"
    build_token_store(data_dir / "uniprot_sample.fasta", path,
                      split=SplitSpec(valid_fraction=0.2, test_fraction=0.2), progress=False)
    with TokenStore(path) as store:
        train = store.split_sizes["train"]
        direct = np.zeros(len(alphabet), dtype=np.int64)
        for i in range(train):  # global indices run over the train split first
            assert store.split(i) == "train"
            np.add.at(direct, store.tokens(i).astype(np.int64), 1)
        counts = token_counts(store, "train", vocab_size=len(alphabet))
        with_eos = token_counts(store, "train", vocab_size=len(alphabet), eos_idx=alphabet.eos_idx)
    np.testing.assert_array_equal(counts, direct)
    assert 0 < train < 500 and counts.sum() > 0
    assert with_eos[alphabet.eos_idx] == counts[alphabet.eos_idx] + train


def test_frequency_baseline_is_the_mean_log_probability_of_the_targets(alphabet: Alphabet):
    counts = np.zeros(len(alphabet), dtype=np.int64)
    a, c, x = alphabet.index("A"), alphabet.index("C"), alphabet.index("X")
    counts[a], counts[c] = 70, 29
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[0, 3], labels[1, 0], labels[1, 4] = a, a, c, x
    result = context_free_baselines([{"labels": labels[:1]}, {"labels": labels[1:]}], counts, alphabet)
    total = counts.sum() + len(counts)  # add-one smoothing over the vocabulary
    expected = math.exp(-(2 * math.log(71 / total) + math.log(30 / total) + math.log(1 / total)) / 4)
    assert result.targets == 4 and result.nonstandard == 1
    assert result.frequency == pytest.approx(expected, rel=1e-12)
    assert result.uniform == len(STANDARD_AMINO_ACIDS) == 20


def test_a_split_with_nothing_scored_is_refused(alphabet: Alphabet):
    empty = {"labels": torch.full((1, 4), IGNORE_INDEX)}
    with pytest.raises(ValueError, match="no scored targets"):
        context_free_baselines([empty], np.ones(len(alphabet), dtype=np.int64), alphabet)


class LargeStore:
    """A store's split of 1e11 tokens that records which token ranges are read."""

    path = "trembl.h5"
    split_sizes = {"train": 300_000_000}
    split_residues = {"train": 100_000_000_000}

    def __init__(self) -> None:
        self.read: list[tuple[int, int]] = []

    def read_tokens(self, split: str, begin: int, end: int) -> np.ndarray:
        self.read.append((begin, end))
        return np.full(end - begin, 5, dtype=np.uint8)


def test_a_store_without_recorded_counts_is_sampled_never_scanned(alphabet: Alphabet, caplog):
    store = LargeStore()
    counts = token_counts(store, "train", vocab_size=len(alphabet), eos_idx=alphabet.eos_idx, sample_tokens=1000)
    assert store.read[0][0] == 0 and max(end for _, end in store.read) == 1000  # the first 1000 tokens only
    assert counts[5] == 1000
    assert counts[alphabet.eos_idx] == 3  # <eos> in proportion: 3e8 records per 1e11 tokens
    assert "trembl.h5 records no token counts" in caplog.text


def test_recorded_counts_are_used_without_reading_the_split(alphabet: Alphabet):
    store = LargeStore()
    recorded = np.arange(len(alphabet), dtype=np.int64)
    store.token_counts = {"train": recorded}
    counts = token_counts(store, "train", vocab_size=len(alphabet), eos_idx=alphabet.eos_idx)
    assert not store.read
    expected = recorded.copy()
    expected[alphabet.eos_idx] += 300_000_000
    np.testing.assert_array_equal(counts, expected)
