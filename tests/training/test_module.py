"""ProteinLM without a Trainer: loss and metric definitions, optimiser groups, LR schedule."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protein_performer.data import Alphabet, read_fasta
from protein_performer.model import PerformerConfig
from protein_performer.training.module import (
    ProteinLM,
    TokenMetrics,
    dropout_seed,
    lr_factor,
    parameter_groups,
    use_fused_adamw,
)


def _sequences(data_dir, count: int) -> list[str]:
    """The first `count` sequences of the bundled UniProtKB sample."""
    return [record.sequence for record, _ in zip(read_fasta(data_dir / "uniprot_sample.fasta"), range(count))]


def _batch(data_dir, objective: str, length: int = 48) -> dict[str, torch.Tensor]:
    """<cls> residues <eos> of 4 real proteins (cropped, padded), labelled as the data module does."""
    alphabet = Alphabet()
    rows = [np.concatenate([[alphabet.cls_idx], alphabet.encode(s)[: length - 2], [alphabet.eos_idx]])
            for s in _sequences(data_dir, 4)]
    rows[1] = rows[1][:20]  # one short row so that padding is exercised
    input_ids = torch.full((len(rows), length), alphabet.pad_idx)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.from_numpy(row.astype(np.int64))
    padding_mask = input_ids == alphabet.pad_idx
    labels = torch.full_like(input_ids, -100)
    if objective == "mlm":
        masked = (torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(0)) < 0.15) & ~padding_mask
        labels[masked] = input_ids[masked]
        input_ids = input_ids.masked_fill(masked, alphabet.mask_idx)
    else:  # labels[:, i] is the token after position i
        labels[:, :-1] = input_ids[:, 1:]
        labels[:, :-1][padding_mask[:, 1:]] = -100
    return {"input_ids": input_ids, "labels": labels, "padding_mask": padding_mask}


def _module(objective: str, attention: str = "favor") -> ProteinLM:
    alphabet = Alphabet()
    config = PerformerConfig(vocab_size=len(alphabet), d_model=32, n_layers=2, n_heads=2, d_ff=64,
                             attention=attention, causal=objective == "clm", nb_features=16,
                             pad_idx=alphabet.pad_idx)
    torch.manual_seed(0)
    return ProteinLM(config.to_dict(), objective)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_loss_is_cross_entropy_averaged_over_labelled_tokens(objective, data_dir):
    module = _module(objective).eval()
    batch = _batch(data_dir, objective)
    loss_sum, correct, count = module.token_statistics(batch)

    logits = module(batch["input_ids"], batch["padding_mask"])
    positions = (batch["labels"] != -100).nonzero().tolist()
    losses = [-F.log_softmax(logits[b, i], dim=-1)[batch["labels"][b, i]] for b, i in positions]
    hits = [int(logits[b, i].argmax() == batch["labels"][b, i]) for b, i in positions]
    assert count == len(positions)
    torch.testing.assert_close(loss_sum, torch.stack(losses).sum())
    assert correct == sum(hits)
    if objective == "clm":  # every real token but the last of each row is scored
        assert count == int((~batch["padding_mask"]).sum()) - batch["input_ids"].shape[0]


def test_perplexity_is_exp_of_token_weighted_loss_not_mean_of_batch_perplexities():
    metric = TokenMetrics()
    metric.update(torch.tensor(10.0), torch.tensor(3), torch.tensor(5))  # mean loss 2 over 5 tokens
    metric.update(torch.tensor(3.0), torch.tensor(0), torch.tensor(1))  # mean loss 3 over 1 token
    values = metric.compute()
    torch.testing.assert_close(values["loss"], torch.tensor(13.0 / 6))
    torch.testing.assert_close(values["perplexity"], torch.tensor(math.exp(13.0 / 6)))
    torch.testing.assert_close(values["accuracy"], torch.tensor(0.5))


def test_objective_must_match_the_model_direction():
    config = _module("clm").config.to_dict()
    with pytest.raises(ValueError, match="objective='mlm' needs a bidirectional model"):
        ProteinLM(config, "mlm")


def test_weight_decay_applies_to_matrices_only_and_tied_weights_once():
    module = _module("mlm")
    decay, no_decay = parameter_groups(module, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    assert id(module.model.token_embedding.weight) in ids  # also the tied LM head
    assert id(module.model.blocks[0].attention.qkv.weight) in ids
    assert all(p.dim() == 1 for p in no_decay["params"])  # biases and LayerNorm gains
    assert id(module.model.final_norm.weight) in {id(p) for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_learning_rate_warms_up_linearly_then_decays_to_the_floor(decay):
    factors = [lr_factor(step, 10, 110, decay, 0.1) for step in range(111)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert np.all(np.diff(factors[:11]) > 0)  # warming up
    assert factors[10] == pytest.approx(1.0)  # the peak, right after warmup
    assert np.all(np.diff(factors[10:]) < 0)  # decaying
    assert factors[110] == pytest.approx(0.1)
    midpoint = 1 - 0.9 * 0.5 if decay == "linear" else 0.1 + 0.9 * 0.5  # both halfway at step 60
    assert factors[60] == pytest.approx(midpoint)


def test_learning_rate_stays_at_peak_without_a_known_end_or_with_constant_decay():
    assert lr_factor(500, 10, math.inf, "linear", 0.0) == 1.0
    assert lr_factor(500, 10, 1000, "constant", 0.0) == 1.0


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_softmax_gets_no_mask_for_an_unpadded_batch(objective, data_dir, tmp_path, monkeypatch):
    """SDPA leaves its flash and memory-efficient kernels for any mask, all-False included: a batch of
    the data module with nothing padded must reach the op without one (and a padded batch with one, unless
    the model is causal: its right padding needs none)."""
    from protein_performer import ops
    from protein_performer.data import ProteinDataModule

    received = []
    softmax_attention = ops.softmax_attention

    def spy(*args, key_padding_mask=None, **kwargs):
        received.append(key_padding_mask)
        return softmax_attention(*args, key_padding_mask=key_padding_mask, **kwargs)

    monkeypatch.setattr(ops, "softmax_attention", spy)
    module = _module(objective, attention="softmax")
    settings = dict(fasta=str(data_dir / "uniprot_sample.fasta"), cache_dir=str(tmp_path), objective=objective,
                    max_length=64, tokens_per_batch=512, batch_size=2)
    concat = ProteinDataModule(sampling="concat", **settings)
    concat.setup("fit")
    batch = next(iter(concat.train_dataloader()))
    assert batch["padding_mask"] is None
    module.token_statistics(batch)  # what training_step, validation_step and test_step run
    assert received == [None] * module.config.n_layers

    received.clear()
    single = ProteinDataModule(sampling="single", **settings)
    single.setup("fit")
    batch = next(b for b in single.train_dataloader() if (b["input_ids"] == Alphabet().pad_idx).any())
    module.token_statistics(batch)
    assert len(received) == module.config.n_layers
    if objective == "clm":  # right padding is in a causal model's future: no mask (SDPA's causal kernel)
        assert received == [None] * module.config.n_layers
    else:
        assert all(torch.equal(mask, batch["padding_mask"]) for mask in received)


def test_causal_softmax_runs_sdpa_causal_kernel_without_a_mask_on_right_padding(data_dir, monkeypatch):
    module = _module("clm", attention="softmax").eval()
    batch = _batch(data_dir, "clm")
    assert batch["padding_mask"].any()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal", False)))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    loss_sum, correct, count = module.token_statistics(batch)
    assert calls and all(mask is None and causal for mask, causal in calls)
    monkeypatch.undo()
    # the same figures as the masked forward at every scored (real) position
    logits = module(batch["input_ids"], batch["padding_mask"])
    scored = batch["labels"] != -100
    expected = F.cross_entropy(logits[scored], batch["labels"][scored], reduction="sum")
    torch.testing.assert_close(loss_sum, expected)
    assert int(correct) == int((logits.argmax(-1) == batch["labels"])[scored].sum())
    assert int(count) == int(scored.sum())


def test_bidirectional_softmax_keeps_its_padding_mask(data_dir, monkeypatch):
    module = _module("mlm", attention="softmax").eval()
    masks = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: masks.append(k.get("attn_mask")) or sdpa(*a, **k))
    module.token_statistics(_batch(data_dir, "mlm"))
    assert masks and all(mask is not None for mask in masks)


def test_dropout_differs_between_micro_batches_of_one_accumulation_window():
    module = _module("mlm")
    seeds = {}
    for step, batch_idx in [(3, 0), (3, 1), (3, 2), (4, 4), (4, 5)]:
        module._trainer = SimpleNamespace(global_step=step, global_rank=0, accumulate_grad_batches=4)
        module.on_train_batch_start({}, batch_idx)
        seeds[step, batch_idx] = torch.initial_seed()
    assert len(set(seeds.values())) == len(seeds)  # every micro-batch its own masks
    module._trainer = SimpleNamespace(global_step=3, global_rank=0, accumulate_grad_batches=4)
    module.on_train_batch_start({}, 1)
    assert torch.initial_seed() == seeds[3, 1]  # a function of (seed, step, rank, micro-batch): resumable
    module._trainer = SimpleNamespace(global_step=3, global_rank=1, accumulate_grad_batches=4)
    module.on_train_batch_start({}, 1)
    assert torch.initial_seed() != seeds[3, 1]  # ranks drop different units
    # without accumulation, the seeds of earlier versions (older checkpoints resume exactly)
    assert dropout_seed(0, 3, 0) == dropout_seed(0, 3, 0, micro_batch=0) == seeds[3, 0]


def test_adamw_is_fused_on_cuda_only():
    cpu = [torch.zeros(2, requires_grad=True)]
    assert not use_fused_adamw(cpu) and not use_fused_adamw([])
    assert use_fused_adamw([SimpleNamespace(device=torch.device("cuda", 0))] * 2)
    assert not use_fused_adamw([SimpleNamespace(device=torch.device("cuda", 0)), *cpu])
    module = _module("mlm")
    module._trainer = SimpleNamespace(estimated_stepping_batches=100)
    optimizer = module.configure_optimizers()["optimizer"]
    assert not optimizer.defaults["fused"]
