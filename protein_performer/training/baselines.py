"""Context-free baselines for a language model's held-out perplexity.

A protein LM has learned something only where it beats predictors that ignore the sequence around a
position. Two such predictors, scored on exactly the targets the model was scored on:
- uniform: every one of the 20 standard amino acids equally likely (perplexity 20 on standard targets);
- frequency: the training split's residue frequencies (plus <eos> for a causal LM, one per protein),
  about 18 on Swiss-Prot. For MLM it is still a lower bar than it looks: 10% of masked positions show
  the true residue, which a model may copy.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from protein_performer.data import IGNORE_INDEX, Alphabet, TokenStore

STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
# Tokens counted from a store that did not record its counts: the first ones of the split. Residue
# frequencies settle long before that (Swiss-Prot's whole train split is ~2e8), and a TrEMBL-sized split
# (~1e11) would otherwise be read end to end on rank 0 at the end of every run.
SAMPLE_TOKENS = 10_000_000
_READ_TOKENS = 1 << 22  # tokens per read: bounded memory

log = logging.getLogger(__name__)


def token_counts(store: TokenStore, split: str = "train", *, vocab_size: int, eos_idx: int | None = None,
                 sample_tokens: int = SAMPLE_TOKENS) -> np.ndarray:
    """int64 [vocab_size]: how often each token occurs in `split` (plus one `eos_idx` per record).

    Read from the counts the store recorded when it was built (`store.token_counts`), never by a scan of
    the split. A store without them is sampled: its first `sample_tokens` tokens are counted (with <eos>
    in proportion), which is the whole split for small stores; the log says so once.
    """
    recorded = getattr(store, "token_counts", None)
    recorded = recorded(split) if callable(recorded) else (recorded[split] if recorded is not None else None)
    counts = np.zeros(vocab_size, dtype=np.int64)
    records = store.split_sizes[split]
    if recorded is not None:
        recorded = np.asarray(recorded, dtype=np.int64)[:vocab_size]
        counts[: len(recorded)] = recorded
    else:
        total = store.split_residues[split]
        end = min(total, sample_tokens)
        if end < total:
            _say_once(f"{getattr(store, 'path', 'the token store')} records no token counts (built by an older "
                      f"version): baseline frequencies come from the first {end:,} of the {split} split's "
                      f"{total:,} tokens")
            records = round(records * end / total)
        for begin in range(0, end, _READ_TOKENS):
            counts += np.bincount(store.read_tokens(split, begin, min(begin + _READ_TOKENS, end)),
                                  minlength=vocab_size)[:vocab_size]
    if eos_idx is not None:
        counts[eos_idx] += records
    return counts


@functools.cache
def _say_once(message: str) -> None:
    log.warning(message)


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
