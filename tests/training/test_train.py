"""Training runs in-process: every attention kind and objective, learning, resuming, loading, logging."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from protein_performer import load_model
from protein_performer.model import ProteinPerformer
from protein_performer.nn import ATTENTION_KINDS
from protein_performer.train import TrainResult, compose_config, train
from protein_performer.training import FeatureRedraw

from .runs import tiny_overrides

STEPS = 30  # the uninterrupted run; the interrupted one stops at STEPS // 2 and resumes
REDRAW = 4  # FAVOR+ feature redraw interval of these runs: several redraws per run, none at the stop


class StopAt(pl.Callback):
    """Ends fit after the validation (and checkpoint) at `step`, like a job killed right after saving."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _run(output_dir: Path, cache: Path, *extra: str, callbacks: tuple[pl.Callback, ...] = ()) -> TrainResult:
    cfg = compose_config(tiny_overrides(cache, f"trainer.max_steps={STEPS}",
                                        f"trainer.val_check_interval={STEPS // 2}", "logger=csv",
                                        "trainer.log_every_n_steps=1", "attention=favor", "model.d_model=64",
                                        "model.d_ff=128", f"attention.feature_redraw_interval={REDRAW}", "optim.lr=3e-3",
                                        *extra),
                         output_dir)
    return train(cfg, callbacks)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, store_cache) -> TrainResult:
    """STEPS optimizer steps of a tiny FAVOR+ MLM on the bundled sample, uninterrupted."""
    return _run(tmp_path_factory.mktemp("straight"), store_cache)


def test_loss_falls_on_real_sequences(straight):
    # An untrained model predicts about uniformly over the 30 tokens (perplexity ~30); residue
    # frequencies alone are worth ~18. The run must have learned at least those.
    assert straight.val_perplexity < 20.0
    rows = list(csv.DictReader((Path(straight.trainer.default_root_dir) / "metrics.csv").open()))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2


# Where the interruption at step STEPS // 2 falls, set by the epoch length (+trainer.limit_train_batches):
# the sample's full epoch is longer than the run (mid-epoch 0); an epoch of STEPS // 2 batches (its
# boundary); an epoch of STEPS // 3 batches (mid-epoch 1, then a new epoch after the resume).
EPOCHS = {"mid-epoch": (), "epoch-boundary": (f"+trainer.limit_train_batches={STEPS // 2}",),
          "mid-second-epoch": (f"+trainer.limit_train_batches={STEPS // 3}",)}


