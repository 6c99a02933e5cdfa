"""The random-feature options of the softmax-kernel FAVOR kind (features, coupling, exact_window) through
the layer, the model and the config: weights reproduce outputs, causal FAVOR++ keeps a running statistic,
decoding equals the parallel forward, bad settings are refused naming the key."""
from __future__ import annotations

import pytest
import torch

from protein_performer import ProteinPerformer
from protein_performer.config import PerformerConfig, config_from_hydra
from protein_performer.nn.attention import OPRF_MOMENTUM

from test_model import random_ids, sharp_model, tiny_config
from test_self_attention import D_MODEL, HEADS, LENGTH, make_attention

VARIANTS = [
    pytest.param({"features": "oprf"}, id="oprf"),
    pytest.param({"coupling": "simplex"}, id="simplex"),
    pytest.param({"exact_window": 3}, id="exact_window"),
    pytest.param({"features": "oprf", "coupling": "simplex", "exact_window": 3}, id="all"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("overrides", VARIANTS)
def test_reported_weights_reproduce_the_output(overrides: dict, causal: bool) -> None:
    attention = make_attention("favor", causal, **overrides)
    if attention.oprf_u is not None:
        attention.oprf_u.fill_(3.0)  # a trained statistic: A != 0
    x = torch.randn(2, LENGTH, D_MODEL, dtype=torch.float64)
    padding = torch.zeros(2, LENGTH, dtype=torch.bool)
    padding[1, 7:] = True
    q, k, v = attention.project_qkv(x)
    weights = attention.attention_weights(q, k, padding)
    assert weights.shape == (2, HEADS, LENGTH, LENGTH)
    torch.testing.assert_close(weights @ v, attention.attend(q, k, v, padding), rtol=1e-7, atol=1e-9)
    plain = make_attention("favor", causal)
    assert not torch.allclose(plain.attention_weights(q, k, padding), weights)  # the option acts


def test_causal_oprf_statistic_follows_training_batches_only() -> None:
    """Training forwards fold each batch's u (valid tokens only) into the buffer; eval leaves it alone.
    The forward reads the statistic before its own batch is folded in."""
    model = ProteinPerformer(tiny_config("favor", causal=True, features="oprf"))
    layer = model.blocks[0].attention
    assert layer.oprf_u.eq(0).all() and layer.oprf_a(None, None) is not None
    ids = random_ids(2, 12)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 8:] = True
    model.train()
    model(ids, mask)
    first = layer.oprf_u.clone()
    assert (first > 0).all() and int(layer.oprf_updates) == 1
    model(ids)
    assert int(layer.oprf_updates) == 2
    model.eval()
    model(random_ids(2, 12, seed=3))
    assert int(layer.oprf_updates) == 2
    assert 0 < 1 - OPRF_MOMENTUM < 1


@pytest.mark.parametrize("overrides", [{"features": "oprf"}, {"exact_window": 4},
                                       {"features": "oprf", "exact_window": 4, "coupling": "simplex"}],
                         ids=["oprf", "exact_window", "all"])
def test_decode_step_equals_the_parallel_forward(overrides: dict) -> None:
    model = sharp_model(tiny_config("favor", causal=True, **overrides))
    model.train()
    model(random_ids(2, 9, seed=1))  # a training batch sets the FAVOR++ statistic (A != 0)
    model.eval()
    ids = random_ids(2, 11, seed=6)
    parallel = model(ids).logits
    state = None
    for t in range(ids.shape[1]):
        logits, state = model.decode_step(ids[:, t], state)
        torch.testing.assert_close(logits, parallel[:, t], rtol=1e-8, atol=1e-8)


def test_old_configs_load_with_todays_behaviour() -> None:
    saved = tiny_config("favor").to_dict()
    for key in ("features", "coupling", "exact_window"):
        del saved[key]
    config = PerformerConfig.from_dict(saved)
    assert (config.features, config.coupling, config.exact_window) == ("positive", "orthogonal", 0)


@pytest.mark.parametrize("attention,overrides,message", [
    ("favor", {"exact_window": -1}, "exact_window must be a non-negative integer"),
    ("favor_relu", {"exact_window": 8}, r"exact_window=8 is not available with attention='favor_relu'.*\['favor'\]"),
    ("favor_relu", {"features": "oprf"}, r"features='oprf' is not available with attention='favor_relu'"),
    ("softmax", {"coupling": "simplex"}, r"coupling='simplex' is not available with attention='softmax'"),
    ("favor", {"features": "fancy"}, r"unknown features 'fancy'; choose one of \('positive', 'oprf'\)"),
    ("favor", {"coupling": "cubic"}, r"unknown coupling 'cubic'; choose one of \('orthogonal', 'simplex'\)"),
], ids=["negative-window", "window-relu", "oprf-relu", "simplex-softmax", "unknown-features", "unknown-coupling"])
def test_bad_settings_are_refused_naming_the_key(attention: str, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(attention, **overrides)


def test_the_attention_group_takes_the_new_keys() -> None:
    config = config_from_hydra({"d_model": 32, "n_heads": 2},
                               {"kind": "favor", "features": "oprf", "coupling": "simplex", "exact_window": 16},
                               vocab_size=25, pad_idx=1, causal=False)
    assert (config.features, config.coupling, config.exact_window) == ("oprf", "simplex", 16)
