"""Lightning callbacks: checkpoints (last.ckpt after every validation), FAVOR+ feature redraws, throughput in
tokens/s, the divergence guard (with the gradient norm), the run settings saved for resume checks, and
per-rank batch fingerprints."""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import FSDPStrategy
from torch import Tensor

from protein_performer.errors import UserError


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that `save_last` rewrites last.ckpt after every validation.

    Lightning (2.5 and later) writes last.ckpt only when it also writes a top-k checkpoint, i.e. when the
    monitored metric improved. A validation that did not improve (for FAVOR+, the one just after a
    feature redraw, or any plateau) then leaves an older last.ckpt, and a run killed afterwards resumes
    from the last improvement and trains those steps again: the benchmark's 2,000-step favor_rpe run lost
    400 steps that way. Here a resumable last.ckpt always holds the latest validated step.

    Two more differences, both for a resumed run (ckpt_path=):
    - resumed into another run directory, the checkpoint's record of best and last checkpoints (files of
      that other run, scored on its validations) is dropped: this run's best checkpoint is its own;
    - resumed into its own directory, Lightning's "Checkpoint directory ... exists and is not empty"
      warning is not shown (that is the point of resuming there); a fresh run into a used directory
      still gets it.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Whether the run resumes is known only once the checkpoint is restored (after setup), so the
        # warning waits for on_fit_start.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().setup(trainer, pl_module, stage)
        self._used_directory: warnings.WarningMessage | None = None
        for warning in caught:
            if "exists and is not empty" in str(warning.message):
                self._used_directory = warning
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warning = getattr(self, "_used_directory", None)
        if warning is not None and trainer.ckpt_path is None:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # top-k, and last.ckpt if that saved anything
        # Skipped when the step was already saved just now (or at all), in sanity checks and outside fit.
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class FeatureRedraw(pl.Callback):
    """Redraw the FAVOR+ random projections every `interval` optimizer steps, at the start of a step.

    The Performer paper found periodic redraws essential for training with random features. The new
    matrices come from `model.redraw_projections(global_step)`, a pure function of
    (feature_seed, step, layer), so every DDP rank draws the same ones without communicating. Evaluation
    never redraws.

    The redraw happens as the first batch of optimizer step `global_step + 1` starts, when
    global_step is a multiple of the interval. So every validation, test and checkpoint (which come after
    a step ends) sees the projections the weights have just trained with, and no redraw follows a run's
    last step. (Redrawing at the end of a step put every validation of a run whose validation interval
    equals the redraw interval right after a redraw: the benchmark's setting L measured 14.765 against
    14.600 at step 1,000, and a redraw after the final step raised a final perplexity from 14.42 to 14.58.)
    A checkpoint saved at step s holds the projections of step s; a run resumed from it starts with the
    batch of step s + 1, redraws there as an uninterrupted run does, and so continues the same trajectory.

    interval: optimizer steps between redraws; None reads the model's `config.feature_redraw_interval`
        (0 = never). Models without random features (softmax, combiner) are left alone.
    """

    def __init__(self, interval: int | None = None) -> None:
        if interval is not None and interval < 0:
            raise ValueError(f"FeatureRedraw interval must be >= 0 (0 = never), got {interval}")
        self.interval = interval
        self.redraw_steps: list[int] = []  # the steps this process redrew at (inspected by tests)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        model = pl_module.model
        interval = model.config.feature_redraw_interval if self.interval is None else self.interval
        step = trainer.global_step  # optimizer steps finished: this batch belongs to step + 1
        if not model.uses_random_features or interval == 0 or step == 0 or step % interval:
            return
        # With gradient accumulation several batches start at one global_step: redraw before the first.
        if self.redraw_steps and self.redraw_steps[-1] == step:
            return
        model.redraw_projections(step)
        self.redraw_steps.append(step)


