"""torch.compile: the attention ops trace without graph breaks, and compiled equals eager."""
from __future__ import annotations

import copy

import pytest
import torch

from protein_performer.data import Alphabet
from protein_performer.model import PerformerConfig, ProteinPerformer
from protein_performer.ops import stabilise
from protein_performer.training.module import ProteinLM, pad_length_to_multiple

CASES = [  # (kind, causal, padded): favor's two Functions and its chunk-state scan, softmax's maskless path,
    # windowed favor_rpe's band-and-far-state Function
    pytest.param("favor", True, True, id="favor-causal-padded"),
    pytest.param("favor_relu", False, True, id="favor_relu-bidirectional-padded"),
    pytest.param("softmax", True, False, id="softmax-causal-unpadded"),
    pytest.param("combiner", True, True, id="combiner-causal-padded"),
    pytest.param("favor_rpe", True, True, id="favor_rpe-causal-padded"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,causal,padded", CASES)
def test_compiled_model_equals_eager_with_gradients_and_no_graph_break(kind, causal, padded, monkeypatch):
    """fullgraph=True turns any graph break (e.g. an `out=` write into a strided view, which Dynamo
    cannot trace) into an error. 160 positions: three FAVOR+ chunks of 64, the last one partial, and
    scan groups of 2 chunks, so the causal scan carries state across groups as at L > 2048."""
    monkeypatch.setattr(stabilise, "SCAN_GROUP", 2)
    torch._dynamo.reset()
    config = PerformerConfig(vocab_size=25, d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0, attention=kind,
                             causal=causal, nb_features=16, max_length=256, pad_idx=1, combiner_block_size=16)
    torch.manual_seed(0)
    eager = ProteinPerformer(config)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager", fullgraph=True)
    ids = torch.randint(2, 25, (2, 160), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[1, 120:] = True
    expected, actual = eager(ids, mask).logits, compiled(ids, mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    expected.square().mean().backward()
    actual.square().mean().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_length_buckets_change_no_statistic(objective):
    """Padding batches to a multiple of 64 (what a compiled run does, so it meets few lengths) leaves
    the loss, accuracy and scored-token count of every batch as they were."""
    alphabet = Alphabet()
    config = PerformerConfig(vocab_size=len(alphabet), d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0,
                             attention="favor", causal=objective == "clm", nb_features=16, max_length=256,
                             pad_idx=alphabet.pad_idx)
    torch.manual_seed(0)
    plain = ProteinLM(config.to_dict(), objective).double().eval()
    bucketed = copy.deepcopy(plain)
    bucketed.length_multiple = 64
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 25, (3, 70), generator=generator)
    labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.3, ids, -100)
    padding = torch.zeros_like(ids, dtype=torch.bool)
    padding[2, 50:] = True
    for mask in (padding, None):
        batch = {"input_ids": ids.masked_fill(padding, alphabet.pad_idx) if mask is not None else ids,
                 "labels": labels.masked_fill(padding, -100) if mask is not None else labels, "padding_mask": mask}
        padded = pad_length_to_multiple(batch, 64, alphabet.pad_idx)
        assert padded["input_ids"].shape == (3, 128) and padded["padding_mask"][:, 70:].all()
        for a, b in zip(plain.token_statistics(batch), bucketed.token_statistics(batch), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)  # the loss is summed in float32


def test_train_compiles_the_model_in_place_when_asked(tmp_path, monkeypatch):
    """compile=true: the inner model is compiled in place (state-dict names unchanged) with the chosen
    backend, and its batches are padded to multiples of 64; compile=false (the default) leaves both."""
    from protein_performer import train
    from protein_performer.train import compose_config

    seen = []

    class Stop(Exception):
        pass

    def compile_(model, **options):
        seen.append(options)
        raise Stop

    monkeypatch.setattr(ProteinPerformer, "compile", compile_)
    with pytest.raises(Stop):
        overrides = ["model=tiny", "logger=none", "compile=true", "compile_backend=aot_eager"]
        train.train(compose_config(overrides, tmp_path))
    assert seen == [{"backend": "aot_eager"}]
    assert compose_config([], tmp_path).compile is False
