"""DDP on the CPU (trainer=ddp_cpu: 2 processes over gloo), launched like a user would."""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys

import hydra
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from protein_performer.training import ProteinLM

from .runs import SAMPLE, run_cli, tiny_overrides


@pytest.mark.slow
def test_ddp_trains_on_different_batches_evaluates_uneven_splits_and_matches_one_process(tmp_path, store_cache):
    """One 2-rank run: training shards and replica agreement; then validation and test on splits that do
    not divide by the ranks (valid 25 batches, ood a single protein: fewer than the ranks). Every rank
    must run as many evaluation steps as the others (or the job hangs), and scoring-free fillers must
    not move the metrics: the 2-rank validation perplexity is the 1-process one of the same weights."""
    fingerprints = tmp_path / "fingerprints"
    ood = tmp_path / "ood.txt"
    ood.write_text(SAMPLE.read_text().split("|")[1] + "\n")  # the sample's first protein alone
    run_dir = tmp_path / "run"
    run_cli([*tiny_overrides(store_cache, trainer="ddp_cpu"), "objective=clm", "trainer.max_steps=3",
             "attention.feature_redraw_interval=2",  # a redraw at step 2, with buffers never broadcast
             "trainer.val_check_interval=3", "trainer.limit_val_batches=1.0", "trainer.limit_test_batches=1.0",
             f"data.ood_accessions={ood}", "data.ood_regex=null", "logger=csv", "test=true",
             f"hydra.run.dir={run_dir}",
             "+callbacks.fingerprints._target_=protein_performer.training.BatchFingerprints",
             f"+callbacks.fingerprints.directory={fingerprints}"], cwd=tmp_path, timeout=240)

    ranks = [json.loads((fingerprints / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [3, 3]
    assert [len(r["batches"]) for r in ranks] == [3, 3]
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"]), "both ranks trained on the same batch"
    # Gradients are all-reduced and the FAVOR+ projections redrawn from (seed, step): every parameter
    # and buffer agrees across replicas after training, although DDP does not broadcast buffers.
    assert ranks[0]["parameters"] == ranks[1]["parameters"]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    trained = ProteinLM.load_from_checkpoint(last).model
    redrawn = {name: buffer.clone() for name, buffer in trained.named_buffers() if name.endswith("projection")}
    trained.redraw_projections(2)
    assert redrawn and all(torch.equal(buffer, dict(trained.named_buffers())[name]) for name, buffer in redrawn.items())

    logged: dict[str, float] = {}
    for row in csv.DictReader((run_dir / "metrics.csv").open()):
        logged.update({key: float(value) for key, value in row.items() if value})
    assert all(math.isfinite(logged[f"{split}/perplexity"]) for split in ("val", "test", "ood"))

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    datamodule = hydra.utils.instantiate(cfg.data)
    alone = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False)
    metrics = alone.validate(ProteinLM.load_from_checkpoint(last), datamodule=datamodule, verbose=False)[0]
    assert logged["val/perplexity"] == pytest.approx(metrics["val/perplexity"], rel=1e-5)
    assert logged["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)


@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu"])
def test_ddp_neither_broadcasts_buffers_nor_copies_gradients_out_of_buckets(trainer, tmp_path):
    from pytorch_lightning.strategies import DDPStrategy

    from protein_performer.train import compose_config

    strategy = hydra.utils.instantiate(compose_config([f"trainer={trainer}"], tmp_path).trainer.strategy)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs == {"broadcast_buffers": False, "gradient_as_bucket_view": True}


_SLOW_BUILD = '''\
"""Test-only: makes every token-store build sleep PP_TEST_BUILD_SLEEP seconds (a TrEMBL-sized build, in small)."""
import os
import time

import protein_performer.data.datamodule as datamodule

_build = datamodule.build_token_store


def _slow_build(*args, **kwargs):
    time.sleep(float(os.environ["PP_TEST_BUILD_SLEEP"]))
    return _build(*args, **kwargs)


datamodule.build_token_store = _slow_build
'''


@pytest.mark.slow
def test_a_node_local_store_build_longer_than_the_collective_timeout_does_not_kill_the_ranks(tmp_path):
    """Two nodes of one process each (gloo), each with a node-local cache, so each builds its own store, and
    every build outlasts the collective timeout (20 s against 15 s). train.py builds before the process
    group exists, so no rank dies. Built inside fit (node 1's local rank 0 in Lightning's setup hook),
    rank 0 would wait for it at the post-setup barrier and time out. (The timeout also bounds the
    rendezvous, so it cannot be a few seconds on a loaded machine.)"""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_BUILD)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fingerprints = tmp_path / "fingerprints"
    nodes = []
    for node in (0, 1):
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
               "PP_TEST_BUILD_SLEEP": "20", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "NODE_RANK": str(node), "LOCAL_RANK": "0", "RANK": str(node)}
        args = [*tiny_overrides(tmp_path / f"cache{node}", trainer="ddp_cpu"), "trainer.devices=1",
                "trainer.num_nodes=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
                "trainer.limit_val_batches=1",
                "+trainer.strategy.timeout._target_=datetime.timedelta", "+trainer.strategy.timeout.seconds=15",
                f"hydra.run.dir={tmp_path / f'run{node}'}",
                "+callbacks.fingerprints._target_=protein_performer.training.BatchFingerprints",
                f"+callbacks.fingerprints.directory={fingerprints}"]
        nodes.append(subprocess.Popen([sys.executable, "-m", "protein_performer.train", *args], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=240)[0] for process in nodes]
    for process, output in zip(nodes, outputs):
        assert process.returncode == 0, f"a node exited with {process.returncode}:\n{output[-6000:]}"
        assert "tokenising" in output, "this node did not build its store"

    ranks = [json.loads((fingerprints / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["parameters"] == ranks[1]["parameters"]
    assert (tmp_path / "run0" / "checkpoints" / "last.ckpt").is_file()