class Throughput(pl.Callback):
    """Log train/tokens_per_sec: non-padding tokens processed per wall-clock second, all ranks together.

    A moving window over the last `window` training batches (data loading included, validation
    excluded), so it is the rate a user waits on; shown on the progress bar. Under DDP the rank's own
    rate is multiplied by the world size (ranks see equally sized batches; no collective per step).
    Token counts stay on the batch's device: nothing here waits for the GPU; the value is read only
    when the progress bar refreshes or a logger writes (every log_every_n_steps). It also counts the
    run's tokens seen (all ranks), saved as checkpoint["tokens_seen"] and restored on resume (for the
    model card of an exported model).
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"Throughput window must be >= 1 batch, got {window}")
        # (time at the end of a batch, tokens in it); the first entry marks the window's start.
        self._marks: deque[tuple[float, int | Tensor]] = deque(maxlen=window + 1)
        self._latest: Tensor | None = None
        self._seen: int | Tensor | None = 0  # this rank's non-padding training tokens (None: unknown)

    @property
    def tokens_per_sec(self) -> float | None:
        """The latest value (reading it waits for the GPU)."""
        return None if self._latest is None else float(self._latest)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._marks:
            self._marks.append((time.perf_counter(), 0))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self._marks:
            return
        ids, padding = batch["input_ids"], batch["padding_mask"]
        # a device tensor either way (filled there, not copied from the host): no sync, no transfer
        tokens = ids.new_full((), ids.numel()) if padding is None else (~padding).sum()
        self._marks.append((time.perf_counter(), tokens))
        if self._seen is not None:
            self._seen = self._seen + tokens
        tokens = sum(count for _, count in list(self._marks)[1:])
        seconds = self._marks[-1][0] - self._marks[0][0]
        self._latest = (tokens * trainer.world_size / max(seconds, 1e-9)).float()
        pl_module.log("train/tokens_per_sec", self._latest, prog_bar=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._marks.clear()  # a window never spans a validation

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # None: resumed from a checkpoint that did not count them, so the total is unknown
        checkpoint["tokens_seen"] = None if self._seen is None else int(self._seen) * trainer.world_size

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("tokens_seen")
        self._seen = None if saved is None else saved // max(trainer.world_size, 1)


class TrainingDiverged(UserError):
    """The loss or the gradients stopped being finite; the message names the step."""


class DivergenceGuard(pl.Callback):
    """Stop training after a non-finite loss or gradient without ever applying or saving non-finite weights,
    and without waiting on the device at every step.

    Before every optimizer step it computes the gradient norm on the device (one fused norm over all
    gradients, before clipping) and logs it as train/grad_norm. A step whose norm or loss is NaN or
    infinite is skipped on the device by a fused optimizer (AdamW on CUDA: its found_inf flag, as the
    fp16 gradient scaler uses it); any other optimizer gets zeroed gradients instead, so its update stays
    finite (AdamW then moves the weights by momentum and weight decay alone). The first such step is
    recorded on the device and read back only where a read costs nothing extra: at logging steps (every
    log_every_n_steps), before any checkpoint is written, and at the end of training. There the guard
    raises TrainingDiverged, naming the step: training stops at most log_every_n_steps steps later, and
    no checkpoint is written from the non-finite step on, so the checkpoints on disk hold the weights of
    finite steps.

    Under DDP the gradients are already averaged, so every rank sees the same norm and stops at the same
    step; under FSDP the shards' squared norms are summed over the ranks that hold distinct shards (the
    node's shard group under HYBRID_SHARD). As a last line, a checkpoint about to be written with a
    non-finite tensor is refused, on every rank alike.

    With fp16 mixed precision, the gradient scaler skips steps with inf gradients by design while it
    lowers its scale: `max_skipped_steps` consecutive non-finite steps are tolerated there (and only
    there) before the run is declared diverged.
    """

    def __init__(self, max_skipped_steps: int = 20) -> None:
        if max_skipped_steps < 0:
            raise ValueError(f"DivergenceGuard max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self._norm: Tensor | None = None  # the latest gradient norm (on the device)
        self._loss: Tensor | None = None
        # On the device: consecutive non-finite steps, and the first diverged step (-1: none) with its
        # loss and gradient norm.
        self._skipped: Tensor | None = None
        self._diverged_step: Tensor | None = None
        self._diverged_values: Tensor | None = None
        self._checked_step = -1

    @property
    def grad_norm(self) -> float | None:
        """The latest gradient norm (reading it waits for the device)."""
        return None if self._norm is None else float(self._norm)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = _total_norm(grads)
        if isinstance(trainer.strategy, FSDPStrategy):  # each rank holds a shard of the gradients
            norm = _sum_over_shards(norm.square(), trainer.strategy).sqrt()
        self._norm = norm
        finite = torch.isfinite(norm)
        # Under DDP ranks' losses differ; a non-finite one makes every rank's averaged gradients non-finite.
        loss = self._loss if self._loss is not None and trainer.world_size == 1 else None
        if loss is not None:
            finite = finite & torch.isfinite(loss)
        pl_module.log("train/grad_norm", norm, batch_size=1)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None:  # (the fp16 scaler skips non-finite steps itself)
            for grad in grads:
                grad.masked_fill_(~finite, 0.0)
            if optimizer.defaults.get("fused"):
                # GradScaler's mechanism: a fused optimizer skips its whole update (state and step count
                # included) on the device when found_inf is 1.
                optimizer.found_inf = (~finite).float()
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.long, device=norm.device)
            self._diverged_step = torch.full((), -1, dtype=torch.long, device=norm.device)
            self._diverged_values = torch.full((2,), math.nan, dtype=torch.float32, device=norm.device)
        self._skipped = torch.where(finite, 0, self._skipped + 1)
        allowed = self.max_skipped_steps if scaler is not None else 0
        first = (self._skipped > allowed) & (self._diverged_step < 0)
        # global_step counts finished steps: the step being taken is the next one
        self._diverged_step = torch.where(first, trainer.global_step + 1, self._diverged_step)
        values = torch.stack([norm.float(), (loss if loss is not None else norm).float()])
        self._diverged_values = torch.where(first, values, self._diverged_values)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # once per logging step (several batches end at one step under gradient accumulation)
        if trainer.log_every_n_steps > 0 and step % trainer.log_every_n_steps == 0 and step != self._checked_step:
            self._checked_step = step
            self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: pl.Trainer) -> None:
        """Raise TrainingDiverged if a step has diverged (one read from the device)."""
        if self._diverged_step is None or self._diverged_values is None:
            return
        step = int(self._diverged_step)
        if step < 0:
            return
        norm, loss = self._diverged_values.tolist()
        what = f"loss {loss:.4g}, " if self._loss is not None and trainer.world_size == 1 else ""
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        saved = (f"the last checkpoint ({last}) holds the weights of an earlier, finite step" if last
                 else "no checkpoint had been saved yet")
        raise TrainingDiverged(f"training diverged at step {step}: {what}gradient norm {norm:.4g}; stopped at step "
                               f"{trainer.global_step} without applying a non-finite update or saving a checkpoint "
                               f"since ({saved}). Lower optim.lr, raise optim.warmup_steps or clip gradients "
                               "(trainer.gradient_clip_val)")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.check(trainer)  # the same verdict on every rank (it follows the ranks' common gradient norm)
        bad = [name for name, tensor in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        count = len(bad)
        if trainer.world_size > 1:
            # Decided together: under FSDP only rank 0 holds the gathered state dict, and a refusal on rank 0
            # alone would leave the others waiting at the save barrier until the collective timeout.
            count = int(trainer.strategy.reduce(torch.tensor(count, device=pl_module.device), reduce_op="sum"))
        if count:
            first = f", first: {bad[0]}" if bad else " on rank 0"
            raise TrainingDiverged(f"step {trainer.global_step}: refusing to save a checkpoint with non-finite weights "
                                   f"({count} tensor(s){first}); the checkpoints on disk are unchanged")


class RunSettings(pl.Callback):
    """Save what makes a run this run (model config, objective, seed, data sampling) in every checkpoint,
    as checkpoint["run_settings"], so that a resume can be checked against it (see checkpoint.check_resume)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["run_settings"] = self.settings


