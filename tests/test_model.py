"""ProteinPerformer and PerformerConfig: shapes, causality, padding, attention maps, random features,
decoding, and the Hydra seam (conf/model x conf/attention)."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from Bio import SeqIO
from omegaconf import OmegaConf

from protein_performer.data import Alphabet

from protein_performer.model import (
    ATTENTION_GROUP_FIELDS,
    PerformerConfig,
    PerformerOutput,
    ProteinPerformer,
    config_from_hydra,
    projection_seed,
)
from protein_performer.config import ATTENTION
from protein_performer.nn import ATTENTION_KINDS, RANDOM_FEATURE_KINDS
from protein_performer.ops.combiner import default_block_size

VOCAB, PAD = 25, 1
CONF = Path(__file__).resolve().parent.parent / "conf"


def tiny_config(attention: str = "favor", causal: bool = False, **overrides: Any) -> PerformerConfig:
    """conf/model/tiny.yaml's sizes with test-friendly extras: no dropout, few features, short max_length."""
    values: dict[str, Any] = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0,
                                  attention=attention, causal=causal, nb_features=16, max_length=48, pad_idx=PAD)
    if attention == "combiner":
        values["combiner_block_size"] = 4  # several blocks at test lengths
    if attention == "favor_rpe":  # a window shorter than the test lengths: band, buckets and far values all act
        values.update(rpe_exact_distance=2, rpe_max_distance=5)
    values.update(overrides)
    return PerformerConfig(**values)


def sharp_model(config: PerformerConfig) -> ProteinPerformer:
    """A float64 model in eval mode with weights far from the near-uniform init (std 0.02), so that a
    leak of a padded or future token shows up as a large difference, not a rounding-level one."""
    model = ProteinPerformer(config).double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)
    return model


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(PAD + 1, VOCAB, (batch, length), generator=generator)


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_forward_shapes(kind: str) -> None:
    model = ProteinPerformer(tiny_config(kind)).eval()
    ids = random_ids(3, 10)
    out = model(ids, repr_layers=(0, 1, -1), return_attention=True)
    assert isinstance(out, PerformerOutput)
    assert out.logits.shape == (3, 10, VOCAB)
    assert sorted(out.hidden_states) == [0, 1, 2]
    assert all(h.shape == (3, 10, 32) for h in out.hidden_states.values())
    assert out.attentions is not None and out.attentions.shape == (3, 2, 2, 10, 10)
    assert model(ids).attentions is None and model(ids).hidden_states == {}


def test_hidden_state_layers_follow_esm_convention() -> None:
    model = ProteinPerformer(tiny_config(position="learned")).eval()
    ids = random_ids(2, 9)
    out = model(ids, repr_layers=(0, 2))
    positions = model.position_embedding(torch.arange(9))
    torch.testing.assert_close(out.hidden_states[0], model.token_embedding(ids) + positions)
    # The last layer is the final LayerNorm's output: the LM head reads exactly it.
    torch.testing.assert_close(out.logits, model.lm_head(out.hidden_states[2]))
    with pytest.raises(ValueError, match="repr_layers"):
        model(ids, repr_layers=(3,))


