"""Target sets: member index in homolog windows, and which scored positions each set keeps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from protein_performer.data import IGNORE_INDEX, Alphabet, mask_for_mlm
from protein_performer.training.targets import member_index, target_masks, target_member_index, target_set_names

ALPHABET = Alphabet()
C, E, M = ALPHABET.cls_idx, ALPHABET.eos_idx, ALPHABET.mask_idx
A, G = ALPHABET.index("A"), ALPHABET.index("G")


def _window(layout: str) -> torch.Tensor:
    """Tokens from a layout string: c = <cls>, e = <eos>, r = a residue, m = <mask>."""
    return torch.tensor([{"c": C, "e": E, "r": A, "m": M}[ch] for ch in layout])


@pytest.mark.parametrize(("layout", "expected"), [
    ("crrerrrerr", "0000111122"),  # one cluster of three members (the last cropped mid-member)
    ("crrercrrerr", "00001000011"),  # two clusters packed in one window: counting restarts at <cls>
    ("rrercrr", "0001000"),  # a window cut inside a cluster: counted from the window start
    ("rrerrerr", "00011122"),  # no <cls> at all
    ("ccrre", "00000"),  # a cluster of one member right after an empty one
], ids=["one-cluster", "two-clusters", "starts-mid-cluster", "no-cls", "adjacent-cls"])
def test_member_index_counts_eos_since_the_last_cls(layout, expected):
    tokens = _window(layout)
    assert member_index(tokens, C, E).tolist() == [int(ch) for ch in expected]
    # Batched along the last dimension, rows independent.
    batch = torch.stack([tokens, tokens.flip(0)])
    assert torch.equal(member_index(batch, C, E)[0], member_index(tokens, C, E))
    assert torch.equal(member_index(batch, C, E)[1], member_index(tokens.flip(0), C, E))


def test_causal_targets_take_the_member_of_the_next_token():
    tokens = _window("crrerrecrre")
    # labels[i] = tokens[i + 1]: its member index is member_index at i + 1 (0 where that is a <cls>).
    shifted = member_index(tokens, C, E)[1:]
    assert shifted.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert torch.equal(target_member_index(tokens, True, C, E)[:-1], shifted)
    # At the last position the next token is outside the window: an <eos> there closes a member.
    assert target_member_index(_window("crrerre"), True, C, E)[-1] == 2
    assert target_member_index(_window("crrerr"), True, C, E)[-1] == 1
    assert torch.equal(target_member_index(tokens, False, C, E), member_index(tokens, C, E))


def test_masked_set_keeps_only_positions_shown_as_mask_not_the_random_or_unchanged_tenth():
    rng = np.random.default_rng(0)
    ids = np.concatenate([[C], rng.choice(ALPHABET.amino_acid_indices, 4000), [E]])[None].astype(np.int64)
    inputs, labels = mask_for_mlm(ids, ALPHABET, rng)
    inputs, labels = torch.from_numpy(inputs), torch.from_numpy(labels)
    sets = target_masks(inputs, labels, ("all", "masked"), causal=False, alphabet=ALPHABET)
    scored = labels != IGNORE_INDEX
    assert torch.equal(sets[0], scored)
    assert torch.equal(sets[1], scored & (inputs == M))
    shown_other = scored & (inputs != M)  # the random 10% and the unchanged 10%
    unchanged = shown_other & (inputs == labels)
    assert unchanged.any() and (shown_other & ~unchanged).any()
    assert not (sets[1] & shown_other).any()
    assert 0.75 < sets[1].sum() / scored.sum() < 0.85


def test_member_sets_split_the_masked_targets_into_first_and_later():
    inputs = _window("crmerrmemrcmre").unsqueeze(0)
    labels = torch.where(inputs == M, G, IGNORE_INDEX)
    labels[0, 1] = A  # a scored target shown unchanged: in `all` only
    names = target_set_names("mlm", members=True)
    assert names == ("all", "masked", "masked_first", "masked_later")
    sets = target_masks(inputs, labels, names, causal=False, alphabet=ALPHABET)[:, 0]
    positions = {name: sets[i].nonzero().flatten().tolist() for i, name in enumerate(names)}
    assert positions == {"all": [1, 2, 6, 8, 11], "masked": [2, 6, 8, 11], "masked_first": [2, 11],
                         "masked_later": [6, 8]}


def test_causal_member_sets_cover_all_targets():
    assert target_set_names("clm", members=True) == ("all", "first", "later")
    assert target_set_names("clm") == ("all",) and target_set_names("mlm") == ("all", "masked")
    tokens = _window("crrerre").unsqueeze(0)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[0, :-1] = tokens[0, 1:]
    sets = target_masks(tokens, labels, ("all", "first", "later"), causal=True, alphabet=ALPHABET)[:, 0]
    # Targets at 1..6 are tokens r r e | r r e: the first member's residues and its <eos>, then the second's.
    assert sets[1].nonzero().flatten().tolist() == [0, 1, 2]
    assert sets[2].nonzero().flatten().tolist() == [3, 4, 5]
    assert torch.equal(sets[1] | sets[2], sets[0])


def test_unknown_target_set_and_missing_inputs_are_refused():
    labels = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown target sets"):
        target_masks(labels, labels, ("all", "nope"), causal=False, alphabet=ALPHABET)
    with pytest.raises(ValueError, match="need the batch's input_ids"):
        target_masks(None, labels, ("all", "masked"), causal=False, alphabet=ALPHABET)
    with pytest.raises(ValueError, match="objective"):
        target_set_names("xlm")
