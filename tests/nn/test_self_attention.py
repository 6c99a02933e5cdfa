"""SelfAttention: the matrix it reports is the one it applies; buffers and the RPE bias behave."""
from __future__ import annotations

import pytest
import torch

from protein_performer.model import PerformerConfig
from protein_performer.nn import ATTENTION_KINDS, RANDOM_FEATURE_KINDS, SelfAttention

D_MODEL, HEADS, LENGTH, MAX_LENGTH = 16, 2, 11, 32


def make_attention(kind: str, causal: bool, **overrides: object) -> SelfAttention:
    values: dict[str, object] = dict(vocab_size=8, d_model=D_MODEL, n_layers=1, n_heads=HEADS, d_ff=32,
                                     dropout=0.0, attention=kind, causal=causal, nb_features=12,
                                     max_length=MAX_LENGTH, position="rotary")
    if kind == "combiner":
        values["combiner_block_size"] = 3
    if kind == "favor_rpe":  # a window shorter than LENGTH, so the far values act too
        values.update(rpe_exact_distance=2, rpe_max_distance=4)
    values.update(overrides)
    attention = SelfAttention(PerformerConfig(**values), layer_index=0).double()
    torch.manual_seed(0)
    for parameter in attention.parameters():  # larger than the model's init, so that weights vary a lot
        torch.nn.init.normal_(parameter, std=0.3)
    attention.redraw_projection(torch.Generator().manual_seed(1))
    return attention


KINDS_AND_FORMS = [pytest.param(kind, {}, id=kind) for kind in ATTENTION_KINDS] + [
    pytest.param("favor_rpe", {"rpe_max_distance": None}, id="favor_rpe-full-bias")]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind,overrides", KINDS_AND_FORMS)
def test_reported_weights_reproduce_the_output(kind: str, overrides: dict, causal: bool) -> None:
    attention = make_attention(kind, causal, **overrides)
    x = torch.randn(2, LENGTH, D_MODEL, dtype=torch.float64)
    padding = torch.zeros(2, LENGTH, dtype=torch.bool)
    padding[1, 7:] = True
    q, k, v = attention.project_qkv(x)
    weights = attention.attention_weights(q, k, padding)
    assert weights.shape == (2, HEADS, LENGTH, LENGTH)
    torch.testing.assert_close(weights.to(v.dtype) @ v, attention.attend(q, k, v, padding), rtol=1e-7, atol=1e-9)
    assert weights[1, :, :, 7:].abs().max() == 0, "padded keys must get zero weight"
    if causal:
        assert weights.triu(diagonal=1).abs().max() == 0, "causal weights must vanish above the diagonal"


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_projection_buffer_only_for_random_feature_kinds(kind: str) -> None:
    attention = make_attention(kind, causal=False)
    state = attention.state_dict()
    if kind in RANDOM_FEATURE_KINDS:
        assert state["projection"].shape == (12, D_MODEL // HEADS)
        assert "projection" not in dict(attention.named_parameters())
    else:
        assert attention.projection is None and "projection" not in state


def test_redraw_uses_only_the_generator() -> None:
    attention = make_attention("favor", causal=False)
    attention.redraw_projection(torch.Generator().manual_seed(7))
    first = attention.projection.clone()
    torch.manual_seed(123)  # the global RNG must play no part
    attention.redraw_projection(torch.Generator().manual_seed(7))
    torch.testing.assert_close(attention.projection, first, rtol=0, atol=0)
    attention.redraw_projection(torch.Generator().manual_seed(8))
    assert not torch.allclose(attention.projection, first)


@pytest.mark.parametrize("overrides", [{}, {"rpe_max_distance": None}], ids=["windowed", "full"])
def test_rpe_bias_changes_the_output_and_gets_gradients(overrides: dict) -> None:
    attention = make_attention("favor_rpe", causal=True, **overrides)
    x = torch.randn(1, LENGTH, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        attention.rpe_bias.zero_()
    flat, _ = attention(x)
    with torch.no_grad():
        attention.rpe_bias.normal_(std=1.0)
    biased, _ = attention(x)
    assert not torch.allclose(flat, biased)
    biased.sum().backward()
    assert attention.rpe_bias.grad is not None and attention.rpe_bias.grad.abs().sum() > 0


def test_windowed_bias_reads_one_column_per_bucket() -> None:
    """Offsets below the exact distance get their own column, equal log buckets share one, and each
    direction has its own far value."""
    attention = make_attention("favor_rpe", causal=False, rpe_exact_distance=2, rpe_max_distance=6)
    with torch.no_grad():
        attention.rpe_bias.copy_(torch.arange(attention.rpe_bias.numel(), dtype=torch.float64).view_as(
            attention.rpe_bias))
    bias = attention.relative_bias(LENGTH)
    band, far = bias.band[0].tolist(), bias.far[0].tolist()  # offsets -5 .. 5
    assert len(band) == 11 and band[4:7] == [0, 1, 2]  # offsets -1, 0, 1 exact
    # distances 2, 3, 4, 5: floor(4 log2(d / 2)) = 0, 2, 4, 5 -> four buckets per direction
    assert len(set(band[:4])) == 4 and len(set(band[7:])) == 4 and not set(band[:4]) & set(band[7:])
    assert far[0] != far[1] and not {far[0], far[1]} & set(band)
    assert sorted(set(attention.rpe_index.tolist())) == list(range(attention.rpe_bias.shape[1]))  # no idle column


@pytest.mark.parametrize("kind,causal,overrides", [
    ("softmax", True, {}), ("favor_rpe", True, {"rpe_max_distance": None}), ("favor", False, {})])
def test_step_is_refused_without_a_recurrent_state(kind: str, causal: bool, overrides: dict) -> None:
    attention = make_attention(kind, causal, **overrides)
    with pytest.raises(ValueError, match="step-by-step decoding"):
        attention.step(torch.zeros(1, D_MODEL, dtype=torch.float64), position=0)
