"""Where later members of a homolog window look in earlier ones (protein_performer.homologs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from protein_performer import ops
from protein_performer.data import Alphabet, SplitSpec
from protein_performer.homologs import (
    HomologAttention,
    HomologWindow,
    align_members,
    aligned_attention,
    aligned_offset_profile,
    cluster_split,
    homolog_attention,
    homolog_window,
    mask_later_members,
    member_alignments,
    read_cluster_members,
    read_sequences,
    with_attention,
)
from protein_performer.maps import attention_maps_of_tokens, query_keys
from protein_performer.model import PerformerConfig, ProteinPerformer

FIRST = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
# FIRST with "GWG" inserted after residue 14: a global alignment pairs everything else one to one.
INSERTED = FIRST[:14] + "GWG" + FIRST[14:]


@pytest.fixture(scope="module")
def alphabet() -> Alphabet:
    return Alphabet()


def tiny_model(alphabet: Alphabet, attention: str, seed: int = 0) -> ProteinPerformer:
    torch.manual_seed(seed)
    config = PerformerConfig(vocab_size=len(alphabet), d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0,
                             attention=attention, nb_features=32, max_length=128, pad_idx=alphabet.pad_idx)
    return ProteinPerformer(config).eval()


def test_window_is_cls_members_joined_by_eos_as_the_sampler_builds_it(alphabet):
    window = homolog_window(alphabet, [FIRST, INSERTED, "MKTAY"], max_length=128)
    assert alphabet.decode(window.tokens) == f"<cls>{FIRST}<eos>{INSERTED}<eos>MKTAY<eos>"
    assert window.members == [FIRST, INSERTED, "MKTAY"]
    assert window.starts.tolist() == [1, len(FIRST) + 2, len(FIRST) + len(INSERTED) + 3]
    for member, sequence in enumerate(window.members):
        assert alphabet.decode(window.tokens[window.positions(member)]) == sequence


def test_window_is_cut_at_max_length_and_members_cropped_to_it(alphabet):
    window = homolog_window(alphabet, [FIRST, INSERTED, "MKTAY"], max_length=len(FIRST) + 12)
    assert len(window.tokens) == len(FIRST) + 12
    assert window.members == [FIRST, INSERTED[:10]]  # the third member lies wholly past the end
    # A member longer than max_length - 2 residues is cropped to them, as the sampler crops: it fills the window.
    with pytest.raises(ValueError, match="holds only the first member"):
        homolog_window(alphabet, [FIRST * 3, FIRST], max_length=40)


def test_window_needs_a_second_member_inside_it(alphabet):
    with pytest.raises(ValueError, match="at least two member"):
        homolog_window(alphabet, [FIRST], max_length=128)
    with pytest.raises(ValueError, match="holds only the first member"):
        homolog_window(alphabet, [FIRST, FIRST], max_length=len(FIRST) + 2)


def test_alignment_pairs_around_an_insertion():
    pairs = align_members(INSERTED, FIRST)
    expected = [(i, i) for i in range(14)] + [(i + 3, i) for i in range(14, len(FIRST))]
    assert pairs.tolist() == [list(pair) for pair in expected]


def test_unknown_letters_align_as_x():
    pairs = align_members("MKTAJYIAK", "MKTAXYIAK")
    assert pairs.tolist() == [[i, i] for i in range(9)]


def hand_built_maps(window: HomologWindow, pairs: np.ndarray) -> torch.Tensor:
    """[1, 3, T, T]: head 0 looks exactly at the aligned residue (a later residue without one looks at
    itself, every other row at <cls>), head 1 spreads evenly over all tokens, head 2 looks at itself."""
    length = len(window.tokens)
    maps = torch.zeros(1, 3, length, length, dtype=torch.float64)
    maps[0, 0, :, 0] = 1
    later, earlier = window.positions(1), window.positions(0)
    for row in later:
        maps[0, 0, row] = 0
        maps[0, 0, row, row] = 1
    for i, j in pairs:
        maps[0, 0, later[i]] = 0
        maps[0, 0, later[i], earlier[j]] = 1
    maps[0, 1] = 1 / length
    maps[0, 2] = torch.eye(length, dtype=torch.float64)
    return maps


def test_aligned_attention_of_a_map_that_looks_at_the_aligned_residue(alphabet):
    window = homolog_window(alphabet, [FIRST, INSERTED], max_length=128)
    pairs = align_members(INSERTED, FIRST)
    stats = aligned_attention(hand_built_maps(window, pairs), window)
    length = len(window.tokens)
    assert stats.aligned_pairs == len(FIRST) and stats.later_residues == len(INSERTED)
    np.testing.assert_array_equal(stats.alignments[(1, 0)], pairs)
    # Head 0: all weight on the aligned residue, spread over the earlier member that is one residue in len(FIRST).
    np.testing.assert_allclose(stats.aligned[0], [1.0, 1 / length, 0.0])
    np.testing.assert_allclose(stats.chance[0], [1 / len(FIRST), 1 / length, 0.0])
    np.testing.assert_allclose(stats.lift[0, :2], [len(FIRST), 1.0])
    assert stats.top1[0, 0] == 1.0
    # Share of a later member's mass on the earlier one: aligned rows only (head 0), its length / T (head 1).
    np.testing.assert_allclose(stats.earlier_share[0], [len(FIRST) / len(INSERTED), len(FIRST) / length, 0.0])


def test_offset_profile_peaks_where_the_head_looks(alphabet):
    window = homolog_window(alphabet, [FIRST, INSERTED], max_length=128)
    pairs = align_members(INSERTED, FIRST)
    maps = hand_built_maps(window, pairs)
    profile = aligned_offset_profile(maps, window, {(1, 0): pairs}, max_offset=3)
    assert profile.shape == (1, 3, 7)
    np.testing.assert_allclose(profile[0, 0], [0, 0, 0, 1, 0, 0, 0])  # exactly the aligned residue
    np.testing.assert_allclose(profile[0, 1], 1 / len(window.tokens))  # even attention: flat
    # One residue to the right of the aligned one: the peak moves to offset +1.
    shifted = torch.zeros_like(maps[:, :1])
    later, earlier = window.positions(1), window.positions(0)
    for i, j in pairs:
        shifted[0, 0, later[i], earlier[min(j + 1, len(FIRST) - 1)]] = 1
    assert aligned_offset_profile(shifted, window, {(1, 0): pairs}, max_offset=3)[0, 0].argmax() == 4


def test_a_head_that_looks_for_the_same_amino_acid_has_a_lift_but_none_over_same_letters(alphabet):
    """Between identical aligned letters, attending evenly to every residue of the same amino acid gives the
    aligned residue more than chance (lift > 1), but no more than the other residues of that amino acid."""
    window = homolog_window(alphabet, [FIRST, INSERTED], max_length=128)
    pairs = align_members(INSERTED, FIRST)
    length = len(window.tokens)
    maps = torch.zeros(1, 1, length, length)
    maps[..., 0] = 1
    earlier = window.positions(0)
    for i, row in enumerate(window.positions(1)):
        alike = [earlier[j] for j, letter in enumerate(FIRST) if letter == INSERTED[i]]
        if alike:
            maps[0, 0, row] = 0
            maps[0, 0, row, alike] = 1 / len(alike)
    stats = aligned_attention(maps, window)
    assert stats.lift[0, 0] > 3
    # Pairs whose amino acid occurs only once in FIRST have no same-letter residue to compare with.
    unique = sum(FIRST.count(FIRST[j]) == 1 for _, j in pairs)
    assert stats.same_letter_pairs == len(pairs) - unique
    repeated = [j for _, j in pairs if FIRST.count(FIRST[j]) > 1]
    np.testing.assert_allclose(stats.same_letter[0, 0], np.mean([1 / FIRST.count(FIRST[j]) for j in repeated]))
    exact = aligned_attention(hand_built_maps(window, pairs), window)
    assert exact.same_letter[0, 0] == 0 and np.isinf(exact.lift_over_same_letter[0, 0])
    np.testing.assert_allclose(exact.lift_over_same_letter[0, 1], 1.0)


def test_aligned_attention_pools_every_later_earlier_pair(alphabet):
    """Three members: head 0 attends only to the aligned residue in the FIRST member, so it is perfect on
    the pairs (1, 0), (2, 0) and scores nothing on (2, 1); the means run over all three pairs."""
    window = homolog_window(alphabet, [FIRST, INSERTED, FIRST], max_length=128)
    stats = aligned_attention(torch.zeros(1, 1, len(window.tokens), len(window.tokens)), window)
    maps = torch.zeros(1, 1, len(window.tokens), len(window.tokens))
    maps[..., 0] = 1
    for later in (1, 2):
        rows = window.positions(later)
        maps[0, 0, rows] = 0
        for i, j in stats.alignments[(later, 0)]:
            maps[0, 0, rows[i], window.positions(0)[j]] = 1
    stats = aligned_attention(maps, window)
    with_first = len(stats.alignments[(1, 0)]) + len(stats.alignments[(2, 0)])
    assert stats.aligned_pairs == with_first + len(stats.alignments[(2, 1)])
    np.testing.assert_allclose(stats.aligned[0, 0], with_first / stats.aligned_pairs)


def test_pooled_windows_weigh_means_by_their_pairs(alphabet):
    two = homolog_window(alphabet, [FIRST, INSERTED], max_length=128)
    three = homolog_window(alphabet, [FIRST, INSERTED, FIRST], max_length=128)
    results = [aligned_attention(torch.full((1, 1, len(w.tokens), len(w.tokens)), 1.0 / len(w.tokens)), w)
               for w in (two, three)]
    pooled = HomologAttention.pooled(results)
    assert pooled.aligned_pairs == results[0].aligned_pairs + results[1].aligned_pairs
    expected = (len(FIRST) / len(two.tokens) + 1.0 / len(three.tokens) * results[1].aligned_pairs) / pooled.aligned_pairs
    np.testing.assert_allclose(pooled.aligned[0, 0], expected)
    np.testing.assert_allclose(pooled.lift, 1.0)  # uniform attention has no preference in any window
    np.testing.assert_allclose(pooled.lift_over_same_letter, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        HomologAttention.pooled([])


def test_aligned_attention_rejects_maps_of_another_window(alphabet):
    window = homolog_window(alphabet, [FIRST, INSERTED], max_length=128)
    with pytest.raises(ValueError, match="maps must be"):
        aligned_attention(torch.zeros(1, 1, 5, 5), window)


def reference_statistics(maps: torch.Tensor, window: HomologWindow) -> dict[str, np.ndarray]:
    """Residue by residue loops over the same definitions, [layers, heads] each."""
    layers, heads = maps.shape[:2]
    out = {name: np.zeros((layers, heads)) for name in ("aligned", "chance", "share", "same")}
    for layer in range(layers):
        for head in range(heads):
            matrix = maps[layer, head].double().numpy()
            aligned, chance, share, same, pairs, residues, same_pairs = 0.0, 0.0, 0.0, 0.0, 0, 0, 0
            for later in range(1, len(window.members)):
                for row in window.positions(later):
                    share += sum(matrix[row, window.positions(e)].sum() for e in range(later))
                    residues += 1
                for earlier in range(later):
                    for i, j in align_members(window.members[later], window.members[earlier]):
                        row = window.positions(later)[i]
                        aligned += matrix[row, window.positions(earlier)[j]]
                        chance += matrix[row, window.positions(earlier)].mean()
                        pairs += 1
                        letter = window.members[earlier][j]
                        others = [window.positions(earlier)[o] for o, other in enumerate(window.members[earlier])
                                  if other == letter and o != j]
                        if others:
                            same += matrix[row, others].mean()
                            same_pairs += 1
            out["aligned"][layer, head] = aligned / pairs
            out["chance"][layer, head] = chance / pairs
            out["share"][layer, head] = share / residues
            out["same"][layer, head] = same / same_pairs
    return out


@pytest.mark.parametrize("attention", ["softmax", "favor"])
def test_homolog_attention_of_a_tiny_model_matches_the_residue_loop(alphabet, attention):
    model = tiny_model(alphabet, attention)
    window, maps, stats = homolog_attention(model, alphabet, [FIRST, INSERTED, FIRST[5:]])
    assert maps.shape == (2, 2, len(window.tokens), len(window.tokens))
    with torch.no_grad():
        expected = model(window.tokens[None], return_attention=True).attentions[0]
    torch.testing.assert_close(maps, expected)
    reference = reference_statistics(maps, window)
    np.testing.assert_allclose(stats.aligned, reference["aligned"], rtol=1e-6)
    np.testing.assert_allclose(stats.chance, reference["chance"], rtol=1e-6)
    np.testing.assert_allclose(stats.earlier_share, reference["share"], rtol=1e-6)
    np.testing.assert_allclose(stats.same_letter, reference["same"], rtol=1e-6)
    assert "| 2 | 1 |" in stats.to_markdown()


def test_masked_queries_are_later_residues_shown_as_mask_and_only_they_are_measured(alphabet):
    window = homolog_window(alphabet, [FIRST, INSERTED, FIRST[5:]], 128)
    tokens, masked = mask_later_members(alphabet, window, 0.4, np.random.default_rng(3))
    assert set(masked) == {1, 2} and all(0 < flags.sum() < len(flags) for flags in masked.values())
    changed = torch.nonzero(tokens != window.tokens).flatten()
    expected = np.concatenate([window.starts[later] + np.flatnonzero(masked[later]) for later in (1, 2)])
    assert changed.tolist() == expected.tolist() and (tokens[changed] == alphabet.mask_idx).all()
    everything, only_masked = member_alignments(window), member_alignments(window, masked=masked)
    for (later, earlier), pairs in only_masked.items():
        assert masked[later][pairs[:, 0]].all()
        kept = everything[(later, earlier)]
        assert len(pairs) == masked[later][kept[:, 0]].sum() < len(kept)
    # one seed, one window: every model is measured on the same masked queries
    model = tiny_model(alphabet, "softmax")
    first = homolog_attention(model, alphabet, [FIRST, INSERTED, FIRST[5:]], mask_rate=0.4, seed=3)
    again = homolog_attention(with_attention(model, attention="favor"), alphabet, [FIRST, INSERTED, FIRST[5:]],
                              mask_rate=0.4, seed=3)
    assert first[2].aligned_pairs == again[2].aligned_pairs == sum(len(p) for p in only_masked.values())
    with torch.no_grad():
        expected_maps = model(tokens[None], return_attention=True).attentions[0]
    torch.testing.assert_close(first[1], expected_maps)
    with pytest.raises(ValueError, match="mask_rate"):
        mask_later_members(alphabet, window, 1.0, np.random.default_rng(0))


def test_with_attention_keeps_the_weights_and_changes_only_the_attention(alphabet):
    favor = tiny_model(alphabet, "favor")
    softmax = with_attention(favor, attention="softmax")
    assert softmax.config.attention == "softmax" and softmax.blocks[0].attention.projection is None
    tokens = homolog_window(alphabet, [FIRST, INSERTED], 128).tokens
    swapped_parameters = dict(softmax.named_parameters())
    for name, parameter in favor.named_parameters():
        torch.testing.assert_close(swapped_parameters[name], parameter, rtol=0, atol=0)
    # The first layer sees the same input, so it attends with the same q, k (later ones differ with the attention).
    torch.testing.assert_close(query_keys(softmax, alphabet, FIRST)[0], query_keys(favor, alphabet, FIRST)[0])
    # The swapped model's maps are exact softmax of the same q, k; back to FAVOR+ they are its estimate.
    (q, k), _ = query_keys(softmax, alphabet, "MKTAY")
    exact = ops.softmax_attention_weights(q, k)[0]
    torch.testing.assert_close(attention_maps_of_tokens(softmax, torch.as_tensor(
        [alphabet.cls_idx, *alphabet.encode("MKTAY").tolist(), alphabet.eos_idx]))[0], exact)
    favor_again = with_attention(softmax, attention="favor", nb_features=64)
    projection = favor_again.blocks[0].attention.projection
    assert projection.shape == (64, 16) and projection.abs().sum() > 0
    implied = ops.implied_attention(q, k, projection)[0]
    torch.testing.assert_close(attention_maps_of_tokens(favor_again, torch.as_tensor(
        [alphabet.cls_idx, *alphabet.encode("MKTAY").tolist(), alphabet.eos_idx]))[0], implied)
    assert attention_maps_of_tokens(favor_again, tokens).shape[-1] == len(tokens)
    with pytest.raises(ValueError):
        with_attention(favor, no_such_setting=1)
    # options softmax does not take (an exact band, its member order) fall back to their defaults
    banded = with_attention(favor, exact_window=4, band_order="member", position_scope="member")
    exact = with_attention(banded, attention="softmax")
    assert (exact.config.exact_window, exact.config.band_order, exact.config.position_scope) == (0, "sequence",
                                                                                                 "member")


def test_bundled_clusters_and_their_splits(data_dir):
    clusters = read_cluster_members(data_dir / "swissprot_subset.clusters50.tsv.gz")
    assert len(clusters) == 11_687
    assert max(len(members) for members in clusters.values()) == 75
    spec = SplitSpec(valid_fraction=0.02, test_fraction=0.02)
    splits = [cluster_split(representative, spec) for representative in clusters]
    held_out = sum(split != "train" for split in splits) / len(splits)
    assert 0.02 < held_out < 0.06
    representative = next(r for r, members in clusters.items() if len(members) >= 3)
    sequences = read_sequences(data_dir / "swissprot_subset.fasta.gz", set(clusters[representative]))
    assert set(sequences) == set(clusters[representative])


def test_malformed_cluster_file_names_the_line(tmp_path):
    path = tmp_path / "clusters.tsv"
    path.write_text("A\tA\nA\tB\tC\n")
    with pytest.raises(ValueError, match=r"clusters.tsv:2: expected 'representative<TAB>member'"):
        read_cluster_members(path)
