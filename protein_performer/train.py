"""Train a protein language model: `python -m protein_performer.train [group=option ...] [key=value ...]`,
or the same overrides after the installed command `protein-performer-train`.

Hydra composes the run from conf/train.yaml (groups data, model, attention, trainer, logger, callbacks,
experiment). This file wires one run together: it applies the process settings (protein_performer.runtime;
a warning when bf16 is asked of a CPU without bf16 arithmetic), instantiates the data, model and trainer,
refuses a resume that does not match its checkpoint (protein_performer.checkpoint), calls fit, validates
and saves the final weights when the last validation came before the last step, calls test, and prints
the validation perplexity beside context-free baselines scored on the same targets
(protein_performer.training.baselines; for MLM the headline scores only the positions shown as <mask>).
`compose_config` builds the same config without a command line. Examples:

    python -m protein_performer.train model=small data=sample trainer=cpu        # the CPU demo
    python -m protein_performer.train experiment=bid trainer=ddp trainer.devices=8
    python -m protein_performer.train -m attention=softmax,favor,favor_relu name=cmp1   # one wandb group
    python -m protein_performer.train ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt   # resume
"""
from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from protein_performer.checkpoint import (
    check_resume,
    check_weights_fit,
    data_sampling_settings,
    read_checkpoint,
    record_evaluation,
    run_layout,
)
from protein_performer.data import Alphabet, ProteinDataModule, TokenStore
from protein_performer.data.errors import DataError
from protein_performer.errors import UserError, records_signals, run_command
from protein_performer.export import export_checkpoint
from protein_performer.model import config_from_hydra
from protein_performer.resources import conf_dir
from protein_performer.runtime import configure_process, slow_bf16_warning
from protein_performer.training.baselines import Baselines, baselines_by_target_set, token_counts
from protein_performer.training.callbacks import RunSettings
from protein_performer.training.interrupts import (
    SafePoints,
    SlurmRequeue,
    disable_lightning_requeue,
    latest_preemption_checkpoint,
    requeue_signal,
    run_dir,
    slurm_job_id,
)
from protein_performer.training.module import ProteinLM
from protein_performer.training.quiet import silence_unhelpful_messages

log = logging.getLogger(__name__)
# hydra.run.dir: outputs/slurm-<job id> in a SLURM batch job (a requeued job resumes there), else the time.
OmegaConf.register_new_resolver("run_dir", run_dir, replace=True)
# compile=true pads batch lengths to multiples of FAVOR+'s causal chunk: no partial chunk, few shapes.
COMPILE_LENGTH_MULTIPLE = 64
# ckpt_path values Lightning resolves itself (in the new run's own checkpoint directory): not checked here.
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")


@dataclass
class TrainResult:
    """What a finished run reports (rank 0's view)."""

    val_perplexity: float  # on the final weights
    checkpoint: str | None  # last.ckpt: the final weights, resumable
    best_checkpoint: str | None  # lowest validation perplexity seen
    metrics: dict[str, float]  # every logged metric's final value (val/..., test/..., ood/...)
    trainer: pl.Trainer
    module: ProteinLM