@pytest.mark.parametrize("where", list(EPOCHS))
def test_resumed_run_continues_the_same_trajectory(where, straight, tmp_path, store_cache):
    epoch = EPOCHS[where]
    reference = straight if not epoch else _run(tmp_path / "straight", store_cache, *epoch)
    first = _run(tmp_path / "first", store_cache, *epoch, callbacks=(StopAt(STEPS // 2),))
    assert first.trainer.global_step == STEPS // 2
    resumed = _run(tmp_path / "resumed", store_cache, *epoch, f"ckpt_path={first.checkpoint}")
    assert resumed.trainer.global_step == STEPS
    assert resumed.trainer.current_epoch == reference.trainer.current_epoch

    # Same data order, masks, dropout (seeded per step) and feature redraws (from the step): the
    # resumed weights match the uninterrupted ones up to float reassociation.
    expected, actual = reference.module.state_dict(), resumed.module.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert resumed.val_perplexity == pytest.approx(reference.val_perplexity, rel=1e-4)
    assert resumed.metrics["train/loss"] == pytest.approx(reference.metrics["train/loss"], rel=1e-4)


def test_favor_features_are_redrawn_on_schedule(straight):
    redraw = next(c for c in straight.trainer.callbacks if isinstance(c, FeatureRedraw))
    assert redraw.redraw_steps == list(range(REDRAW, STEPS + 1, REDRAW))
    model = straight.module.model
    fresh = ProteinPerformer(model.config)
    fresh.redraw_projections(redraw.redraw_steps[-1])
    for trained, expected in zip(model.blocks, fresh.blocks):
        torch.testing.assert_close(trained.attention.projection, expected.attention.projection)


def test_load_model_gives_the_trained_network_for_inference(straight):
    model, alphabet = load_model(straight.checkpoint)
    assert not model.training and alphabet.tokens == straight.module.hparams.alphabet_tokens
    trained = straight.module.model.eval()
    ids = torch.tensor([[alphabet.cls_idx, *alphabet.encode("MKTAYIAKQRQISFVKSHFSRQ"), alphabet.eos_idx]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained(ids).logits)
    # A run directory works too: its checkpoints/last.ckpt.
    again, _ = load_model(Path(straight.checkpoint).parent.parent)
    torch.testing.assert_close(again.blocks[0].attention.projection, model.blocks[0].attention.projection)


def test_run_logs_curves_throughput_and_evaluations(straight):
    run_dir = Path(straight.trainer.default_root_dir)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    validations = [row for row in rows if row.get("val/perplexity")]
    assert [int(row["step"]) for row in validations] == [STEPS // 2, STEPS]
    elapsed = [float(row["val/elapsed_seconds"]) for row in validations]
    assert 0 < elapsed[0] < elapsed[1]
    assert all(float(row["train/tokens_per_sec"]) > 0 for row in rows if row.get("train/tokens_per_sec"))
    norms = [float(row["train/grad_norm"]) for row in rows if row.get("train/grad_norm")]
    assert len(norms) == STEPS and all(0 < norm < float("inf") for norm in norms)  # every step, before clipping
    for split in ("test", "ood"):
        assert 1 < straight.metrics[f"{split}/perplexity"] < 31
        # Masked-only: the positions shown as <mask> alone, a subset of the targets, so another figure.
        assert 1 < straight.metrics[f"{split}/perplexity_masked"] < 31
        assert straight.metrics[f"{split}/perplexity_masked"] != straight.metrics[f"{split}/perplexity"]
        assert 0 <= straight.metrics[f"{split}/accuracy_masked"] <= 1
    assert all(row.get("val/perplexity_masked") for row in validations)
    assert not any(key.endswith(("_first", "_later")) for key in straight.metrics)  # no homolog windows here
    # The baselines on the same targets are logged beside the run's metrics (compare.py reads them).
    baselines = [row for row in rows if row.get("val/baseline_frequency_perplexity_masked")]
    assert len(baselines) == 1 and 15 < float(baselines[0]["val/baseline_frequency_perplexity_masked"]) < 21
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"best-step{STEPS:06d}.ckpt", "last.ckpt"]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["run_settings"]  # for resume checks
    assert saved["model"]["attention"] == "favor" and saved["objective"] == "mlm" and saved["data"]["max_length"] == 64


@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_fast_dev_run(attention, objective, tmp_path, store_cache):
    cfg = compose_config(tiny_overrides(store_cache, f"attention={attention}", f"objective={objective}",
                                        "+trainer.fast_dev_run=true", "logger=none"), tmp_path)
    result = train(cfg)
    assert result.trainer.global_step == 1
    assert result.module.model.config.causal == (objective == "clm")
    for key in ("train/loss", "val/perplexity", "test/perplexity"):
        assert torch.isfinite(torch.tensor(result.metrics[key])), key


@pytest.mark.parametrize(("objective", "names"), [("mlm", ("masked_first", "masked_later")),
                                                  ("clm", ("first", "later"))])
def test_member_metrics_report_first_and_later_members_apart(objective, names, tmp_path, store_cache):
    # Concatenated windows stand in for homolog windows: <eos>-joined proteins, members counted from
    # the window start (no <cls>); windows longer than most proteins, so both sets have targets.
    cfg = compose_config(tiny_overrides(store_cache, f"objective={objective}", "data.sampling=concat",
                                        "data.max_length=512", "data.tokens_per_batch=2048", "member_metrics=true",
                                        "+trainer.fast_dev_run=true", "logger=none"), tmp_path)
    result = train(cfg)
    for split in ("val", "test"):
        for name in names:
            assert 1 < result.metrics[f"{split}/perplexity_{name}"] < 40, (split, name)
    assert 1 < result.metrics[f"val/baseline_frequency_perplexity_{names[1]}"] < 40
    assert result.module.target_sets[-2:] == names


def test_one_bf16_mixed_precision_step_on_cpu(tmp_path, store_cache):
    cfg = compose_config(tiny_overrides(store_cache, "trainer.precision=bf16-mixed", "+trainer.fast_dev_run=true",
                                        "logger=none", "test=false"), tmp_path)
    result = train(cfg)
    assert result.trainer.precision == "bf16-mixed"
    assert torch.isfinite(torch.tensor(result.metrics["train/loss"]))
    assert result.module.model.token_embedding.weight.dtype == torch.float32  # fp32 master weights
