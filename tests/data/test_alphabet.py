"""Alphabet: vocabulary layout, encoding rules, and the lookup-table fast path against a per-character reference."""
from __future__ import annotations

import numpy as np
import pytest

from protein_performer.data import Alphabet, frame
from protein_performer.data.alphabet import EXTRA_RESIDUES, STANDARD_AMINO_ACIDS, count_tokens


def reference_encode(alphabet: Alphabet, sequence: str) -> tuple[list[int], int]:
    """The encoding rules, one character at a time."""
    letters = list(sequence)
    while letters and letters[-1] in "*-. \t\r\n":  # trailing stops (and gaps/blanks among them)
        letters.pop()
    ids, unknown = [], 0
    for letter in letters:
        if letter in "-. \t\r\n\x0b\x0c":
            continue
        upper = letter.upper() if letter.isascii() else letter
        if upper in STANDARD_AMINO_ACIDS + EXTRA_RESIDUES:
            ids.append(alphabet.index(upper))
        else:
            ids.append(alphabet.unk_idx)
            unknown += 1
    return ids, unknown


def corrupt(sequence: str, rng: np.random.Generator) -> str:
    """A real sequence with what real files contain: lowercase runs, gaps, odd letters, stops."""
    letters = list(sequence)
    for i in rng.choice(len(letters), size=min(len(letters), 12), replace=False):
        letters[i] = rng.choice(["-", ".", "J", "*", "1", "é", "\x00", " ", letters[i].lower()])
    return "".join(letters) + rng.choice(["", "*", "**", "* ", "-*"])


def test_vocabulary_has_named_specials_and_the_residue_codes(alphabet):
    assert len(alphabet) == 30 == len(set(alphabet.tokens))
    specials = [alphabet.cls_idx, alphabet.pad_idx, alphabet.eos_idx, alphabet.unk_idx, alphabet.mask_idx]
    assert [alphabet.tokens[i] for i in specials] == ["<cls>", "<pad>", "<eos>", "<unk>", "<mask>"]
    assert "".join(alphabet.tokens[i] for i in alphabet.amino_acid_indices) == STANDARD_AMINO_ACIDS
    assert set(EXTRA_RESIDUES) <= set(alphabet.tokens)
    assert not set(specials) & set(alphabet.residue_indices.tolist())


def test_real_sequences_round_trip(alphabet, sample_records):
    for record in sample_records:
        ids = alphabet.encode(record.sequence)
        assert ids.dtype == np.uint8 and len(ids) == len(record.sequence)
        assert alphabet.decode(ids) == record.sequence


def test_encode_equals_the_per_character_reference_on_corrupted_real_sequences(alphabet, sample_records):
    rng = np.random.default_rng(0)
    for record in sample_records[:200]:
        sequence = corrupt(record.sequence, rng)
        ids, unknown = alphabet.encode_with_unknown_count(sequence)
        expected_ids, expected_unknown = reference_encode(alphabet, sequence)
        assert ids.tolist() == expected_ids, sequence
        assert unknown == expected_unknown


def test_lowercase_is_uppercased(alphabet, sample_records):
    sequence = sample_records[1].sequence
    np.testing.assert_array_equal(alphabet.encode(sequence.lower()), alphabet.encode(sequence))


@pytest.mark.parametrize("text, expected, unknown", [
    ("MKV*", "MKV", 0),  # a trailing stop codon is stripped
    ("MKV**\n", "MKV", 0),
    ("MK*V", "MK<unk>V", 1),  # a stop inside is not a residue
    ("M-K.V", "MKV", 0),  # alignment gaps are dropped
    ("MJKB", "M<unk>KB", 1),  # J is not a residue code (ESM's alphabet raises KeyError here)
    ("M\x00K", "M<unk>K", 1),  # never a crash, whatever the character
    ("Mé", "M<unk>", 1),
    ("", "", 0),
    ("***", "", 0),
], ids=["stop", "stops-newline", "inner-stop", "gaps", "J", "NUL", "non-ascii", "empty", "only-stops"])
def test_encoding_rules(alphabet, text, expected, unknown):
    ids, count = alphabet.encode_with_unknown_count(text)
    assert alphabet.decode(ids) == expected and count == unknown


def test_encoding_many_sequences_at_once_equals_one_at_a_time(alphabet, sample_records):
    rng = np.random.default_rng(1)
    sequences = [corrupt(r.sequence, rng).replace("\x00", "?").replace("1", "?")
                 for r in sample_records[:100]] + ["", "--", "A*"]
    raw = "".join(sequences).encode("latin-1", errors="replace")
    lengths = np.array([len(s.encode("latin-1", errors="replace")) for s in sequences])
    encoded = alphabet.encode_concatenated(raw, lengths)
    singles = [alphabet.encode(s) for s in sequences]
    assert encoded.lengths.tolist() == [len(s) for s in singles]
    assert encoded.tokens == b"".join(s.tobytes() for s in singles)
    assert encoded.unknown == sum(alphabet.encode_with_unknown_count(s)[1] for s in sequences)
    assert encoded.invalid_at == -1
    # Binary data is reported (where it is), not decoded: the preprocessor turns it into an error.
    binary = alphabet.encode_concatenated(raw + b"MK\x00V", np.append(lengths, 4))
    assert binary.invalid_at == len(raw) + 2
    digit = alphabet.encode_concatenated(raw + b"MKV12", np.append(lengths, 5))  # digits too: never residues
    assert digit.invalid_at == len(raw) + 3


def test_decode_rejects_ids_outside_the_vocabulary(alphabet):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        alphabet.decode([4, 30])


def test_frame_puts_each_row_between_cls_and_eos_then_pads(alphabet, sample_records):
    proteins = [alphabet.encode(record.sequence) for record in sample_records[:5]]
    tokens = np.concatenate(proteins)
    starts = np.cumsum([0] + [len(p) for p in proteins[:-1]]) + 3  # crops: skip each protein's first 3
    takes = np.array([len(p) - 3 for p in proteins])
    ids = frame(alphabet, tokens, starts, takes)
    assert ids.dtype == np.int64 and ids.shape == (5, takes.max() + 2)
    for row, protein, take in zip(ids, proteins, takes):
        expected = [alphabet.cls_idx, *protein[3:].tolist(), alphabet.eos_idx]
        assert row[:take + 2].tolist() == expected
        assert (row[take + 2:] == alphabet.pad_idx).all()
    empty = frame(alphabet, np.empty(0, dtype=np.uint8), [0], [0])
    assert empty.tolist() == [[alphabet.cls_idx, alphabet.eos_idx]]


@pytest.mark.parametrize("size", [0, 1, 2, 5, (1 << 16) - 1, 1 << 16, (1 << 16) + 1, 300_001])
def test_count_tokens_equals_bincount(alphabet, size):
    """The pair-counting fast path against np.bincount, odd and even lengths, on both sides of its threshold,
    and on an unaligned view (the split parts are slices of a chunk's tokens)."""
    rng = np.random.default_rng(size)
    tokens = rng.integers(0, len(alphabet), size + 1).astype(np.uint8)
    for view in (tokens[:size], tokens[1:]):
        counts = count_tokens(view, len(alphabet))
        assert counts.dtype == np.int64 and counts.tolist() == np.bincount(view, minlength=len(alphabet)).tolist()
    with pytest.raises(ValueError, match="token id 40 is outside"):
        count_tokens(np.append(tokens, np.uint8(40)), len(alphabet))
