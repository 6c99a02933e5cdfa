"""Lightning callbacks: checkpoints (last.ckpt after every validation), FAVOR+ feature redraws, throughput in
tokens/s, the divergence guard (with the gradient norm), the run settings saved for resume checks, and
per-rank batch fingerprints."""
from __future__ import annotations

import hashlib
import json
import math
import time
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
    """

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
    when the progress bar refreshes or a logger writes (every log_every_n_steps).
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"Throughput window must be >= 1 batch, got {window}")
        # (time at the end of a batch, tokens in it); the first entry marks the window's start.
        self._marks: deque[tuple[float, int | Tensor]] = deque(maxlen=window + 1)
        self._latest: float | Tensor | None = None

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
        padding = batch["padding_mask"]
        tokens = batch["input_ids"].numel() if padding is None else (~padding).sum()  # a device tensor: no sync
        self._marks.append((time.perf_counter(), tokens))
        tokens = sum(count for _, count in list(self._marks)[1:])
        seconds = self._marks[-1][0] - self._marks[0][0]
        self._latest = tokens * trainer.world_size / max(seconds, 1e-9)
        value = self._latest if isinstance(self._latest, Tensor) else torch.tensor(self._latest)
        pl_module.log("train/tokens_per_sec", value.float(), prog_bar=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._marks.clear()  # a window never spans a validation


class TrainingDiverged(UserError):
    """The loss or the gradients stopped being finite; the message names the step."""


class DivergenceGuard(pl.Callback):
    """Stop training at the first non-finite loss or gradient; never let non-finite weights be saved.

    Before every optimizer step it computes the gradient norm (one fused norm over all gradients,
    before clipping), logs it as train/grad_norm, and raises TrainingDiverged, naming the step, if it
    or the step's loss is NaN or infinite: the update is not applied, so the weights stay those of
    the last good step, and no checkpoint is written on the way out. Under DDP the gradients are
    already averaged, so every rank sees the same norm and stops at the same step; under FSDP the
    shards' norms are summed across ranks first (one small all-reduce per step). As a last line,
    any checkpoint about to be written with a non-finite tensor is refused.

    With fp16 mixed precision, the gradient scaler skips steps with inf gradients by design while it
    lowers its scale: `max_skipped_steps` consecutive non-finite steps are tolerated there (and only
    there) before the run is declared diverged.
    """

    def __init__(self, max_skipped_steps: int = 20) -> None:
        if max_skipped_steps < 0:
            raise ValueError(f"DivergenceGuard max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.grad_norm: float | None = None  # the latest value
        self._loss: Tensor | None = None
        self._skipped = 0

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = _total_norm(grads)
        if isinstance(trainer.strategy, FSDPStrategy):  # each rank holds a shard of the gradients
            norm = trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        self.grad_norm = float(norm)  # one device sync per step
        loss = float(self._loss) if self._loss is not None and trainer.world_size == 1 else 0.0
        if math.isfinite(self.grad_norm) and math.isfinite(loss):
            self._skipped = 0
            pl_module.log("train/grad_norm", norm, batch_size=1)
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._skipped += 1
        if scaler is not None and self._skipped <= self.max_skipped_steps:
            return  # the scaler skips this step and lowers its scale
        step = trainer.global_step + 1  # the optimizer step being taken (global_step counts finished ones)
        what = f"loss {float(self._loss):.4g}, " if self._loss is not None else ""
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        saved = (f"the last checkpoint ({last}) holds the weights of an earlier, finite step" if last
                 else "no checkpoint had been saved yet")
        raise TrainingDiverged(f"training diverged at step {step}: {what}gradient norm {self.grad_norm:.4g}; stopped "
                               f"before applying this step ({saved}). Lower optim.lr, raise optim.warmup_steps or "
                               "clip gradients (trainer.gradient_clip_val)")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        bad = [name for name, tensor in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        if bad:
            raise TrainingDiverged(f"step {trainer.global_step}: refusing to save a checkpoint with non-finite weights "
                                   f"({len(bad)} tensor(s), first: {bad[0]}); the checkpoints on disk are unchanged")


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


def _digest(tensors: list[Tensor]) -> str:
    sha = hashlib.sha1()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()
