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