def train(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> TrainResult:
    """Fit (and optionally test) the run `cfg` describes (see conf/train.yaml).

    callbacks: added to the configured ones (conf/callbacks), e.g. by a notebook or a test.
    """
    try:
        return _train(cfg, callbacks)
    finally:
        # Close this run's wandb run even on failure: the next job of a multirun (same process) would
        # otherwise log into it.
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()


def _train(cfg: DictConfig, callbacks: Sequence[pl.Callback]) -> TrainResult:
    slow_bf16 = slow_bf16_warning(cfg.trainer.get("precision"), cfg.trainer.get("accelerator", "auto"))
    if slow_bf16 is not None:
        rank_zero_only(log.warning)(slow_bf16)
    configure_process(cfg.trainer.get("accelerator", "auto"), keep_freed=cfg.get("keep_freed_memory", True),
                      float32_matmul_precision=cfg.get("float32_matmul_precision", "high"))
    silence_unhelpful_messages()
    pl.seed_everything(cfg.seed, workers=True)
    datamodule: pl.LightningDataModule = _instantiate(cfg.data)
    if isinstance(datamodule, ProteinDataModule):
        # Build (or wait for) the token-store cache now, before the Trainer creates its process group:
        # inside fit it would run between collectives whose timeout (30 min) a TrEMBL-sized build outlasts,
        # killing every rank. Each node's local rank 0 builds; the others wait up to data.build_timeout.
        datamodule.setup()
    check_training_split(datamodule)  # before loggers and checkpoints write anything
    alphabet = Alphabet()
    compile_model = bool(cfg.get("compile", False))
    member_metrics = cfg.get("member_metrics")
    if member_metrics is None:
        member_metrics = cfg.data.get("sampling") == "homologs"
    try:
        model_config = config_from_hydra(cfg.model, cfg.attention, vocab_size=len(alphabet),
                                         pad_idx=alphabet.pad_idx, causal=cfg.objective == "clm")
        module = ProteinLM(model_config.to_dict(), cfg.objective, seed=cfg.seed, alphabet_tokens=alphabet.tokens,
                           length_multiple=COMPILE_LENGTH_MULTIPLE if compile_model else 1,
                           member_metrics=bool(member_metrics),
                           log_attention_fidelity=cfg.get("log_attention_fidelity"),
                           **OmegaConf.to_container(cfg.optim, resolve=True))
    except (ValueError, TypeError) as error:  # a bad model, attention, objective or optim setting
        raise UserError(f"config: {error}") from None
    run_settings = {"model": model_config.to_dict(), "objective": cfg.objective, "seed": cfg.seed,
                    "data": data_sampling_settings(datamodule.hparams)}
    job_id = slurm_job_id()
    requeue = requeue_signal(cfg.get("slurm_requeue", "SIGUSR1")) if job_id is not None else None
    if compile_model:  # in place: parameter names (and so checkpoints) stay those of the plain model
        module.model.compile(backend=cfg.get("compile_backend", "inductor"))

    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values() if c is not None]
    configured = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c is not None]
    if not loggers:  # logger=none: nothing to record learning rates into (Lightning would refuse to run)
        configured = [c for c in configured if not isinstance(c, LearningRateMonitor)]
    interrupts: list[pl.Callback] = [SafePoints()]
    if requeue is not None:
        interrupts.append(SlurmRequeue(requeue, job_id))
    trainer: pl.Trainer = _instantiate(cfg.trainer, callbacks=[*configured, RunSettings(run_settings), *interrupts,
                                                               *callbacks], logger=loggers or False)
    disable_lightning_requeue(trainer)
    workers = datamodule.hparams.get("num_workers", 0) if isinstance(datamodule, ProteinDataModule) else 0
    run_settings["layout"] = run_layout(trainer.world_size, workers)  # RunSettings saves this same dict
    ckpt_path = cfg.ckpt_path
    if ckpt_path is None and job_id is not None:  # a requeued SLURM job: resume from its preemption checkpoint
        saved = latest_preemption_checkpoint(cfg.output_dir)
        ckpt_path = str(saved) if saved is not None else None
        if saved is not None:
            rank_zero_only(print)(f"SLURM job {job_id}: resuming from {saved}")
    if ckpt_path is not None and ckpt_path not in LIGHTNING_CKPT_NAMES:
        path, checkpoint = read_checkpoint(ckpt_path)
        differences = check_resume(path, checkpoint, run_settings, strict=cfg.get("resume_check", True))
        check_weights_fit(path, checkpoint, module.state_dict(), differences)
        del checkpoint
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": resolved, "parameters": module.model.num_parameters()})

    if trainer.is_global_zero:
        print(f"{model_config.attention} {cfg.objective.upper()} model: {module.model.num_parameters():,} "
              f"parameters, {model_config.n_layers} layers, d_model {model_config.d_model}; "
              f"outputs in {cfg.output_dir}")
    # weights_only: checked loadable that way above; a checkpoint never runs code.
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    checkpointer = trainer.checkpoint_callback
    if module.last_validated_step != trainer.global_step:
        # The last validation came before the last step (max_steps not a multiple of the validation
        # interval): measure the final weights and save them as last.ckpt so the two agree.
        trainer.validate(module, datamodule=datamodule, verbose=False)
        if isinstance(checkpointer, ModelCheckpoint) and checkpointer.dirpath is not None:
            last = checkpointer.format_checkpoint_name({}, checkpointer.CHECKPOINT_NAME_LAST)
            trainer.save_checkpoint(last, weights_only=False)  # a full, resumable checkpoint
            checkpointer.last_model_path = last
    val_perplexity = float(trainer.callback_metrics.get("val/perplexity", math.nan))
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    if cfg.test:
        for results in trainer.test(module, datamodule=datamodule, verbose=False):
            metrics.update({key: float(value) for key, value in results.items()})

    last_path = best_path = None
    if isinstance(checkpointer, ModelCheckpoint):
        last_path = checkpointer.last_model_path or None
        best_path = checkpointer.best_model_path or None
    if trainer.is_global_zero:
        baselines = validation_baselines(datamodule, alphabet, cfg.objective, module.target_sets)
        baseline_metrics = {key: value for target_set, scored in (baselines or {}).items()
                            for key, value in scored.as_metrics("val", target_set).items()}
        metrics.update(baseline_metrics)
        for logger in trainer.loggers if baseline_metrics else ():  # beside the run's metrics (compare.py reads them)
            logger.log_metrics(baseline_metrics, step=trainer.global_step)
            logger.save()
        print(final_report(metrics, baselines or {}, cfg.objective, _empty_validation_reason(datamodule)
                           if "val/perplexity" not in metrics else ""))
        if last_path is not None and Path(last_path).is_file():  # the final metrics go with the final weights: the model card reads them
            record_evaluation(last_path, evaluation_record(datamodule, metrics, baselines))
        print(f"checkpoint: {last_path}" + (f"  (best by validation perplexity: {best_path})" if best_path else ""))
        if cfg.get("export", False) and last_path is not None:
            exported = export_checkpoint(last_path, Path(cfg.output_dir) / "model", overwrite=True)
            print(f"exported model: {exported}  (ProteinPerformer.from_pretrained, or embed checkpoint=<it>)")
    return TrainResult(val_perplexity, last_path, best_path, metrics, trainer, module)


