"""Every config under conf/ composes, resolves and instantiates (nothing is trained here)."""
from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf

from protein_performer.data import Alphabet, ProteinDataModule
from protein_performer.model import PerformerConfig, config_from_hydra
from protein_performer.nn import Block
from protein_performer.resources import conf_dir
from protein_performer.train import compose_config

GROUPS = ("data", "model", "attention", "trainer", "logger", "callbacks", "experiment")
# Trainer presets that need GPUs: checked by composition and by building their strategy only.
GPU_TRAINERS = ("gpu", "ddp", "fsdp")
# Trainer presets whose strategy is an object built from the config, and the class it must be.
GPU_STRATEGIES = {"ddp": pl.strategies.DDPStrategy, "fsdp": pl.strategies.FSDPStrategy}


def _options(group: str) -> list[str]:
    """The choices of a group; files starting with '_' are bases the choices share, not choices."""
    return sorted(path.stem for path in (conf_dir() / group).glob("*.yaml") if not path.stem.startswith("_"))


def _model_config(cfg) -> PerformerConfig:
    alphabet = Alphabet()
    return config_from_hydra(cfg.model, cfg.attention, vocab_size=len(alphabet), pad_idx=alphabet.pad_idx,
                             causal=cfg.objective == "clm")


def _compose(tmp_path: Path, *overrides: str):
    return compose_config([f"data.cache_dir={tmp_path / 'cache'}", *overrides], tmp_path / "run")


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)],
                         ids=[f"{g}={o}" for g in GROUPS for o in _options(g)])
def test_config_option_composes_and_instantiates(group, option, tmp_path):
    extra = ["trainer=cpu"] if group == "experiment" else []  # experiments pick a GPU trainer
    if (group, option) == ("attention", "favor_member64"):  # its band follows positions within members
        extra = ["model.position_scope=member"]
    cfg = _compose(tmp_path, f"{group}={option}", *extra)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["output_dir"] == str(tmp_path / "run")

    datamodule = hydra.utils.instantiate(cfg.data)
    assert isinstance(datamodule, ProteinDataModule)
    # The flat YAML keys reach the module's typed groups unchanged.
    assert datamodule.spec.max_length == cfg.data.max_length and datamodule.spec.sampling == cfg.data.sampling
    assert datamodule.spec.objective == cfg.objective and datamodule.seed == cfg.seed
    assert datamodule.split_spec.valid_fraction == cfg.data.valid_fraction
    assert datamodule.num_workers == cfg.data.num_workers
    config = _model_config(cfg)
    assert config.causal == (cfg.objective == "clm")
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    assert all(isinstance(c, pl.Callback) for c in callbacks)
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values()]  # no wandb run starts until used
    assert all(isinstance(lg, pl.loggers.Logger) for lg in loggers)
    if group == "trainer" and option in GPU_TRAINERS:
        strategy = cfg.trainer.get("strategy")
        if OmegaConf.is_dict(strategy):  # a strategy object built from the config: the kind its option names
            assert isinstance(hydra.utils.instantiate(strategy), GPU_STRATEGIES[option])
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    else:
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        assert trainer.max_steps == cfg.trainer.max_steps


