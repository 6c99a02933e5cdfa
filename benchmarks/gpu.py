"""What one CUDA GPU does with this package: one command, three tables and smoke runs.

    python benchmarks/gpu.py                             # everything below, some minutes on one GPU
    python benchmarks/gpu.py --lengths 1024 4096 --train-lengths 1024 --skip-smoke

1. Attention forward+backward by length, batches of about `--tokens` tokens (32k: what a token-budget
   batch holds, not a launch-bound batch of 1): SDPA against FAVOR+ (`ops.favor_attention`) and windowed
   favor_rpe (`ops.favor_rpe_attention`), bidirectional and causal, unpadded and right-padded (rows of
   random lengths down to half of L), in bf16 (autocast, as bf16-mixed training runs) and fp32 with TF32
   matmuls. SDPA runs under one forced backend, the first that accepts the call among flash,
   memory-efficient, cuDNN and math, and the table names it: a padded bidirectional batch needs a mask,
   which flash does not take; a padded causal batch runs is_causal without one, as training does.
2. Training steps of the model=concat size under bf16-mixed, softmax / favor / favor_rpe, MLM and CLM,
   unpadded and padded: the bare step (forward, loss, backward, clipping, AdamW) beside the same step
   run by a Lightning Trainer with the default callbacks (feature redraw, throughput, divergence guard,
   learning-rate monitor, progress bar) and a logger. A callback or hook that waits on the GPU every
   step shows as a gap between the two columns.
3. Smoke runs of the real command with trainer=ddp and trainer=fsdp on one GPU, and on two when two are
   present (tiny model, the bundled sample): each must train, validate, test and exit 0 within
   `--smoke-timeout` seconds.

Times are CUDA-event timings of the fastest of `--repeats` runs after a warm-up (the Lightning column:
wall-clock over `--repeats` steps after warm-up steps, synchronised at both ends); ratios compare
columns of the same run. Without a CUDA device it says so in one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# SDPA backends in the order they are tried: the first that accepts a call is forced for its timing.
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
DEFAULT_CALLBACKS = ("feature_redraw", "throughput", "divergence_guard", "lr_monitor", "progress_bar")


def timed(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, float]:
    """(fastest of `repeats` timed calls of fn() after one warm-up in seconds, peak MiB allocated).

    CUDA: event timings and torch's peak allocation. CPU (only to check this script without a GPU):
    wall-clock, no memory figure.
    """
    fn()
    if device != "cuda":
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best, float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return best, torch.cuda.max_memory_allocated() / 2**20


def sdpa_backend(fn: Callable[[], object], backends: Sequence[str] = SDPA_BACKENDS) -> str | None:
    """The first SDPA backend (a name of torch.nn.attention.SDPBackend) under which fn() runs, or None.

    Each is tried alone (sdpa_kernel): SDPA raises when that backend cannot take the call (a mask for
    flash, fp32 for flash, an unsupported head size, no such kernel on this device).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name in backends:
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                fn()
            return name
        except RuntimeError:
            continue
    return None


def forced(fn: Callable[[], object], backend: str | None) -> Callable[[], object]:
    """fn run under the one SDPA backend `backend` (None: torch's own choice)."""
    if backend is None:
        return fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run() -> object:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return fn()
    return run


