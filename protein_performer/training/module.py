"""ProteinLM: the LightningModule that trains a ProteinPerformer as a masked or causal language model.

The network is a plain nn.Module (`protein_performer.model`); this module owns what only training needs:
the loss, token-level metrics per split, the optimiser and its schedule, and the per-step seeding
that makes dropout resumable. Everything needed to rebuild the network is in `hparams`, so
`protein_performer.load_model` reads a checkpoint without Hydra.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel

from protein_performer.config import ATTENTION
from protein_performer.data import IGNORE_INDEX, OBJECTIVES, Alphabet
from protein_performer.fidelity import attention_fidelity, captured_attention_inputs, fidelity_of_records
from protein_performer.model import PerformerConfig, ProteinPerformer
from protein_performer.training.loggers import CHECKPOINT_KEY as CSV_ROWS_KEY
from protein_performer.training.loggers import ResumableCSVLogger
from protein_performer.training.targets import target_masks, target_set_names

DECAY_KINDS = ("linear", "cosine", "constant")


class TokenMetrics(torchmetrics.Metric):
    """Loss, accuracy and perplexity over the scored tokens of an epoch, per target set (summed across DDP ranks).

    Perplexity is exp of the token-weighted mean loss over the whole split, not a mean of per-batch
    perplexities, so it does not depend on how the split was cut into batches.
    target_sets: names of the target sets (protein_performer.training.targets), the first being `all`;
        updates carry one sum per set. Keys: loss, accuracy, perplexity for the first set;
        perplexity_<set>, accuracy_<set> for the others.
    """

    full_state_update = False

    def __init__(self, target_sets: Sequence[str] = ("all",)) -> None:
        super().__init__()
        self.target_sets = tuple(target_sets)
        size = len(self.target_sets)
        self.add_state("loss_sum", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss_sum: Tensor, correct: Tensor, count: Tensor) -> None:  # type: ignore[override]
        """Sums of one batch: scalars (one target set) or [len(target_sets)]."""
        self.loss_sum += loss_sum.detach().double()
        self.correct += correct.detach()
        self.count += count.detach()

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        count = self.count.clamp(min=1).double()
        loss = self.loss_sum / count
        accuracy = self.correct / count
        values = {"loss": loss[0].float(), "accuracy": accuracy[0].float(), "perplexity": loss[0].exp().float()}
        for i, name in enumerate(self.target_sets[1:], start=1):
            # A set with no target in the split (no later member in a window, say) has no value.
            empty = self.count[i] == 0
            values[f"perplexity_{name}"] = torch.where(empty, math.nan, loss[i].exp()).float()
            values[f"accuracy_{name}"] = torch.where(empty, math.nan, accuracy[i]).float()
        return values


class ProteinLM(pl.LightningModule):
    """Masked (objective="mlm") or causal (objective="clm") LM training of a ProteinPerformer.

    Batches are dicts from `protein_performer.data.ProteinDataModule`:
        input_ids [batch, length] long, labels [batch, length] long (-100 = no target),
        padding_mask [batch, length] bool (True at padding), or None when nothing is padded (the data
        module decides on the CPU; attention then takes its unmasked fast path).
    For MLM the labels are set at masked positions only; for CLM the data module has already shifted
    them (labels[:, i] is the target of logits[:, i]) and set them at every non-padding position. The
    loss is the mean cross-entropy over scored tokens, so metrics mean "masked tokens" for MLM and
    "all tokens" for CLM without any objective-specific code here.

    Logged: train/{loss,accuracy,perplexity} every step; {val,test,ood}/{loss,accuracy,perplexity}
    per evaluation over all scored targets, beside the same split's metrics on other target sets
    (training/targets.py): for MLM {split}/{perplexity,accuracy}_masked (only the positions shown as
    <mask>), and with member_metrics {split}/perplexity_masked_first, _masked_later (CLM: _first,
    _later over all targets); and val/elapsed_seconds (wall-clock since training began, carried across resumes)
    so runs can be compared against time.
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        objective: str = "mlm",
        *,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.98),
        eps: float = 1e-9,
        weight_decay: float = 0.1,
        warmup_steps: int = 1000,
        decay: str = "linear",
        min_lr_ratio: float = 0.0,
        seed: int = 0,
        alphabet_tokens: Sequence[str] | None = None,
        eval_split_names: Sequence[str] = ("test", "ood"),
        length_multiple: int = 1,
        member_metrics: bool = False,
        log_attention_fidelity: bool | None = None,
    ) -> None:
        """model_config: PerformerConfig as a plain dict (PerformerConfig.to_dict()); stored in hparams.

        Optimiser: AdamW (weight decay decoupled from the adaptive update, Loshchilov & Hutter) with
        lr, betas, eps, weight_decay; the LR rises linearly from 0 over warmup_steps, then follows
        `decay` down to min_lr_ratio * lr at the trainer's last step.
        seed: dropout is re-seeded at every training batch from (seed, step, rank, micro-batch), which
            makes a resumed run continue the exact trajectory of an uninterrupted one (`dropout_seed`).
        alphabet_tokens: the Alphabet's token list, saved so load_model can check that it still matches.
        eval_split_names: the metric prefix of each test dataloader, in the order the data module
            returns them.
        length_multiple: pad every batch's length up to a multiple of this (padding the model never
            sees and no label scores), so that a torch.compile'd model meets few distinct lengths and
            no partial FAVOR+ chunk; 1 = as the data comes. A run setting, not saved in hparams.
        member_metrics: also evaluate targets in the first member of their cluster apart from those in
            later members (homolog windows; protein_performer.training.targets). A run setting, not
            saved in hparams.
        log_attention_fidelity: at each validation, measure the attention against exact softmax on the
            first validation batch (`protein_performer.fidelity`) and log, per layer, the median over
            heads of the relative output error (val/attn_error/layer_i) and of u_bar (val/u_bar/layer_i).
            None: on for kinds with random features. A run setting, not saved in hparams.
        """
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if decay not in DECAY_KINDS:
            raise ValueError(f"optim.decay must be one of {DECAY_KINDS}, got {decay!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup_steps}")
        config = PerformerConfig.from_dict(dict(model_config))
        if config.causal != (objective == "clm"):
            raise ValueError(f"objective={objective!r} needs a {'causal' if objective == 'clm' else 'bidirectional'} "
                             f"model, but model_config has causal={config.causal}")
        self.save_hyperparameters({
            "model_config": config.to_dict(), "objective": objective, "lr": lr, "betas": list(betas), "eps": eps,
            "weight_decay": weight_decay, "warmup_steps": warmup_steps, "decay": decay,
            "min_lr_ratio": min_lr_ratio, "seed": seed,
            "alphabet_tokens": list(alphabet_tokens) if alphabet_tokens is not None else None,
            "eval_split_names": list(eval_split_names),
        })
        if length_multiple < 1:
            raise ValueError(f"length_multiple must be >= 1, got {length_multiple}")
        self.length_multiple = length_multiple
        self.model = ProteinPerformer(config)
        self.log_attention_fidelity = (config.attention_kind.random_features if log_attention_fidelity is None
                                       else bool(log_attention_fidelity))
        # Decided here, on the unwrapped model: FSDP (use_orig_params) hands configure_optimizers every
        # parameter as a flat 1-D shard, whose shape no longer says whether it was a matrix.
        self.decayed_parameter_names = matrix_parameter_names(self)
        self._alphabet = Alphabet()
        self.target_sets = target_set_names(objective, member_metrics)
        self.eval_metrics = nn.ModuleDict({name: TokenMetrics(self.target_sets) for name in ("val", *eval_split_names)})
        self.last_validated_step = -1  # global_step of the latest real (non-sanity) validation
        self._elapsed_before = 0.0  # wall-clock seconds of training before this process (from a checkpoint)
        self._fit_started: float | None = None
        # From a checkpoint being resumed: None = not resumed; else the metrics.csv rows it had seen
        # (-1: a checkpoint that did not record them, so the CSV logger cuts its file by step instead).
        self._resumed_log_rows: int | None = None

    @property
    def config(self) -> PerformerConfig:
        return self.model.config

    def forward(self, input_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """input_ids [batch, length] -> logits [batch, length, vocab_size]."""
        return self.model(input_ids, padding_mask).logits

    def token_losses(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(cross-entropy in nats [batch, length], 0 where unscored; argmax == label [batch, length]).

        Over the batch as given (the length padding for torch.compile is cut off again)."""
        length = batch["input_ids"].shape[1]
        padded = pad_length_to_multiple(batch, self.length_multiple, self.config.pad_idx)
        padding_mask = padded["padding_mask"]
        if self.config.causal and ATTENTION[self.config.attention].unmasked_right_padding:
            # The data module and pad_length_to_multiple pad on the right: a causal model's scored
            # positions never see the padding, and the padded positions' logits are never scored.
            padding_mask = None
        logits = self(padded["input_ids"], padding_mask)[:, :length]
        labels = batch["labels"]
        # bf16 autocast leaves logits in bf16; the log-softmax over the vocabulary wants fp32.
        losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none").view_as(labels)
        return losses, logits.argmax(dim=-1) == labels

    def token_statistics(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(summed cross-entropy in nats, number of correct argmax predictions, number of scored tokens)."""
        losses, hits = self.token_losses(batch)
        scored = batch["labels"] != IGNORE_INDEX
        return losses.sum(), (hits & scored).sum(), scored.sum()

    def target_set_statistics(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """token_statistics per evaluation target set (self.target_sets): three tensors [len(target_sets)]."""
        losses, hits = self.token_losses(batch)
        sets = target_masks(batch["input_ids"], batch["labels"], self.target_sets, causal=self.config.causal,
                            alphabet=self._alphabet)  # [sets, batch, length]
        return (losses.unsqueeze(0) * sets).sum((1, 2)), (hits.unsqueeze(0) & sets).sum((1, 2)), sets.sum((1, 2))

    # ---- training -------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self._fit_started = time.monotonic()

    def on_train_start(self) -> None:
        # The global step is restored by now: bring resumable loggers back to the checkpoint.
        rows = self._resumed_log_rows
        for logger in self.trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.resume(0 if rows is None else (None if rows < 0 else rows), self.global_step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(dropout_seed(self.hparams.seed, self.global_step, self.global_rank,
                                       batch_idx % self.trainer.accumulate_grad_batches))

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss_sum, correct, count = self.token_statistics(batch)
        count = count.clamp(min=1)  # a batch without a masked token contributes zero loss, not NaN
        loss = loss_sum / count
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/accuracy", correct / count, batch_size=batch_size)
        self.log("train/perplexity", loss.detach().exp(), batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = parameter_groups(self, hp.weight_decay, decayed=self.decayed_parameter_names)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                      fused=use_fused_adamw([p for group in groups for p in group["params"]]))
        total = self.trainer.estimated_stepping_batches  # inf when neither max_steps nor max_epochs is set
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, total, hp.decay, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by global norm under FSDP too, through the sharded root's own clip_grad_norm_.

        Lightning's FSDP precision plugin refuses norm clipping (torch.nn.utils.clip_grad_norm_ over
        local shards would bound each rank's piece, not the global norm); FSDP's method all-reduces the
        shards' squared norms first. Every other strategy clips as Lightning does.
        """
        if gradient_clip_val and gradient_clip_algorithm == "norm" and isinstance(
                self.trainer.strategy.model, FullyShardedDataParallel):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- evaluation -----------------------------------------------------------------------------------

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        if batch_idx == 0 and self.log_attention_fidelity and not self.trainer.sanity_checking:
            self._validate_with_attention_fidelity(batch)
            return
        self.eval_metrics["val"].update(*self.target_set_statistics(batch))

    def _validate_with_attention_fidelity(self, batch: Mapping[str, Tensor]) -> None:
        """The batch's metrics, and per layer the attention's error against exact softmax and u_bar on it
        (MLM-masked inputs, as validated), from the q, k, v of the validation forward itself."""
        compiled = getattr(self.model, "_compiled_call_impl", None) is not None
        if compiled:  # a compiled forward is not traced with recorders inside: one eager forward of its own
            self.eval_metrics["val"].update(*self.target_set_statistics(batch))
            report = attention_fidelity(self.model, batch["input_ids"], batch["padding_mask"], entropy=False,
                                        dtype=torch.float32)
        else:
            with captured_attention_inputs(self.model) as records:
                self.eval_metrics["val"].update(*self.target_set_statistics(batch))
            with torch.no_grad():
                report = fidelity_of_records(records, entropy=False, dtype=torch.float32)
        per_layer = report.per_layer()
        for metric, values in (("attn_error", per_layer["error"]), ("u_bar", per_layer["u_bar"])):
            for layer, value in enumerate(values.float()):
                self.log(f"val/{metric}/layer_{layer}", value, batch_size=1, sync_dist=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.global_step
            self.log("val/elapsed_seconds", self.elapsed_seconds())
            # Lightning uses a metric named "step" as the loggers' x value: validation curves then sit at
            # the optimizer step they measured (by default they land one step early).
            self.log("step", float(self.global_step))

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        names = self.hparams.eval_split_names
        if dataloader_idx >= len(names):
            raise ValueError(f"test dataloader {dataloader_idx} has no name: the data module returned more test "
                             f"loaders than eval_split_names={list(names)}")
        self.eval_metrics[names[dataloader_idx]].update(*self.target_set_statistics(batch))

    def on_test_epoch_end(self) -> None:
        for name in self.hparams.eval_split_names:
            if self.eval_metrics[name].update_called:
                self._log_split(name)

    def _log_split(self, name: str) -> None:
        metric = self.eval_metrics[name]
        values = metric.compute()  # already reduced across ranks
        metric.reset()
        for key, value in values.items():
            if torch.isnan(value):  # a target set with no target in this split: nothing to log
                continue
            self.log(f"{name}/{key}", value, prog_bar=name == "val" and key == "perplexity",
                     add_dataloader_idx=False)

    # ---- wall-clock across resumes ------------------------------------------------------------------------

    def elapsed_seconds(self) -> float:
        """Wall-clock seconds spent in fit so far, including the processes before a resume."""
        running = time.monotonic() - self._fit_started if self._fit_started is not None else 0.0
        return self._elapsed_before + running

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["elapsed_seconds"] = self.elapsed_seconds()
        checkpoint["last_validated_step"] = self.last_validated_step
        for logger in self.trainer.loggers if self._trainer is not None else ():
            if isinstance(logger, ResumableCSVLogger):
                logger.save()  # the rows counted are on disk with the checkpoint
                checkpoint[CSV_ROWS_KEY] = logger.rows_logged

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._elapsed_before = float(checkpoint.get("elapsed_seconds", 0.0))
        self.last_validated_step = int(checkpoint.get("last_validated_step", -1))
        self._resumed_log_rows = int(checkpoint.get(CSV_ROWS_KEY, -1))


def dropout_seed(seed: int, step: int, rank: int, micro_batch: int = 0) -> int:
    """The torch seed of a training batch: a function of (seed, optimizer step, rank, micro-batch) alone.

    Dropout draws from the global torch RNG. Seeding it per batch makes the masks independent of how many
    random numbers were drawn before, so a run resumed from a checkpoint sees the masks an uninterrupted
    run saw; the rank makes ranks drop different units, and the micro-batch index (its place in a gradient
    accumulation window) makes the micro-batches of one optimizer step drop different units too. Micro-batch
    0 keeps the seeds of runs without accumulation as they always were.
    """
    entropy = [seed, step, rank] + ([micro_batch] if micro_batch else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def pad_length_to_multiple(batch: Mapping[str, Tensor | None], multiple: int, pad_idx: int) -> Mapping[str, Any]:
    """The batch with its length padded up to a multiple of `multiple` (pad tokens, masked, unscored).

    Appended positions are masked keys (bidirectional) and in every real position's future (causal),
    so real positions' logits do not change. On the batch's device; no host sync.
    """
    ids = batch["input_ids"]
    assert ids is not None
    extra = -ids.shape[1] % multiple
    if extra == 0:
        return batch
    mask = batch["padding_mask"]
    mask = torch.zeros_like(ids, dtype=torch.bool) if mask is None else mask
    return {**batch, "input_ids": F.pad(ids, (0, extra), value=pad_idx),
            "labels": F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX),
            "padding_mask": F.pad(mask, (0, extra), value=True)}


# Module names that FSDP, activation checkpointing and torch.compile insert into parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def original_parameter_name(name: str) -> str:
    """A parameter's name as in the unwrapped module: `blocks.0._fsdp_wrapped_module.attention.qkv.weight`
    -> `blocks.0.attention.qkv.weight`."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def matrix_parameter_names(module: nn.Module) -> frozenset[str]:
    """Names of `module`'s parameters with two or more dimensions (call before any FSDP wrapping)."""
    return frozenset(original_parameter_name(name) for name, parameter in module.named_parameters()
                     if parameter.dim() >= 2)


def parameter_groups(module: nn.Module, weight_decay: float,
                     decayed: frozenset[str] | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups: matrices (linear and embedding weights, the RPE bias table) decay, vectors do not.

    Biases and LayerNorm gains are left undecayed: pulling them toward zero only fights the
    normalisation. Tied parameters (the LM head shares the embedding) appear once.
    decayed: the names that decay (`matrix_parameter_names` of the unwrapped module); needed once
        FSDP has flattened the parameters, whose names survive wrapping but whose shapes do not.
        None: decided from `module`'s own shapes.
    """
    decayed = matrix_parameter_names(module) if decayed is None else decayed
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():  # yields each shared tensor once
        if parameter.requires_grad:
            (decay if original_parameter_name(name) in decayed else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_fused_adamw(parameters: Sequence[Tensor]) -> bool:
    """Whether AdamW should run fused: one kernel per step on CUDA instead of a foreach loop of them. Only
    when every parameter is on a CUDA device; on the CPU the default implementation stays (its results,
    and so the CPU runs' reproducibility, unchanged)."""
    return bool(parameters) and all(parameter.device.type == "cuda" for parameter in parameters)


def lr_factor(step: int, warmup_steps: int, total_steps: float, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then `decay`.

    Warmup reaches 1.0 at step warmup_steps; linear and cosine decay reach min_ratio at total_steps
    (the trainer's last step). With no known end (total_steps infinite) the LR stays at its peak.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay == "constant" or not math.isfinite(total_steps) or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
