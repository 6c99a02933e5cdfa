"""The random-feature options of the softmax-kernel FAVOR kind (features, coupling, exact_window) through
the layer, the model and the config: weights reproduce outputs, causal FAVOR++ keeps a running statistic,
decoding equals the parallel forward, bad settings are refused naming the key."""
from __future__ import annotations

import pytest
import torch

from protein_performer import ProteinPerformer
from protein_performer.config import PerformerConfig, config_from_hydra
from protein_performer.nn.attention import OPRF_MOMENTUM

from test_model import PAD, random_ids, sharp_model, tiny_config
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


# ----------------------------------------------------------------------------------------------------
# band_order='member': the exact band over tokens sorted by their position within their member
# ----------------------------------------------------------------------------------------------------

def _member_band(window: int, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bool [L, L], written out pair by pair: which (i, j) the member order weights exactly. Tokens are
    ranked by (position within member, input index), valid tokens first; blocks of `window` ranks."""
    tokens = sorted(range(len(positions)), key=lambda i: (not bool(valid[i]), int(positions[i]), i))
    rank = {token: r for r, token in enumerate(tokens)}
    length = len(positions)
    return torch.tensor([[abs(rank[i] // window - rank[j] // window) <= 1 for j in range(length)]
                         for i in range(length)])


def test_member_order_is_exact_on_nearby_member_positions_and_favor_elsewhere() -> None:
    """Against a dense reference built pair by pair: exp(q.k / sqrt d) where the sorted ranks share or
    neighbour a block, the FAVOR+ kernel estimate elsewhere, one normaliser; outputs and gradients."""
    from protein_performer import ops

    attention = make_attention("favor", False, exact_window=3, band_order="member", position_scope="member")
    x = torch.randn(2, LENGTH, D_MODEL, dtype=torch.float64, requires_grad=True)
    positions = torch.stack([torch.arange(LENGTH) % 5, torch.arange(LENGTH) % 7])  # members of 5 and 7 tokens
    padding = torch.zeros(2, LENGTH, dtype=torch.bool)
    padding[1, LENGTH - 3:] = True
    q, k, v = attention.project_qkv(x, positions=positions)
    got = attention.attend(q, k, v, padding, positions)
    features_q = ops.softmax_kernel_features(q, attention.projection, is_query=True, stabilize=False)
    features_k = ops.softmax_kernel_features(k, attention.projection, is_query=False, stabilize=False)
    favor = features_q @ features_k.transpose(-1, -2)
    exact = torch.exp(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5)
    bands = torch.stack([_member_band(3, positions[b], ~padding[b]) for b in range(2)])[:, None]
    weights = torch.where(bands, exact, favor).masked_fill(padding[:, None, None, :], 0.0)
    want = (weights / weights.sum(-1, keepdim=True)) @ v
    valid = ~padding[:, None, :, None]
    torch.testing.assert_close(got * valid, want * valid, rtol=1e-9, atol=1e-11)
    probe = torch.randn_like(got) * valid
    grad_got, = torch.autograd.grad((got * probe).sum(), x, retain_graph=True)
    grad_want, = torch.autograd.grad((want * probe).sum(), x)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-8, atol=1e-10)
    # the reported matrix is the one applied, and it differs from the sequence-order band
    matrix = attention.attention_weights(q, k, padding, positions)
    torch.testing.assert_close((matrix @ v) * valid, got * valid, rtol=1e-9, atol=1e-11)
    attention.band_order = "sequence"
    assert not torch.allclose(attention.attend(q, k, v, padding) * valid, got * valid)


def test_member_order_holds_the_aligned_residue_of_another_member_and_ignores_padding() -> None:
    """Two identical members of 12 residues: with the member order, the copy's query at member position
    t weighs the original's key t exactly (it is far beyond a sequence band of 3); right padding moves no
    valid token's output."""
    from test_model import homolog_window, residues

    member = residues(12, seed=1)
    ids = homolog_window([member, member])  # <cls> m <eos> m <eos>: 27 tokens
    config = tiny_config("favor", exact_window=3, band_order="member", position_scope="member")
    model = sharp_model(config)
    positions = model.positions(ids)
    layer = model.blocks[0].attention
    order = layer.band_permutation(positions, None)[0]
    rank = order.argsort()
    for t in range(12):
        original, copy = 1 + t, 14 + t
        assert abs(int(rank[original]) // 3 - int(rank[copy]) // 3) <= 1
    padded = torch.cat([ids, torch.full((1, 5), PAD)], dim=1)
    mask = padded.eq(PAD)
    torch.testing.assert_close(model(padded, mask).logits[:, :27], model(ids).logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("overrides,message", [
    ({"band_order": "diagonal"}, r"unknown band_order 'diagonal'; choose one of \('sequence', 'member'\)"),
    ({"band_order": "member", "position_scope": "member"}, r"needs exact_window > 0 \(got 0\)"),
    ({"band_order": "member", "exact_window": 4}, r"position_scope='member' \(got 'window'\)"),
    ({"attention": "favor_relu", "band_order": "member"}, r"band_order='member' is not available"),
], ids=["unknown", "no-band", "window-positions", "relu"])
def test_bad_band_orders_are_refused_naming_the_key(overrides: dict, message: str) -> None:
    overrides = dict(overrides)
    with pytest.raises(ValueError, match=message):
        tiny_config(overrides.pop("attention", "favor"), **overrides)


def test_member_order_needs_positions_at_the_layer() -> None:
    attention = make_attention("favor", False, exact_window=3, band_order="member", position_scope="member")
    q = k = v = torch.randn(1, HEADS, LENGTH, D_MODEL // HEADS, dtype=torch.float64)
    with pytest.raises(ValueError, match="band_order='member' sorts tokens"):
        attention.attend(q, k, v)


def test_a_causal_member_band_model_reads_no_later_token_and_does_not_decode_step_by_step() -> None:
    from test_model import homolog_window, residues

    config = tiny_config("favor", causal=True, exact_window=3, band_order="member", position_scope="member")
    assert not config.recurrent
    model = sharp_model(config)
    ids = homolog_window([residues(9, seed=2), residues(11, seed=3)])  # 23 tokens
    changed = ids.clone()
    changed[0, 15:] = residues(8, seed=4)
    torch.testing.assert_close(model(changed).logits[:, :15], model(ids).logits[:, :15], rtol=0, atol=1e-12)
    assert not torch.allclose(model(changed).logits[:, 15:], model(ids).logits[:, 15:])
    # the member order acts: the same weights with the sequence band give other logits
    sequence = sharp_model(tiny_config("favor", causal=True, exact_window=3, position_scope="member"))
    assert (sequence(ids).logits - model(ids).logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="not with band_order='member'"):
        model.decode_step(ids[:, 0])
