"""Training targets: masked-LM corruption (BERT/ESM recipe) and causal-LM next-token labels.

Both take token ids [batch, length] (int64, <pad> at padding) and return labels of the same shape
with IGNORE_INDEX (-100) wherever there is nothing to predict, so a training step is
`cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)` for either objective.
"""
from __future__ import annotations

import numpy as np

from protein_performer.data.alphabet import Alphabet

__all__ = ["IGNORE_INDEX", "OBJECTIVES", "mask_for_mlm", "causal_lm_labels"]

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
OBJECTIVES = ("mlm", "clm")


def mask_for_mlm(ids: np.ndarray, alphabet: Alphabet, rng: np.random.Generator, *, probability: float = 0.15,
                 mask_fraction: float = 0.8, random_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Masked-LM inputs and labels from token ids [batch, length] (int64).

    Each residue position (a residue token: not <cls> <pad> <eos> <unk> <mask>) is chosen with
    `probability`; a sequence with residues but no chosen position gets one, so every example
    contributes to the loss. Of the chosen positions, `mask_fraction` become <mask>,
    `random_fraction` a uniformly drawn standard amino acid, the rest stay unchanged. Labels hold the
    original token at chosen positions and IGNORE_INDEX elsewhere.

    Returns (inputs int64 [batch, length], labels int64 [batch, length]); `ids` is not modified.
    """
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"mask probability must be in (0, 1], got {probability}")
    if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
        raise ValueError(f"mask_fraction + random_fraction must be within [0, 1], got {mask_fraction} + "
                         f"{random_fraction}")
    eligible = np.isin(ids, alphabet.residue_indices)
    chosen = eligible & (rng.random(ids.shape) < probability)
    empty = np.flatnonzero(eligible.any(axis=1) & ~chosen.any(axis=1))
    if empty.size:
        # One uniformly random residue of each row that drew none.
        scores = np.where(eligible[empty], rng.random((len(empty), ids.shape[1])), -1.0)
        chosen[empty, scores.argmax(axis=1)] = True
    labels = np.where(chosen, ids, IGNORE_INDEX)
    action = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[chosen & (action < mask_fraction)] = alphabet.mask_idx
    replace = chosen & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    inputs[replace] = rng.choice(alphabet.amino_acid_indices, size=int(replace.sum()))
    return inputs, labels


def causal_lm_labels(ids: np.ndarray, pad_idx: int) -> np.ndarray:
    """Next-token labels for token ids [batch, length]: labels[:, i] = ids[:, i + 1].

    Aligned so that logits[:, i] (computed from ids[:, :i + 1]) predicts labels[:, i]: no further
    shifting in the loss. The last position, and every position whose next token is <pad>, get
    IGNORE_INDEX.
    """
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    labels[:, :-1] = ids[:, 1:]
    labels[labels == pad_idx] = IGNORE_INDEX
    return labels
