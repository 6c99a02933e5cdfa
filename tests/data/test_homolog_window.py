"""protein_performer.homologs.homolog_window builds the very windows data.sampling=homologs evaluates on."""
from __future__ import annotations

import numpy as np

from protein_performer.data import BatchSpec, TokenStore
from protein_performer.data.dataset import ProteinBatches
from protein_performer.homologs import homolog_window

LENGTH = 256  # short: several clusters are cut by the window's end


def record_of(piece: np.ndarray, records: dict[int, np.ndarray]) -> np.ndarray:
    """Evaluation crops a member at its start: its record is the one it equals, else the one it begins."""
    for tokens in records.values():
        if np.array_equal(tokens, piece):
            return tokens
    return next(tokens for tokens in records.values()
                if len(tokens) > len(piece) and np.array_equal(tokens[:len(piece)], piece))


def test_homolog_window_equals_the_samplers_segments(clustered_store_path, alphabet):
    """Every cluster segment of the evaluation windows, rebuilt from its members' full records in the order
    the sampler put them, is the same tokens."""
    spec = BatchSpec(objective="clm", sampling="homologs", max_length=LENGTH, batch_size=4)  # CLM: inputs unmasked
    data = ProteinBatches(clustered_store_path, "valid", spec, train=False, seed=0)
    with TokenStore(clustered_store_path) as store:
        records = {}
        for c in range(len(data.clusters)):
            for member in data.clusters.of(c).tolist():
                tokens = store.read_tokens(data.split, int(data.record_offsets[member]),
                                           int(data.record_offsets[member + 1]))
                records[member] = np.asarray(tokens, dtype=np.int64)
    checked = cut = 0
    for batch in data:
        for row in batch["input_ids"]:
            row = row[row != alphabet.pad_idx].numpy()
            starts = np.flatnonzero(row == alphabet.cls_idx).tolist() + [len(row)]
            for begin, end in zip(starts[:-1], starts[1:]):
                segment = row[begin:end]
                pieces = np.split(segment[1:], np.flatnonzero(segment[1:] == alphabet.eos_idx))
                pieces = [piece[piece != alphabet.eos_idx] for piece in pieces]
                pieces = [piece for piece in pieces if len(piece)]
                if len(pieces) < 2:
                    continue  # homolog_window needs a second member inside the window
                members = [record_of(piece, records) for piece in pieces]
                letters = [[alphabet.tokens[token] for token in tokens.tolist()] for tokens in members]
                if any(len(letter) != 1 for member in letters for letter in member):
                    continue  # a non-standard token would not round-trip through letters
                sequences = ["".join(member) for member in letters]
                window = homolog_window(alphabet, sequences, LENGTH)
                np.testing.assert_array_equal(window.tokens.numpy(), segment)
                assert len(window.members) == len(pieces)  # the members inside the window, where they sit
                for index, piece in enumerate(pieces):
                    assert window.members[index] == "".join(alphabet.tokens[token] for token in piece.tolist())
                    np.testing.assert_array_equal(segment[window.positions(index)], piece)
                checked += 1
                cut += segment[-1] != alphabet.eos_idx
    assert checked >= 5 and cut >= 1, (checked, cut)