def test_default_run_needs_no_overrides(tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.objective == "mlm" and cfg.seed == 0 and cfg.ckpt_path is None
    assert "wandb" in cfg.logger and cfg.logger.wandb.mode in ("offline", "disabled", "online", "dryrun")
    assert cfg.trainer.gradient_clip_val == 0.5
    assert cfg.optim.lr == 1e-3 and list(cfg.optim.betas) == [0.9, 0.98] and cfg.optim.eps == 1e-9
    assert cfg.optim.weight_decay == 0.1 and _model_config(cfg).dropout == 0.1


def test_wandb_stays_offline_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert _compose(tmp_path, "logger=wandb").logger.wandb.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _compose(tmp_path, "logger=wandb").logger.wandb.mode == "disabled"


@pytest.mark.parametrize("experiment, objective, causal, n_layers, d_ff, length, sampling", [
    ("bid", "mlm", False, 36, 1024, 1024, "single"),
    ("uni", "clm", True, 36, 1024, 1024, "single"),
    ("concat", "mlm", False, 6, 2048, 8192, "concat"),
])
def test_experiments_reproduce_the_paper_protein_settings(experiment, objective, causal, n_layers, d_ff, length,
                                                          sampling, tmp_path):
    cfg = _compose(tmp_path, f"experiment={experiment}")
    config = _model_config(cfg)
    assert cfg.objective == objective and config.causal == causal
    assert (config.n_layers, config.d_model, config.n_heads, config.d_ff) == (n_layers, 512, 8, d_ff)
    assert cfg.data.max_length == length and config.max_length >= length
    assert cfg.data.sampling == sampling
    assert config.attention == "favor" and cfg.trainer.precision == "bf16-mixed"


def test_the_member_band_preset_reads_homolog_windows_and_says_what_it_needs_elsewhere(tmp_path):
    config = _model_config(_compose(tmp_path, "experiment=homologs", "attention=favor_member64"))
    assert (config.attention, config.exact_window, config.band_order, config.position_scope) == (
        "favor", 64, "member", "member")
    with pytest.raises(ValueError, match=r"band_order='member'.*position_scope='member' \(got 'window'\)"):
        _model_config(_compose(tmp_path, "attention=favor_member64"))


def test_command_line_choices_override_an_experiment(tmp_path):
    cfg = _compose(tmp_path, "experiment=uni", "attention=softmax", "trainer=cpu", "model=tiny")
    assert cfg.attention.kind == "softmax" and cfg.trainer.accelerator == "cpu" and cfg.model.n_layers == 2
    assert cfg.objective == "clm"  # what the experiment set and the command line did not touch


def test_comparison_runs_differ_in_attention_only_and_share_a_wandb_group(tmp_path):
    configs = {kind: _compose(tmp_path, f"attention={kind}") for kind in ("softmax", "favor", "favor_relu")}
    plain = {}
    for kind, cfg in configs.items():
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["logger"]["wandb"]["name"].startswith(kind)
        del resolved["attention"], resolved["logger"]["wandb"]["name"]
        plain[kind] = resolved
    assert plain["softmax"] == plain["favor"] == plain["favor_relu"]  # seed, data, model, optimiser, group


def test_distributed_presets(tmp_path):
    ddp = _compose(tmp_path, "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4").trainer
    assert (ddp.strategy._target_, ddp.devices, ddp.num_nodes) == ("pytorch_lightning.strategies.DDPStrategy", 8, 4)

    trainer = hydra.utils.instantiate(_compose(tmp_path, "trainer=ddp_cpu").trainer, logger=False)
    assert isinstance(trainer.strategy, pl.strategies.DDPStrategy)
    assert trainer.strategy._process_group_backend == "gloo" and trainer.num_devices == 2

    strategy = hydra.utils.instantiate(_compose(tmp_path, "trainer=fsdp").trainer.strategy)
    assert isinstance(strategy, pl.strategies.FSDPStrategy)
    assert strategy._state_dict_type == "full"  # load_model reads FSDP checkpoints like any other
    assert Block in strategy.kwargs["auto_wrap_policy"]._module_classes


def test_data_and_experiment_choices_share_their_base(tmp_path):
    """Every data config starts from data/_base.yaml and the paper experiments from experiment/_paper.yaml,
    so a key changed in a base reaches all of them (and nothing repeats it by hand)."""
    for option in _options("data"):
        text = (conf_dir() / "data" / f"{option}.yaml").read_text()
        assert "_target_" not in text, option  # the base names the target
        assert any(f"- {base}\n" in text for base in ("_base", "trembl", "swissprot")), option  # all lead to _base
    paper = {option: _compose(tmp_path, f"experiment={option}", "trainer=cpu") for option in ("bid", "uni", "concat")}
    for option, cfg in paper.items():
        assert cfg.trainer.max_steps == 500000 and cfg.trainer.val_check_interval == 2000, option
        assert cfg.optim.warmup_steps == 10000 and cfg.attention.kind == "favor", option
    assert _compose(tmp_path, "experiment=bid").trainer.accelerator == "gpu"
    concat = _compose(tmp_path, "data=trembl_concat").data
    trembl = _compose(tmp_path, "data=trembl").data
    assert (concat.sampling, concat.max_length, concat.batch_size) == ("concat", 8192, 4)
    assert concat.valid_fraction == trembl.valid_fraction and concat.num_workers == trembl.num_workers