def batch_rows(tokens: int, length: int) -> int:
    """Rows of length `length` in a batch of about `tokens` tokens (at least one)."""
    return max(1, tokens // length)


def right_padding(rows: int, length: int, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """bool [rows, length], True at padding: each row real for a random length in [L/2, L], padded after.
    Row 0 is full, so the batch is as long as its longest row (as the data module makes it)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=generator)
    lengths[0] = length
    return (torch.arange(length)[None, :] >= lengths[:, None]).to(device)


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _ms(cell: tuple[float, float] | None) -> str:
    return f"{cell[0] * 1000:.1f}" if cell else "OOM"


def _count(cell: tuple[float, float] | None, index: int) -> str:
    return ("-" if cell[index] != cell[index] else f"{cell[index]:,.0f}") if cell else "OOM"  # nan: no figure


def _ratio(numerator: tuple[float, float] | None, denominator: tuple[float, float] | None) -> str:
    return f"{numerator[0] / denominator[0]:.2f}x" if numerator and denominator else "-"


def _attempt(fn: Callable[[], tuple[float, float]], device: str) -> tuple[float, float] | None:
    """fn(), or None when the GPU ran out of memory."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        _free(device)


def attention_table(lengths: list[int], repeats: int, tokens: int = 32768, device: str = "cuda") -> None:
    from protein_performer import ops

    heads, head_dim, features, window = 8, 64, 256, 128
    print(f"\n### Attention forward+backward ({tokens:,} tokens per batch, {heads} heads x {head_dim}, "
          f"{features} features, favor_rpe window {window})\n")
    print("| precision | direction | padded | L x batch | SDPA backend | SDPA ms | FAVOR+ ms | favor_rpe ms | "
          "FAVOR+ speed-up | favor_rpe speed-up | SDPA MiB | FAVOR+ MiB | favor_rpe MiB |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    projection = ops.gaussian_orthogonal_random_matrix(features, head_dim, generator=torch.Generator().manual_seed(0),
                                                       device=device, dtype=torch.float32)
    bias = ops.WindowedBias(band=0.1 * torch.randn(heads, 2 * window - 1, device=device),
                            far=torch.zeros(heads, 2, device=device))
    torch.set_float32_matmul_precision("high")
    for precision in ("bf16", "tf32"):
        for causal in (False, True):
            for padded in (False, True):
                for length in lengths:
                    rows = batch_rows(tokens, length)
                    mask = right_padding(rows, length, device) if padded else None
                    q, k, v = (torch.randn(rows, heads, length, head_dim, device=device, requires_grad=True)
                               for _ in range(3))
                    grad = torch.randn(rows, heads, length, head_dim, device=device)

                    def step(name: str) -> None:
                        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                            if name == "sdpa":  # a causal right-padded batch needs no mask (as training runs it)
                                out = ops.softmax_attention(q, k, v, causal=causal,
                                                            key_padding_mask=None if causal else mask)
                            elif name == "favor":
                                out = ops.favor_attention(q, k, v, projection, causal=causal, key_padding_mask=mask)
                            else:
                                out = ops.favor_rpe_attention(q, k, v, projection, bias, causal=causal,
                                                              key_padding_mask=mask)
                        out.backward(grad.to(out.dtype))

                    backend = sdpa_backend(lambda: step("sdpa"))
                    cells = {name: _attempt(lambda: timed(forced(lambda: step(name), backend if name == "sdpa"
                                                                  else None), repeats, device), device)
                             for name in ("sdpa", "favor", "favor_rpe")}
                    sdpa, favor, rpe = cells["sdpa"], cells["favor"], cells["favor_rpe"]
                    print(f"| {precision} | {'causal' if causal else 'bidirectional'} | {'yes' if padded else 'no'} "
                          f"| {length} x {rows} | {(backend or '-').lower()} | {_ms(sdpa)} | {_ms(favor)} | {_ms(rpe)} "
                          f"| {_ratio(sdpa, favor)} | {_ratio(sdpa, rpe)} | {_count(sdpa, 1)} | {_count(favor, 1)} "
                          f"| {_count(rpe, 1)} |", flush=True)


def _training_batch(objective: str, length: int, rows: int, padded: bool,
                    device: str) -> dict[str, torch.Tensor | None]:
    """Real proteins joined by <eos>, `rows` windows of `length`, MLM-masked or CLM-labelled; padded rows
    are cut at random lengths and padded on the right, as the data module pads."""
    import numpy as np

    from protein_performer.data import IGNORE_INDEX, Alphabet
    from train import concat_window  # benchmarks/train.py: the sample's proteins joined by <eos>

    alphabet = Alphabet()
    ids = torch.from_numpy(concat_window(length * rows).reshape(rows, length))
    mask = right_padding(rows, length) if padded else torch.zeros(rows, length, dtype=torch.bool)
    ids = ids.masked_fill(mask, alphabet.pad_idx)
    if objective == "mlm":
        chosen = torch.from_numpy(np.random.default_rng(0).random((rows, length)) < 0.15) & ~mask
        labels = torch.where(chosen, ids, IGNORE_INDEX)
        ids = ids.masked_fill(chosen, alphabet.mask_idx)
    else:
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:], IGNORE_INDEX)
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "padding_mask": mask.to(device) if padded else None}


