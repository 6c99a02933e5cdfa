"""Context-free baselines for a language model's held-out perplexity.

A protein LM has learned something only where it beats predictors that ignore the sequence around a
position. Two such predictors, scored on exactly the targets the model was scored on:
- uniform: every one of the 20 standard amino acids equally likely (perplexity 20 on standard targets);
- frequency: the training split's residue frequencies (plus <eos> for a causal LM, one per protein),
  about 18 on Swiss-Prot. For MLM it is still a lower bar than it looks: 10% of masked positions show
  the true residue, which a model may copy.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from protein_performer.data import IGNORE_INDEX, Alphabet, TokenStore

STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
_READ_TOKENS = 1 << 24  # tokens per read when counting a split: bounded memory on any store size


def token_counts(store: TokenStore, split: str = "train", *, vocab_size: int, eos_idx: int | None = None) -> np.ndarray:
    """int64 [vocab_size]: how often each token occurs in `split` (plus one `eos_idx` per record)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    total = store.split_residues[split]
    for begin in range(0, total, _READ_TOKENS):
        counts += np.bincount(store.read_tokens(split, begin, min(begin + _READ_TOKENS, total)),
                              minlength=vocab_size)[:vocab_size]
    if eos_idx is not None:
        counts[eos_idx] += store.split_sizes[split]
    return counts


@dataclass(frozen=True)
class Baselines:
    """Perplexities of the context-free predictors on a set of scored targets."""

    targets: int  # scored target tokens
    uniform: float  # uniform over the 20 standard amino acids, on the standard targets
    frequency: float  # training-split frequencies (add-one smoothed), on every target
    nonstandard: int  # targets outside the 20 (X, U, <eos>, ...): the uniform predictor skips them

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/baseline_uniform_perplexity": self.uniform,
                f"{prefix}/baseline_frequency_perplexity": self.frequency}


def context_free_baselines(batches: Iterable[Mapping[str, Tensor]], counts: np.ndarray,
                           alphabet: Alphabet) -> Baselines:
    """Score the uniform and frequency predictors on every label != IGNORE_INDEX of `batches`.

    counts: token counts of the training split (`token_counts`), one entry per vocabulary token.
    """
    log_frequency = np.log(counts + 1.0) - math.log(float(counts.sum() + len(counts)))
    standard = np.zeros(len(counts), dtype=bool)
    standard[[alphabet.index(residue) for residue in STANDARD_AMINO_ACIDS]] = True
    seen = np.zeros(len(counts), dtype=np.int64)  # how often each token is a scored target
    for batch in batches:
        labels = batch["labels"].numpy().ravel()
        seen += np.bincount(labels[labels != IGNORE_INDEX], minlength=len(counts))[:len(counts)]
    targets = int(seen.sum())
    if targets == 0:
        raise ValueError("no scored targets: the split is empty")
    frequency = math.exp(-float(seen @ log_frequency) / targets)
    nonstandard = int(seen[~standard].sum())
    uniform = float(len(STANDARD_AMINO_ACIDS)) if targets > nonstandard else math.nan
    return Baselines(targets=targets, uniform=uniform, frequency=frequency, nonstandard=nonstandard)
