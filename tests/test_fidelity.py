"""attention_fidelity: exact kinds measure zero error, estimates converge with m, padding is invisible,
and u_bar's O(n d) formula equals the brute-force mean over pairs."""
from __future__ import annotations

import math

import pytest
import torch

from protein_performer.fidelity import (
    attention_fidelity,
    captured_attention_inputs,
    exact_attention_weights,
    pair_norm_sums,
)
from protein_performer.model import PerformerConfig, ProteinPerformer

LENGTH = 24


def make_model(attention: str, causal: bool = False, **overrides: object) -> ProteinPerformer:
    values: dict[str, object] = dict(vocab_size=30, d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0,
                                     attention=attention, causal=causal, nb_features=16, pad_idx=0)
    if attention == "favor_rpe":
        values.update(rpe_exact_distance=2, rpe_max_distance=6)
    values.update(overrides)
    model = ProteinPerformer(PerformerConfig(**values))
    torch.manual_seed(0)
    with torch.no_grad():  # sharper attention than the init's, so that the estimate has something to miss
        for block in model.blocks:
            block.attention.qkv.weight.normal_(std=0.1)
            if block.attention.rpe_bias is not None:
                block.attention.rpe_bias.normal_(std=1.5)
    return model.eval()


def tokens(batch: int = 3, length: int = LENGTH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 30, (batch, length), generator=generator)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, length - 7:] = True
    padding[2, length // 2:] = True
    return ids.masked_fill(padding, 0), padding


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_exact_softmax_measures_zero_error(causal):
    model = make_model("softmax", causal)
    report = attention_fidelity(model, *tokens())
    assert report.error.shape == (2, 2)
    assert report.error.max() < 1e-5
    assert (report.u_bar > 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind", ["favor", "favor_rpe"])
def test_estimate_error_shrinks_with_more_features(kind, causal):
    model = make_model(kind, causal)
    ids, padding = tokens()
    few = attention_fidelity(model, ids, padding, nb_features=8, seed=0, entropy=False)
    many = attention_fidelity(model, ids, padding, nb_features=4096, seed=0, entropy=False)
    # Monte-Carlo error falls as 1/sqrt(m): 512x the features, ~23x less error (a large margin here)
    assert (many.error < few.error / 4).all()
    assert many.error.max() < 0.1
    assert few.error.min() > 0.01  # it measures something


def test_favor_rpe_is_compared_with_softmax_under_the_same_bias():
    model = make_model("favor_rpe")
    ids, padding = tokens()
    with_bias = attention_fidelity(model, ids, padding, nb_features=4096, seed=0, entropy=False)
    for block in model.blocks:
        block.attention.rpe_bias.data.zero_()
    # the same q, k, v: a reference that ignored the bias would have measured about this much
    assert with_bias.error.max() < 0.1
    assert attention_fidelity(model, ids, padding, nb_features=4096, seed=0, entropy=False).error.max() < 0.1


def test_model_own_projection_by_default_and_reproducible_fresh_draws():
    model = make_model("favor")
    ids, padding = tokens()
    own = attention_fidelity(model, ids, padding, entropy=False)
    first = attention_fidelity(model, ids, padding, seed=3, entropy=False)
    again = attention_fidelity(model, ids, padding, seed=3, entropy=False)
    other = attention_fidelity(model, ids, padding, seed=4, entropy=False)
    torch.testing.assert_close(first.error, again.error)
    assert not torch.allclose(first.error, other.error)
    assert not torch.allclose(own.error, first.error)
    torch.testing.assert_close(own.u_bar, first.u_bar)  # u_bar is a property of q, k alone


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind", ["favor", "favor_relu", "favor_rpe"])
def test_padding_is_invisible(kind, causal):
    """The sums over a padded batch equal the sums over each protein measured alone, unpadded."""
    model = make_model(kind, causal)
    ids, padding = tokens()
    together = attention_fidelity(model, ids, padding)
    alone = None
    for row in range(ids.shape[0]):
        n = int((~padding[row]).sum())
        one = attention_fidelity(model, ids[row:row + 1, :n])
        alone = one if alone is None else alone + one
    for name in ("error", "u_bar", "entropy"):
        torch.testing.assert_close(getattr(together, name), getattr(alone, name), rtol=1e-4, atol=1e-6, msg=name)
    # junk in the padded positions changes nothing
    noisy = attention_fidelity(model, ids.masked_fill(padding, 7), padding)
    torch.testing.assert_close(noisy.error, together.error, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_pair_norm_sums_equal_brute_force(causal):
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 3, 13, 5, generator=generator, dtype=torch.float64).unbind(0)  # (B, H, n, D)
    valid = torch.ones(2, 3, 13, dtype=torch.bool)
    valid[1, :, 9:] = False  # padding at the end
    valid[0, :, 4] = False  # and a gap
    total, pairs = pair_norm_sums(q, k, valid, causal=causal)
    norms = (q[..., :, None, :] + k[..., None, :, :]).square().sum(-1)  # (B, H, i, j)
    attended = valid[..., :, None] & valid[..., None, :]
    if causal:
        attended = attended & torch.ones(13, 13, dtype=torch.bool).tril()
    torch.testing.assert_close(total, (norms * attended).sum(dim=(-1, -2)))
    torch.testing.assert_close(pairs, attended.sum(dim=(-1, -2)).double())


def test_uniform_attention_has_entropy_log_n():
    q = torch.zeros(2, 9, 4, dtype=torch.float64)
    k = torch.randn(2, 9, 4, dtype=torch.float64)
    weights = exact_attention_weights(q, k, None, causal=False)
    entropy = -torch.special.xlogy(weights, weights).sum(-1)
    torch.testing.assert_close(entropy, torch.full((2, 9), math.log(9), dtype=torch.float64))
    causal = exact_attention_weights(q, k, None, causal=True)
    row_entropy = -torch.special.xlogy(causal, causal).sum(-1)
    torch.testing.assert_close(row_entropy[0], torch.log(torch.arange(1, 10, dtype=torch.float64)))


def test_entropy_through_the_model_is_bounded_by_log_length():
    report = attention_fidelity(make_model("favor"), *tokens())
    assert (report.entropy > 0).all() and (report.entropy <= math.log(LENGTH) + 1e-9).all()


def test_capture_restores_the_layers_and_keeps_the_output():
    model = make_model("favor")
    ids, padding = tokens()
    expected = model(ids, padding).logits
    with captured_attention_inputs(model) as records:
        logits = model(ids, padding).logits
    assert len(records) == 2 and records[0]["q"].shape == (3, 2, LENGTH, 16)
    torch.testing.assert_close(logits, expected)
    assert all("attend" not in block.attention.__dict__ for block in model.blocks)


def test_an_unknown_override_is_refused_by_name():
    with pytest.raises(ValueError, match="no_such_key"):
        attention_fidelity(make_model("favor"), *tokens(), overrides={"no_such_key": 1})


def test_the_model_mode_is_restored():
    model = make_model("favor").train()
    attention_fidelity(model, *tokens(), entropy=False)
    assert model.training


def test_a_compiled_model_is_measured_eagerly_alike():
    model = make_model("favor")
    ids, padding = tokens()
    expected = attention_fidelity(model, ids, padding, entropy=False)
    model.compile(backend="eager")
    torch.testing.assert_close(attention_fidelity(model, ids, padding, entropy=False).error, expected.error)


def test_overrides_rebuild_each_layer_with_the_same_weights():
    """A favor model measured with its attention swapped for exact softmax: the estimate is then exact."""
    model = make_model("favor")
    report = attention_fidelity(model, *tokens(), overrides={"attention": "softmax"}, entropy=False)
    assert report.error.max() < 1e-5
