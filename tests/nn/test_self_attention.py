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
    values.update(overrides)
    attention = SelfAttention(PerformerConfig(**values), layer_index=0).double()
    torch.manual_seed(0)
    for parameter in attention.parameters():  # larger than the model's init, so that weights vary a lot
        torch.nn.init.normal_(parameter, std=0.3)
    attention.redraw_projection(torch.Generator().manual_seed(1))
    return attention


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_reported_weights_reproduce_the_output(kind: str, causal: bool) -> None:
    attention = make_attention(kind, causal)
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


def test_rpe_bias_changes_the_output_and_gets_gradients() -> None:
    attention = make_attention("favor_rpe", causal=True)
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


@pytest.mark.parametrize("kind,causal", [("softmax", True), ("favor_rpe", True), ("favor", False)])
def test_step_is_refused_without_a_recurrent_state(kind: str, causal: bool) -> None:
    attention = make_attention(kind, causal)
    with pytest.raises(ValueError, match="step-by-step decoding"):
        attention.step(torch.zeros(1, D_MODEL, dtype=torch.float64), position=0)
