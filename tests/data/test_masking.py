"""Objectives: the 15% / 80-10-10 masked-LM recipe and aligned causal-LM labels, on real proteins."""
from __future__ import annotations

import numpy as np
import pytest

from protein_performer.data import IGNORE_INDEX, causal_lm_labels, mask_for_mlm


@pytest.fixture(scope="module")
def batch(sample_records, alphabet) -> np.ndarray:
    """<cls> residues <eos> <pad>... for 200 real proteins cropped to 300 residues: [200, 302]."""
    rows = [np.concatenate([[alphabet.cls_idx], alphabet.encode(r.sequence[:300]), [alphabet.eos_idx]])
            for r in sample_records[:200]]
    ids = np.full((len(rows), 302), alphabet.pad_idx, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return ids


def test_mlm_follows_the_recipe(batch, alphabet):
    inputs, labels = mask_for_mlm(batch, alphabet, np.random.default_rng(0))
    residue = np.isin(batch, alphabet.residue_indices)
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~residue).any()  # <cls> <eos> <pad> never chosen
    np.testing.assert_array_equal(labels[chosen], batch[chosen])
    np.testing.assert_array_equal(inputs[~chosen], batch[~chosen])  # only chosen positions change
    share = chosen.sum() / residue.sum()
    assert abs(share - 0.15) < 0.01, share  # ~54k residues: 4 standard errors is 0.006
    masked = inputs[chosen] == alphabet.mask_idx
    changed = ~masked & (inputs[chosen] != batch[chosen])
    kept = inputs[chosen] == batch[chosen]
    # 10% random amino acids, one in 20 of which happens to be the original residue.
    assert abs(masked.mean() - 0.8) < 0.02
    assert abs(changed.mean() - 0.1 * 19 / 20) < 0.015
    assert abs(kept.mean() - (0.1 + 0.1 / 20)) < 0.015
    assert np.isin(inputs[chosen][changed], alphabet.amino_acid_indices).all()
    assert chosen.any(axis=1).all()  # every protein contributes to the loss


def test_mlm_is_reproducible_and_seeded(batch, alphabet):
    first = mask_for_mlm(batch, alphabet, np.random.default_rng(7))
    again = mask_for_mlm(batch, alphabet, np.random.default_rng(7))
    other = mask_for_mlm(batch, alphabet, np.random.default_rng(8))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert (first[1] != other[1]).any()


def test_a_short_protein_always_gets_a_masked_residue(alphabet):
    ids = np.array([[alphabet.cls_idx, alphabet.index("M"), alphabet.eos_idx, alphabet.pad_idx]] * 50)
    _, labels = mask_for_mlm(ids, alphabet, np.random.default_rng(0))
    assert (labels[:, 1] == alphabet.index("M")).all() and (np.delete(labels, 1, axis=1) == IGNORE_INDEX).all()


def test_clm_labels_are_the_next_token_and_ignore_padding(batch, alphabet):
    labels = causal_lm_labels(batch, alphabet.pad_idx)
    lengths = (batch != alphabet.pad_idx).sum(axis=1)
    for row, length in zip(range(len(batch)), lengths):
        # logits[:, i] predicts labels[:, i] = the token after position i: residues then <eos>.
        np.testing.assert_array_equal(labels[row, :length - 1], batch[row, 1:length])
        assert labels[row, length - 2] == alphabet.eos_idx
        assert (labels[row, length - 1:] == IGNORE_INDEX).all()