def check_training_split(datamodule: pl.LightningDataModule) -> None:
    """DataError naming the store and its split sizes when its training split is empty.

    Global rank 0 builds (or finds) the store now, as Lightning's prepare_data would a moment later;
    other ranks meet the same store in setup.
    """
    if not isinstance(datamodule, ProteinDataModule) or rank_zero_only.rank != 0:
        return
    datamodule.prepare_data()
    assert datamodule.store_path is not None
    with TokenStore(datamodule.store_path) as store:
        sizes = dict(store.split_sizes)
    if sizes.get("train", 0) == 0:
        counts = ", ".join(f"{split} {count:,}" for split, count in sizes.items())
        raise DataError(f"{datamodule.store_path}: the training split is empty ({counts} records); nothing to train "
                        "on. Give it more records, or lower data.valid_fraction / data.test_fraction, or match fewer "
                        "records with data.ood_regex")


def validation_baselines(datamodule: pl.LightningDataModule, alphabet: Alphabet, objective: str,
                         target_sets: Sequence[str] = ("all",)) -> dict[str, Baselines] | None:
    """Context-free baselines on the whole validation split, on each target set the model's validation
    metrics scored (protein_performer.training.targets), or None for a data module that is not a
    ProteinDataModule or a split with nothing to score."""
    if not isinstance(datamodule, ProteinDataModule) or datamodule.store_path is None:
        return None
    with TokenStore(datamodule.store_path) as store:
        counts = token_counts(store, "train", vocab_size=len(alphabet),
                              eos_idx=alphabet.eos_idx if objective == "clm" else None)
    try:
        return baselines_by_target_set(datamodule.dataloader("valid", rank=0, world_size=1), counts, alphabet,
                                       target_sets, causal=objective == "clm")
    except ValueError:
        return None


# How the final report names each target set (training/targets.py) and its members' sets.
_TARGET_SET_WORDS = {"masked": "residues shown as <mask> (masked-only)", "all": "scored targets",
                     "masked_first": "first members of their cluster", "masked_later": "later members",
                     "first": "first members of their cluster", "later": "later members"}


