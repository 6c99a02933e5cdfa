"""What one CUDA GPU does with this package: one command, three tables.

    python benchmarks/gpu.py                             # everything below, a few minutes on one GPU
    python benchmarks/gpu.py --lengths 1024 4096 --skip-smoke

1. Attention forward+backward by length: FAVOR+ (`ops.favor_attention`) against SDPA
   (`torch.nn.functional.scaled_dot_product_attention` without a mask, so flash attention where the
   GPU has it), bidirectional and causal, in bf16 (autocast, as bf16-mixed training runs) and in fp32
   with TF32 matmuls (torch.set_float32_matmul_precision("high"), as the train command sets on GPUs).
2. Training steps (forward, loss, backward, clipping, AdamW) of the model=concat size under bf16
   autocast, favor against softmax, one unpadded window per batch (no mask, as the data module sends).
3. A smoke run of the real command with trainer=ddp and trainer=fsdp on one GPU (tiny model, the bundled
   sample): it must train, validate, test and exit 0.

Times are CUDA-event timings of the fastest of `--repeats` runs after a warm-up; ratios compare
columns of the same run. Without a CUDA device it says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def timed(fn, repeats: int, device: str) -> tuple[float, float]:
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


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _ms(cell: tuple[float, float] | None) -> str:
    return f"{cell[0] * 1000:.1f}" if cell else "OOM"


def _count(cell: tuple[float, float] | None, index: int) -> str:
    return ("-" if cell[index] != cell[index] else f"{cell[index]:,.0f}") if cell else "OOM"  # nan: no figure


def attention_table(lengths: list[int], repeats: int, device: str = "cuda") -> None:
    from protein_performer import ops

    heads, head_dim, features = 8, 64, 256
    print(f"\n### Attention forward+backward (batch 1, {heads} heads x {head_dim}, {features} features)\n")
    print("| precision | direction | L | SDPA ms | FAVOR+ ms | FAVOR+ speed-up | SDPA MiB | FAVOR+ MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    projection = ops.gaussian_orthogonal_random_matrix(features, head_dim, generator=torch.Generator().manual_seed(0),
                                                       device=device, dtype=torch.float32)
    for precision in ("bf16", "tf32"):
        torch.set_float32_matmul_precision("high")
        for causal in (False, True):
            for length in lengths:
                q, k, v = (torch.randn(1, heads, length, head_dim, device=device, requires_grad=True)
                           for _ in range(3))
                grad = torch.randn(1, heads, length, head_dim, device=device)
                cells = {}
                for name in ("sdpa", "favor"):
                    def step() -> None:
                        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                            if name == "sdpa":
                                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            else:
                                out = ops.favor_attention(q, k, v, projection, causal=causal)
                        out.backward(grad.to(out.dtype))
                    try:
                        cells[name] = timed(step, repeats, device)
                    except torch.cuda.OutOfMemoryError:
                        cells[name] = None
                    _free(device)
                sdpa, favor = cells["sdpa"], cells["favor"]
                ratio = f"{sdpa[0] / favor[0]:.2f}x" if sdpa and favor else "-"
                print(f"| {precision} | {'causal' if causal else 'bidirectional'} | {length} | {_ms(sdpa)} | "
                      f"{_ms(favor)} | {ratio} | {_count(sdpa, 1)} | {_count(favor, 1)} |", flush=True)


def training_table(lengths: list[int], repeats: int, model: str, device: str = "cuda") -> None:
    import numpy as np
    from omegaconf import OmegaConf

    from protein_performer.data import Alphabet
    from protein_performer.model import config_from_hydra
    from protein_performer.training.module import ProteinLM
    from train import concat_window  # benchmarks/train.py: the sample's proteins joined by <eos>

    alphabet = Alphabet()
    torch.set_float32_matmul_precision("high")
    print(f"\n### Training steps (model={model}, MLM, 1 window per batch, bf16 autocast, TF32)\n")
    print("| L | softmax tokens/s | favor tokens/s | favor / softmax | softmax peak MiB | favor peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length in lengths:
        cells = {}
        for kind in ("softmax", "favor"):
            model_cfg = OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml")
            model_cfg.max_length = max(int(model_cfg.max_length), length)
            attention_cfg = {key: value for key, value in OmegaConf.to_container(
                OmegaConf.load(REPO / "conf" / "attention" / f"{kind}.yaml")).items() if key != "feature_seed"}
            config = config_from_hydra(model_cfg, attention_cfg, vocab_size=len(alphabet), pad_idx=alphabet.pad_idx,
                                       causal=False)
            tokens = concat_window(length)
            masked = np.random.default_rng(0).random(length) < 0.15
            batch = {"input_ids": torch.from_numpy(np.where(masked, alphabet.mask_idx, tokens))[None].to(device),
                     "labels": torch.from_numpy(np.where(masked, tokens, -100))[None].to(device), "padding_mask": None}
            module = ProteinLM(config.to_dict(), "mlm").to(device).train()
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

            def step() -> None:
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss_sum, _, count = module.token_statistics(batch)
                (loss_sum / count.clamp(min=1)).backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            try:
                seconds, peak = timed(step, repeats, device)
                cells[kind] = (length / seconds, peak)
            except torch.cuda.OutOfMemoryError:
                cells[kind] = None
            del module, optimizer
            _free(device)
        soft, favor = cells["softmax"], cells["favor"]
        ratio = f"{favor[0] / soft[0]:.2f}x" if soft and favor else "-"
        print(f"| {length} | {_count(soft, 0)} | {_count(favor, 0)} | {ratio} | {_count(soft, 1)} | "
              f"{_count(favor, 1)} |", flush=True)


def smoke_runs(workdir: Path) -> bool:
    print("\n### One-GPU runs of the train command (model=tiny, data=sample, 30 steps, validate and test)\n")
    ok = True
    for trainer in ("ddp", "fsdp"):
        command = [sys.executable, "-m", "protein_performer.train", f"trainer={trainer}", "trainer.devices=1",
                   "model=tiny", "data=sample", "data.max_length=128", "data.tokens_per_batch=1024",
                   f"data.cache_dir={workdir / 'cache'}", "trainer.max_steps=30", "trainer.val_check_interval=30",
                   "logger=none", "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={workdir / trainer}"]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                                env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)})
        seconds = time.perf_counter() - start
        lines = [line for line in result.stdout.splitlines() if "perplexity" in line]
        if result.returncode == 0:
            print(f"- trainer={trainer}: exit 0 in {seconds:.0f} s; {' '.join(lines[:2])}")
        else:
            ok = False
            tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"- trainer={trainer}: FAILED with exit {result.returncode} after {seconds:.0f} s: {tail}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--train-lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--model", default="concat", help="a conf/model preset for the training table")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell; the fastest is kept")
    parser.add_argument("--skip-smoke", action="store_true", help="leave out the train-command runs")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/protein_performer/gpu-benchmark"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA GPU here (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}); run it on a machine with one. For CPU figures see "
              "benchmarks/attention.py and benchmarks/train.py.", file=sys.stderr)
        return 2
    properties = torch.cuda.get_device_properties(0)
    print(f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, compute capability "
          f"{properties.major}.{properties.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    attention_table(args.lengths, args.repeats)
    training_table(args.train_lengths, args.repeats, args.model)
    if args.skip_smoke:
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    return 0 if smoke_runs(args.workdir.resolve()) else 1


if __name__ == "__main__":
    sys.exit(main())