class BatchFingerprints(pl.Callback):
    """Write what each rank trained on, to check data sharding and replica agreement (used by tests).

    On train end every rank writes <directory>/rank<r>.json with the SHA-1 of every training batch's
    input_ids (in order) and one SHA-1 over all parameters and buffers: under DDP the batch hashes of
    different ranks should differ while the parameter digests should be equal.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.batch_hashes: list[str] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.batch_hashes.append(_digest([batch["input_ids"]]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = [tensor for _, tensor in sorted(pl_module.state_dict().items())]
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size,
                  "global_step": trainer.global_step, "batches": self.batch_hashes,
                  "parameters": _digest(state)}
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))


def _total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all gradients together (as clip_grad_norm_ computes it, without clipping)."""
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: fused per device and dtype
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _sum_over_shards(value: Tensor, strategy: FSDPStrategy) -> Tensor:
    """`value` summed over the ranks holding distinct gradient shards: FSDP's shard group, which is the
    whole world except under HYBRID_SHARD (the node; nodes hold replicas, and summing them too would
    inflate a norm by sqrt(nodes)). An all-reduce on the device: nothing waits for it on the host."""
    group = getattr(strategy.model, "process_group", None)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM, group=group)
    return value


def _digest(tensors: list[Tensor]) -> str:
    sha = hashlib.sha1()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()