def final_report(metrics: Mapping[str, float], baselines: Mapping[str, Baselines], objective: str,
                 no_validation: str = "") -> str:
    """The end-of-run printout: the headline validation perplexity beside the frequency baseline on the
    same targets (MLM: the positions shown as <mask>), first vs later members of homolog windows, the
    all-target figure, then the test and ood evaluations.

    metrics: the run's final metrics (val/perplexity, val/perplexity_masked, ...); baselines: by
    target set; no_validation: why there is no validation perplexity (when there is none).
    """
    evaluations = "  ".join(f"{key} {value:.3f}" for key, value in sorted(metrics.items())
                            if key.split("/")[0] not in ("train", "val")
                            and key.split("/")[-1].startswith("perplexity"))
    if "val/perplexity" not in metrics:
        return f"no validation perplexity: {no_validation}" + (f"\n{evaluations}" if evaluations else "")

    def against(target_set: str) -> str:
        value = metrics["val/perplexity" + ("" if target_set == "all" else f"_{target_set}")]
        baseline = baselines.get(target_set)
        if baseline is None:
            return f"{value:.3f}"
        return (f"{value:.3f} on {baseline.targets:,} held-out targets; the training split's amino-acid frequencies "
                f"{baseline.frequency:.3f} on the same targets (model / frequencies {value / baseline.frequency:.3f})")

    headline = "masked" if "val/perplexity_masked" in metrics else "all"
    lines = [f"final validation perplexity, {_TARGET_SET_WORDS[headline]}: {against(headline)}"
             + (f"; uniform guessing among the 20 amino acids {baselines[headline].uniform:.0f}"
                if headline in baselines else "")]
    members = ("masked_first", "masked_later") if objective == "mlm" else ("first", "later")
    lines += [f"  {_TARGET_SET_WORDS[name]}: {against(name)}" for name in members
              if f"val/perplexity_{name}" in metrics]
    if headline != "all":
        lines.append(f"  all scored targets (80/10/10: a tenth show a random residue, a tenth their own): "
                     f"{against('all')}")
    return "\n".join(lines + ([evaluations] if evaluations else []))


def evaluation_record(datamodule: pl.LightningDataModule, metrics: dict[str, float],
                      baselines: Mapping[str, Baselines] | None) -> dict:
    """checkpoint["evaluation"]: the final metrics (baselines included), scored targets (all, and per
    target set) and split sizes."""
    baselines = baselines or {}
    record: dict = {"metrics": dict(metrics), "targets": baselines["all"].targets if "all" in baselines else None,
                    "targets_by_set": {name: scored.targets for name, scored in baselines.items()}}
    if isinstance(datamodule, ProteinDataModule) and datamodule.store_path is not None:
        with TokenStore(datamodule.store_path) as store:
            record["split_sizes"] = {split: int(count) for split, count in store.split_sizes.items()}
    return record


def _instantiate(config: DictConfig, **kwargs: object) -> object:
    """hydra.utils.instantiate, with an expected problem raised by the target (a UserError) raised as itself."""
    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, (UserError, MisconfigurationException)):
            raise error.__cause__ from None
        raise


def _empty_validation_reason(datamodule: pl.LightningDataModule) -> str:
    """Why no validation perplexity was measured, for the final printout."""
    path = getattr(datamodule, "store_path", None)
    if path is None:
        return "validation did not run (trainer.limit_val_batches=0?)"
    with TokenStore(path) as store:
        records, total = store.split_sizes["valid"], len(store)
    if records == 0:
        return (f"the validation split of {path} is empty ({total} records in all); give it records with a larger "
                "data.valid_fraction or more data")
    return "validation did not run (trainer.limit_val_batches=0?)"


def compose_config(overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """The config `python -m protein_performer.train <overrides>` would run, built without a command line.

    For tests and notebooks: `train(compose_config(["model=tiny", "trainer=cpu"], tmp_dir))`.
    output_dir: where the run writes; None = the run dir the command line would create under outputs/.
    """
    with hydra.initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
        cfg = hydra.compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve as under @hydra.main
    with open_dict(cfg):
        run_dir = cfg.hydra.run.dir
        del cfg["hydra"]  # @hydra.main hands the task a config without it, too
        cfg.output_dir = str(output_dir if output_dir is not None else run_dir)
    return cfg


@records_signals("train")
@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the final validation perplexity (for sweepers that minimise it).

    Expected problems (bad data, config or checkpoint; divergence; SIGTERM) end the command with one
    line on stderr (see protein_performer.errors).
    """
    def body() -> float:
        try:
            return train(cfg).val_perplexity
        except MisconfigurationException as error:  # a trainer or callback setting Lightning cannot honour
            raise UserError(f"trainer config: {error}") from None

    return run_command("train", body,
                       interrupted_note=f"resume with ckpt_path={cfg.output_dir}/checkpoints/last.ckpt "
                                        "(if a validation has saved it)")


if __name__ == "__main__":
    main()
