"""Residue vocabulary: one-letter amino-acid codes <-> uint8 token ids, through a byte lookup table."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["Alphabet", "EncodedSequences", "STANDARD_AMINO_ACIDS", "EXTRA_RESIDUES", "SPECIAL_TOKENS", "count_tokens",
           "frame"]

# Alphabetical one-letter order; MLM random replacement draws from these 20.
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
# X: unknown residue, B: D or N, Z: E or Q, U: selenocysteine, O: pyrrolysine. Real UniProt
# sequences carry all five, so each has its own token instead of <unk>.
EXTRA_RESIDUES = "XBZUO"
SPECIAL_TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>")

# Lookup-table codes that are not token ids (token ids are < 32).
DROP_CODE = 0xFF  # gap characters '-' '.' and whitespace: removed
INVALID_CODE = 0xFE  # control bytes (NUL, ...) and digits: never part of a protein (files with them are refused)
STOP_CODE = 0xFD  # '*': removed at the end of a sequence, <unk> inside it
# A translation holding none of these is already the sequences' token ids (encode_concatenated's fast case).
NON_TOKEN_CODES = bytes([DROP_CODE, INVALID_CODE, STOP_CODE])
_GAP_CHARACTERS = b"-."
_WHITESPACE = b" \t\r\n\x0b\x0c"
_CONTROL_BYTES = bytes(b for b in range(32) if b not in _WHITESPACE) + b"\x7f"
# Digits in sequence lines mean a numbered or tabular file, not residues: as <unk> they would shift
# every later residue's position (per-residue embeddings, labels), so the FASTA readers refuse them.
DIGITS = b"0123456789"


@dataclass(frozen=True)
class EncodedSequences:
    """Several sequences encoded at once (see `Alphabet.encode_concatenated`)."""

    tokens: bytes  # token ids of all sequences, concatenated
    lengths: np.ndarray  # int64 [n]: tokens per sequence after stops and gaps were removed
    unknown: int  # characters that became <unk>
    invalid_at: int  # offset in the input of the first control byte (binary data) or digit, or -1


class Alphabet:
    """The token vocabulary: <cls> <pad> <eos> <unk>, 20 standard amino acids, X B Z U O, <mask>.

    Ids (30 tokens): 0 <cls>, 1 <pad>, 2 <eos>, 3 <unk>, 4-23 ACDEFGHIKLMNPQRSTVWY, 24-28 XBZUO,
    29 <mask>. `encode` maps residues only; callers add <cls>/<eos> (a single-protein example is
    `<cls> residues <eos>`).

    Encoding rules: lowercase is upper-cased; trailing `*` (stop codons) are stripped; gap characters
    `-` `.` and whitespace are dropped; any other character (J, digits, `*` inside a sequence,
    non-ASCII, control bytes) becomes <unk> and is counted, so no input makes it fail (ESM's alphabet
    raises KeyError on 'J').

    The work is one `bytes.translate` through `table`, a 256-entry uint8 lookup table from byte value
    to token id (or a drop/stop/invalid code), followed by numpy on the whole buffer: no Python loop
    per residue or per sequence, so the preprocessor encodes thousands of proteins per call.
    """

    def __init__(self) -> None:
        self.tokens: list[str] = ["<cls>", "<pad>", "<eos>", "<unk>", *STANDARD_AMINO_ACIDS, *EXTRA_RESIDUES,
                                  "<mask>"]
        self._index = {token: i for i, token in enumerate(self.tokens)}
        self.cls_idx = self._index["<cls>"]
        self.pad_idx = self._index["<pad>"]
        self.eos_idx = self._index["<eos>"]
        self.unk_idx = self._index["<unk>"]
        self.mask_idx = self._index["<mask>"]
        # int64 so they index tensors directly.
        self.amino_acid_indices = np.array([self._index[a] for a in STANDARD_AMINO_ACIDS], dtype=np.int64)
        self.residue_indices = np.array([self._index[a] for a in STANDARD_AMINO_ACIDS + EXTRA_RESIDUES],
                                        dtype=np.int64)
        self.special_indices = np.array([self._index[t] for t in SPECIAL_TOKENS], dtype=np.int64)

        table = np.full(256, self.unk_idx, dtype=np.uint8)
        for letter in STANDARD_AMINO_ACIDS + EXTRA_RESIDUES:
            table[ord(letter)] = table[ord(letter.lower())] = self._index[letter]
        table[list(_GAP_CHARACTERS + _WHITESPACE)] = DROP_CODE
        table[list(_CONTROL_BYTES + DIGITS)] = INVALID_CODE
        table[ord("*")] = STOP_CODE
        table.flags.writeable = False
        self.table = table
        self._translation = table.tobytes()
        # An inner '*' survives the trailing-stop pass and becomes <unk>.
        self._stop_to_unk = bytes(self.unk_idx if b == STOP_CODE else b for b in range(256))
        # encode() turns control bytes into '?', an unknown character, before the lookup.
        self._control_to_unknown = bytes(ord("?") if table[b] == INVALID_CODE else b for b in range(256))
        self._decode_table = np.array(self.tokens, dtype=object)

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Alphabet({len(self)} tokens: {' '.join(self.tokens)})"

    def index(self, token: str) -> int:
        """Id of one token ('A', '<mask>', ...)."""
        try:
            return self._index[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a token of {self!r}") from None

    def encode(self, sequence: str | bytes) -> np.ndarray:
        """Residues -> token ids, uint8 [n] (n <= len(sequence); no <cls>/<eos> added)."""
        return self.encode_with_unknown_count(sequence)[0]

    def encode_with_unknown_count(self, sequence: str | bytes) -> tuple[np.ndarray, int]:
        """(token ids uint8 [n], how many characters became <unk>)."""
        raw = sequence.encode("latin-1", errors="replace") if isinstance(sequence, str) else bytes(sequence)
        if INVALID_CODE in self.translate(raw):
            # A control byte in a string handed to encode() is just an unknown character; files that
            # contain them are rejected by the FASTA reader instead.
            raw = raw.translate(self._control_to_unknown)
        encoded = self.encode_concatenated(raw, np.array([len(raw)], dtype=np.int64))
        return np.frombuffer(encoded.tokens, dtype=np.uint8).copy(), encoded.unknown

    def encode_concatenated(self, raw: bytes, lengths: np.ndarray) -> EncodedSequences:
        """Encode n sequences given as one byte string, lengths[i] bytes each (the store's fast path).

        Control bytes and digits are not decoded: `invalid_at` reports the first one and the caller
        decides (the preprocessor stops with an error naming the file and line).
        """
        coded = raw.translate(self._translation)
        invalid_at = coded.find(INVALID_CODE)
        lengths = np.asarray(lengths, dtype=np.int64)
        if STOP_CODE in coded:
            coded = self._drop_trailing_stops(coded, lengths).translate(self._stop_to_unk)
        if DROP_CODE in coded:
            codes = np.frombuffer(coded, dtype=np.uint8)
            dropped = np.concatenate([[0], np.cumsum(codes == DROP_CODE)])
            ends = np.cumsum(lengths)
            lengths = lengths - (dropped[ends] - dropped[ends - lengths])
            coded = coded.translate(None, bytes([DROP_CODE]))
        unknown = int(np.count_nonzero(np.frombuffer(coded, dtype=np.uint8) == self.unk_idx))
        return EncodedSequences(coded, lengths, unknown, invalid_at)

    @staticmethod
    def _drop_trailing_stops(coded: bytes, lengths: np.ndarray) -> bytes:
        """Mark each sequence's trailing run of stops (and gaps/blanks mixed in) for removal."""
        codes = np.frombuffer(coded, dtype=np.uint8).copy()
        ends = np.cumsum(lengths)
        active = np.flatnonzero(lengths > 0)
        back = 1
        while active.size:
            position = ends[active] - back
            code = codes[position]
            trailing = (code == STOP_CODE) | (code == DROP_CODE)
            codes[position[code == STOP_CODE]] = DROP_CODE
            active = active[trailing & (lengths[active] > back)]
            back += 1
        return codes.tobytes()

    def translate(self, raw: bytes) -> bytes:
        """The raw lookup: one output byte per input byte (a token id or a drop/stop/invalid code)."""
        return raw.translate(self._translation)

    @property
    def translation(self) -> bytes:
        """`table` as the 256 bytes `bytes.translate` takes: where the output holds none of
        NON_TOKEN_CODES it is the token ids `encode_concatenated` gives, lengths unchanged."""
        return self._translation

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Token ids -> text: residues as letters, special tokens as '<cls>' etc."""
        array = np.asarray(ids, dtype=np.int64).reshape(-1)
        outside = (array < 0) | (array >= len(self))
        if outside.any():
            raise ValueError(f"token id {array[outside][0]} is outside the vocabulary (0..{len(self) - 1})")
        return "".join(self._decode_table[array])


def frame(alphabet: Alphabet, tokens: np.ndarray, start: np.ndarray, take: np.ndarray) -> np.ndarray:
    """A batch as the model sees it: row b is <cls> tokens[start[b]:start[b] + take[b]] <eos>, then <pad>.

    The one place a protein gets its <cls>/<eos> frame (training batches, embedding, attention maps).
    tokens: residue ids (any int dtype) of all rows, flat; start, take: int [B]. Returns int64
    [B, max(take) + 2], built without a Python loop per row.
    """
    start = np.asarray(start, dtype=np.int64)
    take = np.asarray(take, dtype=np.int64)
    count = len(take)
    ids = np.full((count, int(take.max()) + 2), alphabet.pad_idx, dtype=np.int64)
    ids[:, 0] = alphabet.cls_idx
    ids[np.arange(count), take + 1] = alphabet.eos_idx
    before = np.cumsum(take) - take
    row = np.repeat(np.arange(count), take)
    within = np.arange(int(take.sum())) - np.repeat(before, take)
    ids[row, within + 1] = tokens[np.repeat(start, take) + within]
    return ids


_PAIRS_FROM = 1 << 16  # below this many tokens a plain bincount is cheaper than the 65,536 pair bins


def count_tokens(tokens: np.ndarray, size: int) -> np.ndarray:
    """How often each id in [0, size) occurs in uint8 `tokens`: int64 [size], as np.bincount(tokens, minlength=size).

    The token counts of a store's splits, over every residue: bincount casts each byte to a 64-bit
    index, so it reads adjacent bytes as one uint16 instead, half the elements to cast, and folds the
    65,536 pair counts back into byte counts (about 0.09 CPU s per 100 MB against 0.13).
    """
    tokens = np.ascontiguousarray(tokens, dtype=np.uint8)
    if len(tokens) < _PAIRS_FROM:
        counts = np.bincount(tokens, minlength=size)
    else:
        even = len(tokens) & ~1
        pairs = np.bincount(tokens[:even].view(np.uint16), minlength=1 << 16).reshape(256, 256)
        counts = pairs.sum(axis=0) + pairs.sum(axis=1)  # [high byte, low byte]: either byte of a pair
        if even < len(tokens):
            counts[tokens[-1]] += 1
    if len(counts) > size and counts[size:].any():
        raise ValueError(f"token id {int(np.flatnonzero(counts[size:])[0]) + size} is outside [0, {size})")
    return counts[:size].astype(np.int64)