def test_lm_head_is_tied_to_the_embedding_by_default() -> None:
    tied = ProteinPerformer(tiny_config())
    assert tied.lm_head.weight is tied.token_embedding.weight
    untied = ProteinPerformer(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.token_embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * 32
    # The pad embedding starts at zero and receives no gradient through the embedding lookup.
    assert tied.token_embedding.weight[PAD].abs().sum() == 0


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_every_parameter_gets_a_gradient(kind: str) -> None:
    model = ProteinPerformer(tiny_config(kind, causal=kind != "softmax"))
    with torch.no_grad():
        for block in model.blocks:  # a zero RPE bias still gets gradients, but start off zero anyway
            if block.attention.rpe_bias is not None:
                block.attention.rpe_bias.normal_()
    model(random_ids(2, 12)).logits.logsumexp(-1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


# ----------------------------------------------------------------------------------------------------
# causality and padding, for every attention kind
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_causal_logits_ignore_future_tokens(kind: str, causal: bool) -> None:
    model = sharp_model(tiny_config(kind, causal=causal))
    ids = random_ids(2, 14, seed=1)
    changed = ids.clone()
    changed[:, 6:] = random_ids(2, 8, seed=2)
    before, after = model(ids).logits, model(changed).logits
    early_gap = (before[:, :6] - after[:, :6]).abs().max().item()
    if causal:
        assert early_gap < 1e-10, f"position < 6 saw a change at >= 6 (max logit change {early_gap:.2e})"
        assert (before[:, 6:] - after[:, 6:]).abs().max() > 1e-3
    else:  # the same test detects leaks: a bidirectional model does see the future
        assert early_gap > 1e-3


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_padding_is_invisible(kind: str) -> None:
    """Bidirectional: every position attends to the padding unless it is masked. (Right padding of a
    causal model sits in every real position's future, which the causality test covers.)"""
    model = sharp_model(tiny_config(kind))
    alone = random_ids(1, 9, seed=3)
    batch = random_ids(2, 17, seed=4)  # junk (not pad ids) after position 9 of row 0: padding is the mask
    batch[0, :9] = alone[0]
    padding = torch.zeros(2, 17, dtype=torch.bool)
    padding[0, 9:] = True
    expected = model(alone).logits[0]
    padded = model(batch, padding).logits[0, :9]
    torch.testing.assert_close(padded, expected, rtol=1e-9, atol=1e-9)
    unmasked = model(batch).logits[0, :9]  # without the mask the junk is visible: the test can fail
    assert (unmasked - expected).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_an_all_false_mask_equals_no_mask(kind: str, causal: bool) -> None:
    """The data module drops the mask of a batch without padding (so softmax keeps SDPA's unmasked fast
    kernels): both forms must give the same outputs and gradients."""
    model = sharp_model(tiny_config(kind, causal=causal))
    ids = random_ids(2, 17, seed=5)
    nothing_padded = torch.zeros(2, 17, dtype=torch.bool)
    masked, unmasked = model(ids, nothing_padded).logits, model(ids).logits
    torch.testing.assert_close(unmasked, masked, rtol=1e-9, atol=1e-9)
    first = torch.autograd.grad(masked.square().sum(), list(model.parameters()))
    second = torch.autograd.grad(unmasked.square().sum(), list(model.parameters()))
    for a, b in zip(first, second):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["favor", "softmax"])
def test_real_proteins_in_a_padded_batch_match_each_protein_alone(kind: str, data_dir: Path) -> None:
    """The float32 training set-up: Alphabet ids of real UniProt proteins, <cls> residues <eos>, padded."""
    alphabet = Alphabet()
    short = (str(record.seq) for record in SeqIO.parse(data_dir / "uniprot_sample.fasta", "fasta")
             if len(record.seq) <= 60)  # whole proteins of different lengths within max_length
    examples = [torch.tensor([alphabet.cls_idx, *alphabet.encode(sequence), alphabet.eos_idx])
                for sequence in itertools.islice(short, 4)]
    ids = torch.nn.utils.rnn.pad_sequence(examples, batch_first=True, padding_value=alphabet.pad_idx)
    padding = ids == alphabet.pad_idx
    assert padding.any(), "the sample's first proteins should differ in length"
    config = tiny_config(kind, vocab_size=len(alphabet), pad_idx=alphabet.pad_idx, max_length=64)
    model = ProteinPerformer(config).eval()
    batched = model(ids, padding).logits
    for row, example in enumerate(examples):
        alone = model(example[None]).logits[0]
        torch.testing.assert_close(batched[row, : len(example)], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# attention maps
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_attentions_are_the_matrices_the_forward_applied(kind: str, causal: bool) -> None:
    """Hooks record each layer's input and its heads' merged output during the same forward pass that
    returns `attentions`; attentions[:, layer] @ v must then reproduce that output."""
    model = sharp_model(tiny_config(kind, causal=causal))
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    for block in model.blocks:
        block.attention.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
        block.attention.out_proj.register_forward_pre_hook(lambda _m, args: outputs.append(args[0]))
    ids = random_ids(2, 13, seed=5)
    padding = torch.zeros(2, 13, dtype=torch.bool)
    padding[1, 8:] = True
    attentions = model(ids, padding, return_attention=True).attentions
    assert attentions is not None
    for layer, block in enumerate(model.blocks):
        _, _, v = block.attention.project_qkv(inputs[layer])
        applied = (attentions[:, layer].to(v.dtype) @ v).transpose(1, 2).reshape(2, 13, 32)  # (B, L, H*D)
        torch.testing.assert_close(applied, outputs[layer], rtol=1e-7, atol=1e-9)
    assert attentions[1, :, :, :, 8:].abs().max() == 0
    rows = attentions.sum(-1)[~padding[:, None, None, :].expand(-1, 2, 2, -1)]  # real queries' rows
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_softmax_maps_are_exact_softmax() -> None:
    model = sharp_model(tiny_config("softmax"))
    captured: list[torch.Tensor] = []
    model.blocks[0].attention.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    ids = random_ids(1, 7)
    attentions = model(ids, return_attention=True).attentions
    q, k, _ = model.blocks[0].attention.project_qkv(captured[0])
    expected = torch.softmax(q @ k.transpose(-1, -2) / (16 ** 0.5), dim=-1)
    torch.testing.assert_close(attentions[:, 0], expected)


# ----------------------------------------------------------------------------------------------------
# random features
# ----------------------------------------------------------------------------------------------------


def _projections(model: ProteinPerformer) -> list[torch.Tensor]:
    return [block.attention.projection.clone() for block in model.blocks]


@pytest.mark.parametrize("kind", RANDOM_FEATURE_KINDS)
def test_redraw_is_a_function_of_seed_step_and_layer(kind: str) -> None:
    torch.manual_seed(0)
    a = ProteinPerformer(tiny_config(kind))
    torch.manual_seed(1)  # another "rank" with a different global RNG state
    b = ProteinPerformer(tiny_config(kind))
    for model in (a, b):
        model.redraw_projections(step=5000)
    first, second = _projections(a), _projections(b)
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not torch.allclose(first[0], first[1]), "layers must get different projections"
    a.redraw_projections(step=6000)
    assert not torch.allclose(_projections(a)[0], first[0]), "a new step must give a new projection"
    c = ProteinPerformer(tiny_config(kind, feature_seed=1))
    c.redraw_projections(step=5000)
    assert not torch.allclose(_projections(c)[0], first[0]), "feature_seed must matter"


def test_projection_seeds_do_not_collide_for_nearby_triples() -> None:
    seeds = {projection_seed(s, t, layer) for s in range(3) for t in range(0, 3000, 1000) for layer in range(4)}
    assert len(seeds) == 36 and all(0 <= seed < 2**63 for seed in seeds)


def test_redraw_leaves_parameters_alone_and_is_a_no_op_for_softmax() -> None:
    model = ProteinPerformer(tiny_config("favor"))
    before = {name: p.clone() for name, p in model.named_parameters()}
    model.redraw_projections(step=3)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    softmax = ProteinPerformer(tiny_config("softmax"))
    softmax.redraw_projections(step=3)
    assert not softmax.uses_random_features and model.uses_random_features
    with pytest.raises(ValueError, match="non-negative integer step"):
        model.redraw_projections(step=-1)


def test_eval_forward_is_deterministic() -> None:
    model = ProteinPerformer(tiny_config("favor", dropout=0.1)).eval()
    ids = random_ids(2, 12)
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", RANDOM_FEATURE_KINDS)
def test_projection_travels_in_the_state_dict(kind: str) -> None:
    source = ProteinPerformer(tiny_config(kind)).eval()
    source.redraw_projections(step=7)
    state = source.state_dict()
    assert {f"blocks.{i}.attention.projection" for i in range(2)} <= set(state)
    target = ProteinPerformer(tiny_config(kind, feature_seed=99)).eval()
    ids = random_ids(1, 10)
    assert not torch.allclose(target(ids).logits, source(ids).logits)
    target.load_state_dict(state)
    torch.testing.assert_close(target(ids).logits, source(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# step-by-step decoding
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,position", [("favor", "rotary"), ("favor_relu", "learned"), ("favor", "none")])
def test_decode_step_equals_the_parallel_forward(kind: str, position: str) -> None:
    model = sharp_model(tiny_config(kind, causal=True, position=position))
    ids = random_ids(2, 11, seed=6)
    parallel = model(ids).logits
    state = None
    for t in range(ids.shape[1]):
        logits, state = model.decode_step(ids[:, t], state)
        torch.testing.assert_close(logits, parallel[:, t], rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------------------------------
# position_scope='member': positions restart at each <cls>/<eos> (homolog windows)
# ----------------------------------------------------------------------------------------------------

CLS, EOS = Alphabet().cls_idx, Alphabet().eos_idx


def homolog_window(members: list[torch.Tensor]) -> torch.Tensor:
    """<cls> m1 <eos> m2 <eos> ... as one [1, T] input."""
    pieces = [torch.tensor([CLS])]
    for member in members:
        pieces += [member, torch.tensor([EOS])]
    return torch.cat(pieces)[None]


def residues(length: int, seed: int) -> torch.Tensor:
    """Ids that are neither separators nor padding."""
    return torch.randint(EOS + 1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,position", [("favor", "rotary"), ("favor_relu", "learned"), ("favor", "learned")])
def test_member_positions_decode_step_equals_the_parallel_forward(kind: str, position: str) -> None:
    model = sharp_model(tiny_config(kind, causal=True, position=position, position_scope="member"))
    ids = torch.cat([homolog_window([residues(4, 1), residues(6, 2)]),
                     torch.cat([homolog_window([residues(3, 3)]), homolog_window([residues(6, 4)])], dim=1)])  # 13 tokens each
    parallel = model(ids).logits
    state = None
    for t in range(ids.shape[1]):
        logits, state = model.decode_step(ids[:, t], state)
        torch.testing.assert_close(logits, parallel[:, t], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("position", ["rotary", "learned"])
def test_member_positions_change_windows_but_not_single_proteins(position: str) -> None:
    member = sharp_model(tiny_config("softmax", position=position, position_scope="member"))
    window = sharp_model(tiny_config("softmax", position=position))
    window.load_state_dict(member.state_dict())
    single = homolog_window([residues(9, 5)])
    torch.testing.assert_close(member(single).logits, window(single).logits, rtol=0, atol=0)
    pair = homolog_window([residues(9, 5), residues(7, 6)])
    assert (member(pair).logits - window(pair).logits).abs().max() > 1e-3


def test_member_positions_give_an_aligned_copy_the_score_of_the_residue_itself() -> None:
    """In a window of two identical members, the first layer scores query t of the copy against key t of
    the original exactly as against its own key: the same token at the same position. Counted from the
    window's start, the copy sits 10 positions later and the scores differ."""
    protein = residues(9, 7)
    ids = homolog_window([protein, protein])  # <cls> at 0, original at 1..9, <eos> at 10, copy at 11..19
    for scope, same in (("member", True), ("window", False)):
        model = sharp_model(tiny_config("softmax", position_scope=scope))
        weights = model(ids, return_attention=True).attentions[0, 0]  # layer 1: (heads, T, T)
        copy, original = torch.arange(11, 20), torch.arange(1, 10)
        own, aligned = weights[:, copy, copy], weights[:, copy, original]
        assert torch.allclose(own, aligned, rtol=1e-10, atol=0) is same


def test_member_positions_bound_learned_positions_per_member() -> None:
    """A learned table of 48 positions reads windows longer than 48 whose members are shorter."""
    ids = homolog_window([residues(20, 8), residues(20, 9), residues(20, 10)])  # 64 tokens
    assert ProteinPerformer(tiny_config(position="learned", position_scope="member"))(ids).logits.shape[1] == 64
    with pytest.raises(ValueError, match="max_length"):
        ProteinPerformer(tiny_config(position="learned"))(ids)


@pytest.mark.parametrize("length", [4, 23], ids=["inside-window", "beyond-window"])
def test_windowed_favor_rpe_decode_step_equals_the_parallel_forward(length: int) -> None:
    """The recurrent state (last w keys + far prefix) reproduces the parallel windowed forward, w = 5."""
    model = sharp_model(tiny_config("favor_rpe", causal=True))
    ids = random_ids(2, length, seed=8)
    parallel = model(ids).logits
    state = None
    for t in range(length):
        logits, state = model.decode_step(ids[:, t], state)
        torch.testing.assert_close(logits, parallel[:, t], rtol=1e-8, atol=1e-8)
    assert state.layers[0].keys.shape[2] == min(length, 5)  # only the window is kept


def test_generate_extends_the_prompt_reproducibly() -> None:
    model = ProteinPerformer(tiny_config("favor", causal=True)).eval()
    prompt = random_ids(2, 4)
    first = model.generate(prompt, 6, generator=torch.Generator().manual_seed(0))
    again = model.generate(prompt, 6, generator=torch.Generator().manual_seed(0))
    assert first.shape == (2, 10) and torch.equal(first[:, :4], prompt) and torch.equal(first, again)
    greedy = model.generate(prompt, 3, temperature=0)
    assert torch.equal(greedy[:, 4], model(prompt).logits[:, -1].argmax(-1))


@pytest.mark.parametrize("kind,causal", [("favor", False), ("softmax", True), ("favor_rpe", True)])
def test_decode_step_needs_a_causal_recurrent_kind(kind: str, causal: bool) -> None:
    # favor_rpe has a finite state only with a windowed bias; the full bias reaches every past offset
    model = ProteinPerformer(tiny_config(kind, causal=causal, **({"rpe_max_distance": None} if kind == "favor_rpe"
                                                                  else {})))
    with pytest.raises(ValueError, match="decode_step needs causal=True"):
        model.decode_step(random_ids(1, 1)[:, 0])


# ----------------------------------------------------------------------------------------------------
# PerformerConfig
# ----------------------------------------------------------------------------------------------------


def test_config_round_trips_through_a_dict() -> None:
    config = tiny_config("combiner", combiner_block_size=None)
    assert config.combiner_block_size == 7  # ceil(sqrt(max_length=48)), the rule of ops.combiner
    assert PerformerConfig.from_dict(config.to_dict()) == config


def test_vocab_size_defaults_to_the_alphabet() -> None:
    assert PerformerConfig().vocab_size == len(Alphabet())


@pytest.mark.parametrize("max_length", [48, 500, 1024, 8192])
def test_combiner_block_size_has_one_default_rule(max_length: int) -> None:
    """The config's default is the op's own default at L = max_length: one rule, ceil(sqrt(L))."""
    config = tiny_config("combiner", combiner_block_size=None, max_length=max_length)
    assert config.combiner_block_size == default_block_size(max_length)


def test_every_registered_kind_has_a_config_file_and_every_file_a_kind() -> None:
    """A file per kind, named as the kind; other files are presets of a kind (favor_member64: favor with
    settings), whose `kind` comes from the file they extend."""
    files = {p.stem: OmegaConf.load(p) for p in (CONF / "attention").glob("*.yaml")}
    assert set(ATTENTION) <= set(files)
    for name, values in files.items():
        kind = values.get("kind") or files[values.defaults[0]].kind
        assert kind in ATTENTION and (kind == name or name not in ATTENTION), name
    assert ATTENTION_KINDS == tuple(ATTENTION)
    assert RANDOM_FEATURE_KINDS == tuple(name for name, row in ATTENTION.items() if row.random_features)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_longest_input_and_recurrence_follow_the_registry(kind: str) -> None:
    config = tiny_config(kind, causal=True)
    assert config.recurrent == (ATTENTION[kind].step is not None and ATTENTION[kind].is_recurrent(config))
    assert config.longest_input == ATTENTION[kind].length_bound(config)
    assert tiny_config(kind, position="learned").longest_input == 48
    assert tiny_config(kind, causal=False).recurrent is False


def test_config_from_dict_rejects_unknown_keys() -> None:
    values = tiny_config().to_dict() | {"n_head": 4}
    with pytest.raises(ValueError, match=r"unknown PerformerConfig keys \['n_head'\]"):
        PerformerConfig.from_dict(values)


def test_position_defaults_depend_on_the_attention_kind() -> None:
    assert tiny_config("favor").position == "rotary"
    assert tiny_config("favor_rpe").position == "none"
    assert tiny_config("favor_rpe", position="rotary").position == "rotary"  # explicit choice is kept
    assert ProteinPerformer(tiny_config("favor_rpe")).blocks[0].attention.rotary is None


@pytest.mark.parametrize("overrides,message", [
    (dict(d_model=30, n_heads=4), "not divisible by n_heads"),
    (dict(attention="linear"), "unknown attention kind"),
    (dict(position="absolute"), "unknown position"),
    (dict(d_model=30, n_heads=2), "must be even"),
    (dict(position="none"), "blind to residue order"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(causal="yes"), "causal must be true or false"),
    (dict(pad_idx=VOCAB), "pad_idx"),
    (dict(combiner_variant="diagonal"), "combiner_variant"),
    (dict(rpe_max_distance=0), "rpe_max_distance"),
    (dict(rpe_max_distance=8, rpe_exact_distance=9), "rpe_exact_distance=9 exceeds rpe_max_distance=8"),
    (dict(rpe_exact_distance=0), "rpe_exact_distance"),
    (dict(position_scope="sequence"), "unknown position_scope"),
    (dict(position_scope="member", position="none", causal=True), "position_scope='member' restarts"),
    (dict(attention="favor_rpe", position_scope="member"), "position_scope='member' restarts"),
], ids=lambda value: value if isinstance(value, str) else ",".join(value))
def test_invalid_configs_fail_with_a_clear_message(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_sequences_beyond_max_length_are_refused_where_positions_are_tabled() -> None:
    ids = random_ids(1, 49)
    for config in (tiny_config(position="learned"), tiny_config("favor_rpe", rpe_max_distance=None)):
        with pytest.raises(ValueError, match="max_length"):
            ProteinPerformer(config)(ids)
    for config in (tiny_config(position="rotary"), tiny_config("favor_rpe")):  # a windowed bias: any length
        assert ProteinPerformer(config)(ids).logits.shape == (1, 49, VOCAB)


def test_windowed_rpe_parameters_do_not_depend_on_max_length() -> None:
    short, long = (ProteinPerformer(tiny_config("favor_rpe", max_length=n, rpe_exact_distance=32,
                                                rpe_max_distance=128)) for n in (48, 30_000))
    assert short.num_parameters() == long.num_parameters()
    # 63 exact offsets + 2 x 8 log buckets (32..127, 4 per octave) + 2 far values, per head
    assert short.blocks[0].attention.rpe_bias.shape == (2, 81)
    full = ProteinPerformer(tiny_config("favor_rpe", rpe_max_distance=None))
    assert full.blocks[0].attention.rpe_bias.shape == (2, 2 * 48 - 1)


# ----------------------------------------------------------------------------------------------------
# Hydra seam: conf/model/*.yaml x conf/attention/*.yaml
# ----------------------------------------------------------------------------------------------------


def _compose(model: str, attention: str, seed: int = 3) -> tuple[Any, Any]:
    """The two groups as Hydra would place them under a root that defines `seed` (conf/train.yaml)."""
    root = OmegaConf.create({"seed": seed, "model": OmegaConf.load(CONF / "model" / f"{model}.yaml"),
                             "attention": OmegaConf.load(CONF / "attention" / f"{attention}.yaml")})
    return root.model, root.attention


# one file per kind (presets such as favor_member64 extend one through Hydra's defaults: tests/test_configs.py)
@pytest.mark.parametrize("attention", sorted(ATTENTION))
@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_and_attention_preset_builds_a_config(model: str, attention: str) -> None:
    model_cfg, attention_cfg = _compose(model, attention)
    config = config_from_hydra(model_cfg, attention_cfg, vocab_size=VOCAB, pad_idx=PAD, causal=True)
    assert config.attention == attention
    assert config.d_model == model_cfg.d_model and config.n_layers == model_cfg.n_layers
    assert config.position == ("none" if attention == "favor_rpe" else "rotary")
    if attention in RANDOM_FEATURE_KINDS:
        assert config.feature_seed == 3 and config.nb_features == 256


def test_presets_have_the_papers_sizes() -> None:
    sizes = {name: config_from_hydra(*_compose(name, "favor"), vocab_size=VOCAB, pad_idx=PAD, causal=False)
             for name in ("tiny", "small", "progen", "concat")}
    progen, concat = sizes["progen"], sizes["concat"]
    assert (progen.n_layers, progen.n_heads, progen.d_model, progen.d_ff) == (36, 8, 512, 1024)
    assert (concat.n_layers, concat.d_model, concat.d_ff, concat.max_length) == (6, 512, 2048, 8192)
    assert ProteinPerformer(sizes["tiny"]).num_parameters() < 25_000
    assert ProteinPerformer(sizes["small"]).num_parameters() < 1_000_000


def test_config_from_hydra_fails_loudly_on_unknown_or_misplaced_keys() -> None:
    model_cfg, attention_cfg = _compose("tiny", "favor")
    kwargs = dict(vocab_size=VOCAB, pad_idx=PAD, causal=False)
    with pytest.raises(ValueError, match=r"conf/model: unknown or misplaced keys \['n_head'\]"):
        config_from_hydra({**model_cfg, "n_head": 2}, attention_cfg, **kwargs)
    with pytest.raises(ValueError, match=r"conf/model: unknown or misplaced keys \['nb_features'\]"):
        config_from_hydra({**model_cfg, "nb_features": 8}, attention_cfg, **kwargs)
    with pytest.raises(ValueError, match=r"conf/model: unknown or misplaced keys \['causal'\]"):
        config_from_hydra({**model_cfg, "causal": True}, attention_cfg, **kwargs)
    with pytest.raises(ValueError, match=r"conf/attention: unknown or misplaced keys \['d_model'\]"):
        config_from_hydra(model_cfg, {**attention_cfg, "d_model": 8}, **kwargs)
    with pytest.raises(ValueError, match="needs `kind`"):
        config_from_hydra(model_cfg, {"nb_features": 8}, **kwargs)


def test_attention_group_fields_exist_in_the_config() -> None:
    names = {f.name for f in dataclasses.fields(PerformerConfig)}
    assert set(ATTENTION_GROUP_FIELDS) <= names


def test_favor_rpe_config_saved_before_the_windowed_bias_loads_with_its_free_bias() -> None:
    saved = tiny_config("favor_rpe").to_dict()
    del saved["rpe_max_distance"], saved["rpe_exact_distance"]  # what a checkpoint of the older version holds
    old = ProteinPerformer(PerformerConfig.from_dict(saved))
    assert old.config.rpe_max_distance is None
    rpe_biases = [p for name, p in old.named_parameters() if name.endswith("rpe_bias")]
    assert rpe_biases and all(p.shape[-1] == 2 * old.config.max_length - 1 for p in rpe_biases)
    assert PerformerConfig.from_dict(tiny_config("favor_rpe").to_dict()).rpe_max_distance == 5
