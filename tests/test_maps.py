"""Attention maps, contact estimates and the amino-acid similarity analysis (protein_performer.maps)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from protein_performer import ops
from protein_performer.data import Alphabet, read_fasta
from protein_performer.maps import (
    AMINO_ACIDS,
    amino_acid_similarity,
    apc,
    attention_maps,
    blosum62,
    contact_map,
    favor_approximation_error,
    matrix_correlation,
    query_keys,
    symmetrize,
    tokenize,
)
from protein_performer.model import PerformerConfig, ProteinPerformer

KINDS = ("softmax", "favor", "favor_relu", "favor_rpe", "combiner")


@pytest.fixture(scope="module")
def alphabet() -> Alphabet:
    return Alphabet()


@pytest.fixture(scope="module")
def bpti(data_dir) -> str:
    (record,) = list(read_fasta(data_dir / "bpti.fasta"))
    return record.sequence


@pytest.fixture(scope="module")
def flip_sequences(data_dir) -> list[str]:
    records = read_fasta(data_dir / "flip_ss_sequences.fasta.gz")
    return [record.sequence for _, record in zip(range(12), records)]


def tiny_model(alphabet: Alphabet, attention: str, seed: int = 0) -> ProteinPerformer:
    torch.manual_seed(seed)
    config = PerformerConfig(vocab_size=len(alphabet), d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0,
                             attention=attention, nb_features=32, max_length=128, pad_idx=alphabet.pad_idx)
    return ProteinPerformer(config).eval()


@pytest.mark.parametrize("attention", KINDS)
def test_attention_maps_are_the_model_attentions_of_residues(alphabet, bpti, attention):
    model = tiny_model(alphabet, attention)
    maps = attention_maps(model, alphabet, bpti)
    assert maps.shape == (2, 2, len(bpti), len(bpti))
    with torch.no_grad():
        full = model(tokenize(alphabet, bpti)[None], return_attention=True).attentions[0]  # (layers, H, L+2, L+2)
    torch.testing.assert_close(maps, full[:, :, 1:-1, 1:-1])
    # Rows are distributions over keys with the <cls>/<eos> share removed.
    assert (full.sum(-1) - 1).abs().max() < 1e-4
    assert (maps.sum(-1) <= 1 + 1e-5).all()


@pytest.mark.parametrize("attention", ["softmax", "favor", "favor_relu"])
def test_query_keys_reproduce_each_layers_map(alphabet, bpti, attention):
    model = tiny_model(alphabet, attention)
    maps = attention_maps(model, alphabet, bpti)
    pairs = query_keys(model, alphabet, bpti)
    assert len(pairs) == 2
    for layer, (q, k) in enumerate(pairs):
        assert q.shape == k.shape == (1, 2, len(bpti) + 2, 16)
        attn = model.blocks[layer].attention
        if attention == "softmax":
            expected = ops.softmax_attention_weights(q, k)
        else:
            kernel = "softmax" if attention == "favor" else "relu"
            expected = ops.implied_attention(q, k, attn.projection, kernel=kernel)
        torch.testing.assert_close(maps[layer], expected[0, :, 1:-1, 1:-1])


def test_query_keys_leave_no_hooks_behind(alphabet, bpti):
    model = tiny_model(alphabet, "favor")
    query_keys(model, alphabet, bpti)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_favor_error_shrinks_with_more_features(alphabet, bpti):
    model = tiny_model(alphabet, "softmax")
    q, k = query_keys(model, alphabet, bpti)[0]
    # Sharper attention than an untrained model's, so the estimate has something to get wrong.
    q, k = 4 * q, 4 * k
    errors = favor_approximation_error(q, k, [8, 64, 512], draws=4, seed=0)
    assert errors.shape == (3, 4)
    assert (errors >= 0).all() and (errors <= 1).all()
    mean = errors.mean(1)
    assert mean[0] > mean[1] > mean[2]
    assert mean[2] < 0.5 * mean[0]
    np.testing.assert_array_equal(errors, favor_approximation_error(q, k, [8, 64, 512], draws=4, seed=0))


def test_favor_error_draws_its_projections_on_the_device_of_q(monkeypatch):
    """On a GPU, q and k live on CUDA; the projections must follow them (this machine has no GPU, so the
    ops are stood in for on the meta device, where a CPU projection is just as much a mismatch)."""
    devices = []

    def implied_attention(q, k, projection):
        devices.append((q.device, projection.device))
        return torch.zeros(q.shape[:-1] + k.shape[-2:-1], dtype=q.dtype)

    monkeypatch.setattr(ops, "implied_attention", implied_attention)
    monkeypatch.setattr(ops, "softmax_attention_weights", lambda q, k: torch.zeros(q.shape[:-1] + k.shape[-2:-1]))
    q = k = torch.empty(1, 2, 5, 8, device="meta")
    favor_approximation_error(q, k, [4, 16], draws=2)
    assert devices == [(q.device, q.device)] * 4


def test_apc_removes_a_rank_one_background():
    u, v = torch.rand(7, dtype=torch.float64) + 0.1, torch.rand(7, dtype=torch.float64) + 0.1
    background = u[:, None] * v[None, :]
    torch.testing.assert_close(apc(background), torch.zeros(7, 7, dtype=torch.float64))
    planted = background.clone()
    planted[2, 5] += 1.0
    corrected = apc(planted)
    assert corrected.argmax().item() == 2 * 7 + 5


def test_apc_matches_the_formula_on_batched_maps():
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    expected = torch.empty_like(x)
    for a in range(3):
        for b in range(2):
            m = x[a, b]
            expected[a, b] = m - torch.outer(m.sum(1), m.sum(0)) / m.sum()
    torch.testing.assert_close(apc(x), expected)


def test_contact_map_finds_a_planted_contact_and_is_symmetric():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 20, 20, generator=generator) * 0.1
    maps[1, 2, 4, 15] += 2.0  # one head sees residue 4 and 15 together, in one direction only
    contacts = contact_map(maps)
    assert contacts.shape == (20, 20)
    torch.testing.assert_close(contacts, contacts.T)
    i, j = divmod(contacts.argmax().item(), 20)
    assert {i, j} == {4, 15}
    torch.testing.assert_close(symmetrize(maps), symmetrize(maps).transpose(-1, -2))
    # Selecting layers selects maps: the planted head is in layer 1 only.
    assert contact_map(maps, layers=[0])[4, 15] < contacts[4, 15]
    with pytest.raises(ValueError, match=r"\[layers, heads, L, L\]"):
        contact_map(maps[0])


def test_amino_acid_similarity_matches_a_loop_over_residues(alphabet, model_and_sequences):
    model, sequences = model_and_sequences
    result = amino_acid_similarity(model, alphabet, sequences)
    assert result.letters == AMINO_ACIDS
    assert result.similarity.shape == (20, 20)
    np.testing.assert_allclose(np.diag(result.similarity), 1.0)
    np.testing.assert_allclose(result.similarity, result.similarity.T)
    np.testing.assert_allclose(result.profile.sum(1), 1.0)

    # Reference: walk every key residue of every protein and add its received attention by hand.
    received = np.zeros((model.config.n_layers * model.config.n_heads, 20))
    counts = np.zeros(20, dtype=np.int64)
    for sequence in sequences:
        maps = attention_maps(model, alphabet, sequence).double().flatten(0, 1).numpy()  # (LH, L, L)
        column_sums = maps.sum(1)  # (LH, L): attention received by each key residue
        for j, residue in enumerate(sequence):
            if residue in AMINO_ACIDS:
                a = AMINO_ACIDS.index(residue)
                received[:, a] += column_sums[:, j]
                counts[a] += 1
    profile = received / received.sum(1, keepdims=True)
    np.testing.assert_allclose(result.profile, profile, rtol=1e-10)
    np.testing.assert_array_equal(result.residues, counts)
    reference = np.array([[np.corrcoef(profile[:, a], profile[:, b])[0, 1] for b in range(20)] for a in range(20)])
    np.testing.assert_allclose(result.similarity, reference, atol=1e-10)


@pytest.fixture(scope="module")
def model_and_sequences(alphabet, flip_sequences):
    return tiny_model(alphabet, "favor"), flip_sequences[:6]


def test_amino_acid_similarity_needs_every_amino_acid(alphabet, model_and_sequences):
    model, _ = model_and_sequences
    with pytest.raises(ValueError, match="never occur"):
        amino_acid_similarity(model, alphabet, ["ACDEFGHIK"])
    with pytest.raises(ValueError, match="at least one"):
        amino_acid_similarity(model, alphabet, [])


def test_blosum62_has_the_published_scores():
    matrix = blosum62()
    assert matrix.shape == (20, 20)
    np.testing.assert_array_equal(matrix, matrix.T)
    index = AMINO_ACIDS.index
    assert matrix[index("W"), index("W")] == 11
    assert matrix[index("A"), index("A")] == 4
    assert matrix[index("D"), index("E")] == 2
    assert matrix[index("W"), index("C")] == -2
    assert matrix[index("I"), index("V")] == 3
    np.testing.assert_array_equal(blosum62("WC"), [[11, -2], [-2, 9]])


def test_matrix_correlation_ignores_the_diagonal_and_scale():
    b = blosum62().astype(float)
    assert matrix_correlation(b, 3 * b - 1) == pytest.approx(1.0)
    changed = b.copy()
    np.fill_diagonal(changed, 100.0)
    assert matrix_correlation(b, changed) == pytest.approx(1.0)
    assert matrix_correlation(b, -b) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="square"):
        matrix_correlation(b, b[:5])