def _module(model: str, kind: str, objective: str, length: int):
    from omegaconf import OmegaConf

    from protein_performer.data import Alphabet
    from protein_performer.model import config_from_hydra
    from protein_performer.training.module import ProteinLM

    alphabet = Alphabet()
    model_cfg = OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml")
    model_cfg.max_length = max(int(model_cfg.max_length), length)
    attention_cfg = {key: value for key, value in OmegaConf.to_container(
        OmegaConf.load(REPO / "conf" / "attention" / f"{kind}.yaml")).items() if key != "feature_seed"}
    config = config_from_hydra(model_cfg, attention_cfg, vocab_size=len(alphabet), pad_idx=alphabet.pad_idx,
                               causal=objective == "clm")
    return ProteinLM(config.to_dict(), objective, warmup_steps=0)


def bare_step_seconds(module, batch, repeats: int, device: str) -> tuple[float, float]:
    """(seconds, peak MiB) of the fastest bare training step: forward, loss, backward, clipping, AdamW."""
    from protein_performer.training.module import use_fused_adamw

    module = module.to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=use_fused_adamw(list(module.parameters())))

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss_sum, _, count = module.token_statistics(batch)
        (loss_sum / count.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return timed(step, repeats, device)


def lightning_step_seconds(module, batch, repeats: int, device: str, warmup: int = 3) -> tuple[float, float]:
    """(seconds, nan) per optimizer step of a Lightning Trainer training `module` on `batch` over and over, with
    the default callbacks (conf/callbacks/default.yaml but the checkpoint) and a CSV logger writing every
    log_every_n_steps=10: wall-clock over `repeats` steps after `warmup`, synchronised at both ends. The
    progress bar writes to stderr, away from the tables."""
    import hydra
    import pytorch_lightning as pl
    from omegaconf import OmegaConf
    from pytorch_lightning.loggers import CSVLogger

    class Repeated(pl.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([batch] * (warmup + repeats), batch_size=None)

    class Clock(pl.Callback):
        seconds = float("nan")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == warmup - 1 or batch_idx == warmup + repeats - 1:
                if device == "cuda":
                    torch.cuda.synchronize()
                if batch_idx == warmup - 1:
                    self.start = time.perf_counter()
                else:
                    self.seconds = (time.perf_counter() - self.start) / repeats

    conf = OmegaConf.load(REPO / "conf" / "callbacks" / "default.yaml")
    callbacks = [hydra.utils.instantiate(conf[name]) for name in DEFAULT_CALLBACKS]
    clock = Clock()
    with tempfile.TemporaryDirectory() as logs, contextlib.redirect_stdout(sys.stderr):
        trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                             precision="bf16-mixed" if device == "cuda" else "32-true", max_steps=warmup + repeats,
                             gradient_clip_val=0.5, log_every_n_steps=10, limit_val_batches=0,
                             enable_checkpointing=False, enable_model_summary=False, logger=CSVLogger(logs),
                             callbacks=[*callbacks, clock])
        trainer.fit(module.to(device), datamodule=Repeated())
    return clock.seconds, float("nan")


def training_table(lengths: list[int], repeats: int, model: str, tokens: int = 32768, device: str = "cuda",
                   kinds: Sequence[str] = ("softmax", "favor", "favor_rpe")) -> None:
    torch.set_float32_matmul_precision("high")
    print(f"\n### Training steps (model={model}, {tokens:,} tokens per batch, bf16-mixed, TF32): bare step "
          "against a Lightning Trainer with the default callbacks\n")
    print("| objective | padded | L x batch | attention | SDPA backend | bare tokens/s | Lightning tokens/s "
          "| Lightning step / bare step | speed / softmax (bare) | peak MiB |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|")
    for objective in ("mlm", "clm"):
        for padded in (False, True):
            for length in lengths:
                rows = batch_rows(tokens, length)
                batch = _training_batch(objective, length, rows, padded, device)
                real = int(rows * length if batch["padding_mask"] is None else (~batch["padding_mask"]).sum())
                softmax = None
                for kind in kinds:
                    backend = None
                    if kind == "softmax":
                        probe = _module(model, kind, objective, length).to(device)
                        backend = sdpa_backend(lambda: _forward_backward(probe, batch, device))
                        del probe
                    bare = _attempt(forced(lambda: bare_step_seconds(_module(model, kind, objective, length), batch,
                                                                     repeats, device), backend), device)
                    lightning = _attempt(forced(lambda: lightning_step_seconds(
                        _module(model, kind, objective, length), batch, repeats, device), backend), device)
                    softmax = bare if kind == "softmax" else softmax
                    rate = (lambda cell: f"{real / cell[0]:,.0f}" if cell else "OOM")
                    print(f"| {objective} | {'yes' if padded else 'no'} | {length} x {rows} | {kind} "
                          f"| {(backend or '-').lower()} | {rate(bare)} | {rate(lightning)} "
                          f"| {_ratio(lightning, bare)} | {_ratio(softmax, bare)} | {_count(bare, 1)} |", flush=True)


def _forward_backward(module, batch, device: str) -> None:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss_sum, _, count = module.token_statistics(batch)
    (loss_sum / count.clamp(min=1)).backward()


def run_with_timeout(command: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None
                     ) -> tuple[int | None, str, float]:
    """(exit status or None when it timed out, the last line of stderr or the perplexity lines, seconds)."""
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return None, f"no exit within {timeout:.0f} s (killed)", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if result.returncode == 0:
        return 0, " ".join(line for line in result.stdout.splitlines() if "perplexity" in line)[:300], seconds
    return result.returncode, (result.stderr.strip().splitlines() or ["(no output)"])[-1], seconds


def smoke_runs(workdir: Path, gpus: int, timeout: float) -> bool:
    print("\n### Runs of the train command (model=tiny, data=sample, 30 steps, validate and test)\n")
    ok = True
    for devices in sorted({1, min(gpus, 2)}):
        for trainer in ("ddp", "fsdp"):
            command = [sys.executable, "-m", "protein_performer.train", f"trainer={trainer}",
                       f"trainer.devices={devices}", "model=tiny", "data=sample", "data.max_length=128",
                       "data.tokens_per_batch=1024", f"data.cache_dir={workdir / 'cache'}", "trainer.max_steps=30",
                       "trainer.val_check_interval=30", "logger=none", "callbacks.progress_bar.refresh_rate=0",
                       f"hydra.run.dir={workdir / f'{trainer}-{devices}gpu'}"]
            status, line, seconds = run_with_timeout(command, workdir, timeout,
                                                     {"WANDB_MODE": "offline", "PYTHONPATH": str(REPO)})
            if status == 0:
                print(f"- trainer={trainer} on {devices} GPU(s): exit 0 in {seconds:.0f} s; {line}")
            else:
                ok = False
                how = "timeout" if status is None else f"exit {status}"
                print(f"- trainer={trainer} on {devices} GPU(s): FAILED ({how}) after {seconds:.0f} s: {line}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--train-lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch (rows = tokens // L)")
    parser.add_argument("--model", default="concat", help="a conf/model preset for the training table")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell; the fastest is kept")
    parser.add_argument("--skip-smoke", action="store_true", help="leave out the train-command runs")
    parser.add_argument("--smoke-timeout", type=float, default=900, help="seconds before a smoke run is killed")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/protein_performer/gpu-benchmark"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA GPU here (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}); run it on a machine with one. For CPU figures see "
              "benchmarks/attention.py and benchmarks/train.py.", file=sys.stderr)
        return 2
    properties = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.device_count()} x {properties.name}, {properties.total_memory / 2**30:.0f} GiB, compute "
          f"capability {properties.major}.{properties.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    attention_table(args.lengths, args.repeats, args.tokens)
    training_table(args.train_lengths, args.repeats, args.model, args.tokens)
    if args.skip_smoke:
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    return 0 if smoke_runs(args.workdir.resolve(), torch.cuda.device_count(), args.smoke_timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
