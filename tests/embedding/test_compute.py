"""Embedding in memory: batches, windows, layers and options (protein_performer.embedding.compute, settings)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from protein_performer.embedding import EmbedError, EmbedSettings, embed
from protein_performer.embedding.compute import plan_batches
from protein_performer.model import PerformerConfig, ProteinPerformer

from .helpers import reference, references, tiny_model


@pytest.mark.parametrize("attention", ["softmax", "favor"])
def test_batched_embeddings_equal_each_protein_alone(alphabet, flip_records, attention):
    """Length-sorted, padded batches change nothing: padding is invisible and order is restored."""
    model = tiny_model(alphabet, attention)
    records = flip_records[:10]
    sequences = {protein_id: sequence for protein_id, sequence in records}
    result = embed(model, alphabet, sequences, layers=[0, 1, -1], include=["mean", "per_residue", "cls"],
                   max_tokens=1200)
    assert result.ids == [protein_id for protein_id, _ in records]
    assert result.layers == (0, 1, 2)
    np.testing.assert_array_equal(result.lengths, [len(s) for _, s in records])
    assert result.per_residue[-1].shape == (sum(len(s) for _, s in records), 32)
    for protein_id, sequence in records:
        got = result[protein_id]
        for layer, states in references(model, alphabet, sequence, [0, 1, 2]).items():
            np.testing.assert_allclose(got.per_residue[layer], states[1:-1].numpy(), atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(got.mean[layer], states[1:-1].mean(0).numpy(), atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(got.cls[layer], states[0].numpy(), atol=2e-5, rtol=1e-4)
    # Negative layers name the same arrays as their non-negative index.
    assert result.mean[-1] is result.mean[2] and result.mean[-3] is result.mean[0]
    with pytest.raises(KeyError, match="not embedded"):
        result.mean[5]


def test_plan_batches_respects_the_token_budget(alphabet, flip_records):
    settings = EmbedSettings(max_tokens=2000, device="cpu").resolve(tiny_model(alphabet))
    lengths = [len(s) for _, s in flip_records]
    batches = plan_batches(lengths, settings)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(flat, reverse=True)  # longest first: neighbours in a batch have similar lengths
    for batch in batches:
        padded = len(batch) * (max(lengths[i] for i in batch) + 2)
        assert padded <= 2000 or len(batch) == 1
    assert len(batches) > 3


def test_plan_batches_count_every_window_of_a_protein(alphabet):
    """A protein cut into windows fills one row per window: the budget counts them all."""
    settings = EmbedSettings(max_tokens=500, window=100, window_stride=50, device="cpu").resolve(tiny_model(alphabet))
    lengths = [400, 90, 90, 90, 90, 90]  # 7 windows of 102 tokens; five proteins of 92
    batches = plan_batches(lengths, settings)
    assert batches[0] == [0]  # 7 x 102 tokens exceed 500: alone
    assert batches[1:] == [[1, 2, 3, 4, 5]]  # 5 x 92 = 460 tokens


def test_settings_and_keyword_options_are_the_same_thing(alphabet, flip_records):
    model = tiny_model(alphabet)
    sequences = [s for _, s in flip_records[:3]]
    settings = EmbedSettings(layers=(0, -1), include=("mean", "cls"), max_tokens=900)
    by_object = embed(model, alphabet, sequences, settings)
    by_keywords = embed(model, alphabet, sequences, layers=[0, -1], include=["mean", "cls"], max_tokens=900)
    for layer in (0, -1):
        np.testing.assert_array_equal(by_object.cls[layer], by_keywords.cls[layer])
    with pytest.raises(TypeError, match=r"unknown embedding option\(s\) \['layer'\]"):
        embed(model, alphabet, sequences, layer=[0])


def test_long_protein_is_embedded_whole_beyond_the_training_window(alphabet, flip_records):
    """Rotary FAVOR+ takes any length: a protein 6x max_length comes back with every residue."""
    model = tiny_model(alphabet, "favor", max_length=64)
    sequence = "".join(s for _, s in flip_records[:3])[:400]
    result = embed(model, alphabet, [sequence], include=["per_residue"], max_tokens=100)
    assert result.per_residue[-1].shape == (400, 32)
    np.testing.assert_allclose(result.residues("0"), reference(model, alphabet, sequence, -1)[1:-1].numpy(),
                               atol=2e-5, rtol=1e-4)


def test_windowed_favor_rpe_embeds_a_30000_residue_protein_whole(alphabet, flip_records):
    """A windowed relative bias has the same parameters at any length: a model with max_length 1024
    embeds a titin-sized protein in one piece, as its own forward pass sees it. The full bias
    (rpe_max_distance null) is sized by max_length and asks for windows."""
    torch.manual_seed(0)
    config = PerformerConfig(vocab_size=len(alphabet), d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0,
                             attention="favor_rpe", nb_features=16, max_length=1024, pad_idx=alphabet.pad_idx)
    model = ProteinPerformer(config).eval()
    with torch.no_grad():
        model.blocks[0].attention.rpe_bias.normal_()
    chains = "".join(s for _, s in flip_records)
    sequence = (chains * (30_000 // len(chains) + 1))[:30_000]
    result = embed(model, alphabet, [sequence], include=["per_residue", "mean"], max_tokens=4096)
    per_residue = result.residues("0")
    assert per_residue.shape == (30_000, 16) and np.isfinite(per_residue).all()
    np.testing.assert_allclose(per_residue, reference(model, alphabet, sequence, -1)[1:-1].numpy(),
                               atol=2e-5, rtol=1e-4)
    full = ProteinPerformer(PerformerConfig(**{**config.to_dict(), "rpe_max_distance": None})).eval()
    with pytest.raises(EmbedError, match=r"at most 1022 residues.*window="):
        embed(full, alphabet, [sequence[:2000]])


def test_learned_positions_need_windows_for_long_proteins(alphabet, flip_records):
    model = tiny_model(alphabet, "softmax", position="learned", max_length=130)
    sequence = next(s for _, s in flip_records if len(s) > 350)[:350]  # windows start at 0, 50, ..., 250
    with pytest.raises(EmbedError, match=r"at most 128 residues.*window="):
        embed(model, alphabet, [sequence])
    with pytest.raises(EmbedError, match="max_length=130"):
        embed(model, alphabet, [sequence], window=200)
    result = embed(model, alphabet, [sequence], include=["per_residue", "mean"], window=100, window_stride=50)
    assert result.per_residue[-1].shape == (len(sequence), 32)
    # Residues 0..49 are covered by the first window only, so they equal that window embedded alone.
    first_window = reference(model, alphabet, sequence[:100], -1)[1:-1]
    np.testing.assert_allclose(result.residues("0")[:50], first_window[:50].numpy(), atol=2e-5, rtol=1e-4)
    # ... and the last 50 by the last window only.
    last_window = reference(model, alphabet, sequence[-100:], -1)[1:-1]
    np.testing.assert_allclose(result.residues("0")[-50:], last_window[-50:].numpy(), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(result.mean[-1][0], result.residues("0").mean(0), rtol=1e-5)


def test_window_larger_than_the_protein_changes_nothing(alphabet, flip_records):
    model = tiny_model(alphabet)
    sequences = [s for _, s in flip_records[:5]]
    whole = embed(model, alphabet, sequences, include=["per_residue"])
    windowed = embed(model, alphabet, sequences, include=["per_residue"], window=max(map(len, sequences)))
    np.testing.assert_array_equal(whole.per_residue[-1], windowed.per_residue[-1])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers": [3]}, r"layers \[3\] out of range"),
        ({"layers": []}, "layers is empty"),
        ({"include": ["pooled"]}, "subset of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"precision": "8"}, "precision"),
        ({"window": 0}, "window must be"),
        ({"window": 50, "window_stride": 51}, "window_stride"),
        ({"window_stride": 10}, "window_stride is set but window is not"),
        ({"device": "gpu0"}, "not a torch device"),
    ],
    ids=["layer-range", "no-layers", "include", "budget", "precision", "window", "stride", "stride-alone", "device"],
)
def test_bad_options_fail_with_a_named_option(alphabet, options, message):
    with pytest.raises(EmbedError, match=message):
        embed(tiny_model(alphabet), alphabet, ["MKT"], **options)


def test_bf16_precision_is_close_to_float32(alphabet, flip_records):
    model = tiny_model(alphabet)
    sequences = [s for _, s in flip_records[:4]]
    full = embed(model, alphabet, sequences).mean[-1]
    half = embed(model, alphabet, sequences, precision="bf16").mean[-1]
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=0.1)
    assert not np.array_equal(half, full)
