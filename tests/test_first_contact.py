"""What a new user meets first: help that lists real choices, clear refusals before any work, quiet runs."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from protein_performer.embed import EmbedError, embed_fasta
from protein_performer.resources import conf_dir, config_choices
from protein_performer.training.loggers import WandbLogger
from protein_performer.training.quiet import silence_unhelpful_messages

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "uniprot_sample.fasta"
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
TINY = ["model=tiny", "trainer=cpu", "data.max_length=64", "data.tokens_per_batch=512",
        "callbacks.progress_bar.refresh_rate=0", "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=2",
        "test=false"]


def run(command: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"protein_performer.{command}", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_config_choices_list_every_option_but_no_bases():
    lines = dict(line.split(": ", 1) for line in config_choices().splitlines())
    for group in ("data", "experiment", "model", "attention", "trainer", "logger"):
        on_disk = {p.stem for p in (conf_dir() / group).glob("*.yaml")}
        assert set(lines[group].split(", ")) == {name for name in on_disk if not name.startswith("_")}
    assert any(name.startswith("_") for name in (p.stem for p in (conf_dir() / "data").glob("*.yaml")))


@pytest.mark.slow
def test_help_lists_choices_not_bases_and_only_train_lists_groups(tmp_path):
    commands = ("train", "preprocess", "embed", "export")
    processes = {command: run(command, "--help", cwd=tmp_path) for command in commands}
    texts = {}
    for command, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        texts[command] = out
    assert "data: sample, swissprot, swissprot_homologs" in texts["train"] and "experiment: bid, concat, demo, homologs, uni" in texts["train"]
    assert "_base" not in texts["train"] and "_paper" not in texts["train"]
    for command in ("preprocess", "embed", "export"):
        assert f"{command} is powered by Hydra" in texts[command] and "output: ???" in texts[command]
        assert "Configuration groups" not in texts[command] and "attention:" not in texts[command]


@pytest.mark.slow
def test_an_empty_training_split_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    process = run("train", *TINY, f"data.fasta={SAMPLE}", "data.ood_regex=.", f"data.cache_dir={tmp_path / 'cache'}",
                  "logger=many", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _, err = process.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("train: error: ")]
    assert process.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert ".h5: the training split is empty (train 0, valid 0, test 0, ood 500 records)" in errors[0]
    # Hydra's own record of the command (.hydra/, train.log) is all the run directory holds.
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]


@pytest.mark.slow
def test_an_ordinary_run_and_its_resume_print_no_unhelpful_warnings(tmp_path):
    run_dir = tmp_path / "run"
    common = [*TINY, f"data.fasta={SAMPLE}", f"data.cache_dir={tmp_path / 'cache'}", "logger=many",
              "trainer.val_check_interval=2", f"hydra.run.dir={run_dir}"]
    outputs = []
    for extra in (["trainer.max_steps=2"], ["trainer.max_steps=4", f"ckpt_path={run_dir}/checkpoints/last.ckpt"]):
        process = run("train", *common, *extra, cwd=tmp_path)
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        outputs.append(out + err)
    for text in outputs:
        for noise in ("LeafSpec", "litlogger", "anonymous setting", "exists and is not empty"):
            assert noise not in text, f"{noise!r} printed:\n{text[-3000:]}"
    assert "Restoring states from the checkpoint" in outputs[1]  # Lightning's other messages still print


def test_lightning_and_torch_noise_is_filtered_and_nothing_else():
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    silence_unhelpful_messages()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_unhelpful_messages()  # installs its filters again inside this context
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        rank_zero_info("💡 Tip: For cloud logging, try installing [litlogger](https://pypi.org/p/litlogger/)")
        rank_zero_info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [record.getMessage() for record in records] == ["GPU available: False, used: False"]


def test_wandb_logger_does_not_hand_wandb_an_anonymous_setting(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert "anonymous" not in logger._wandb_init
    assert "anonymous" in WandbLogger(save_dir=str(tmp_path), offline=True, anonymous=True)._wandb_init


def test_embed_into_an_unwritable_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    from protein_performer import errors
    from protein_performer.data import Alphabet
    from protein_performer.model import PerformerConfig, ProteinPerformer

    fasta = tmp_path / "p.fasta"
    fasta.write_text(">P1\nMKTAYIAKQR\n")
    model = ProteinPerformer(PerformerConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, nb_features=8))

    def refuse(**kwargs):  # the suite may run as root, for whom permission bits refuse nothing
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(errors.tempfile, "TemporaryFile", refuse)
    with pytest.raises(EmbedError, match=r"out: cannot write in this directory \(Permission denied\); choose") as error:
        embed_fasta(model, Alphabet(), fasta, tmp_path / "out" / "emb.h5")
    assert "kept" not in str(error.value)  # nothing was done, so nothing is said to be kept
    assert not list((tmp_path / "out").iterdir())
