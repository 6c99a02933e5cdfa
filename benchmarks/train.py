"""Training throughput and peak memory: FAVOR+ vs exact softmax attention, same model, growing length.

    python benchmarks/train.py                       # model=concat size, L = 1024 2048 4096 8192
    python benchmarks/train.py --lengths 1024 2048 --steps 2 --model small
    python benchmarks/train.py --kinds softmax favor softmax+mask   # the all-False mask's cost (MLM: a causal
                                                                    # softmax model drops the mask)

One configuration per fresh subprocess, so each peak memory is its own (CPU: the process's peak
resident set size minus what it held before building the model; CUDA: torch's peak allocation).
Each configuration runs `--warmup` optimizer steps untimed, then `--steps` timed ones of full
training (forward, masked-LM loss, backward, gradient clipping, AdamW) on one window of `L` real
residues: sequences of data/uniprot_sample.fasta joined by <eos>, as data=trembl_concat cuts them.
Throughput is that of the fastest timed step, and the kinds at one length run back to back
(`--repeats` times, alternating, keeping each kind's best), so that other processes on shared cores
disturb the comparison as little as possible. Prints a table with ratios to the first kind.

Every child sets the allocator as `python -m protein_performer.train` does (keep_freed_memory,
conf/train.yaml); `--malloc default` measures glibc's stock behaviour instead.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "uniprot_sample.fasta"


def concat_window(length: int) -> np.ndarray:
    """int64 [length]: the sample's proteins joined by <eos> (cycling through them if needed)."""
    from protein_performer.data import Alphabet

    alphabet = Alphabet()
    fasta = SAMPLE if SAMPLE.is_file() else SAMPLE.with_name(SAMPLE.name + ".gz")
    opener = gzip.open if fasta.suffix == ".gz" else open
    with opener(fasta, "rt") as handle:
        sequences = "".join(">" if line.startswith(">") else line.strip() for line in handle).split(">")[1:]
    pieces, total = [], 0
    while total < length:
        for sequence in sequences:
            pieces.append(np.append(alphabet.encode(sequence), alphabet.eos_idx))
            total += len(pieces[-1])
            if total >= length:
                break
    return np.concatenate(pieces)[:length].astype(np.int64)


def measure(attention: str, length: int, model: str, steps: int, warmup: int, device: str,
            malloc: str = "keep", objective: str = "mlm") -> dict[str, float]:
    """Run in a child process: time `steps` optimizer steps of one configuration, report its peak memory.

    attention: a conf/attention name; "<name>+mask" passes an all-False padding mask, as training did
    before batches without padding came without one (the softmax baseline then left SDPA's fast paths).
    A causal softmax model drops it (right padding: ProteinLM.token_statistics), so there "+mask" costs
    nothing; benchmarks/padded_causal.py times the padded causal step.
    """
    attention, _, mask = attention.partition("+")
    if malloc == "keep":
        from protein_performer.runtime import keep_freed_memory

        keep_freed_memory()
    import torch
    from omegaconf import OmegaConf

    from protein_performer.data import Alphabet
    from protein_performer.model import config_from_hydra
    from protein_performer.training.module import ProteinLM

    alphabet = Alphabet()
    model_cfg = OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml")
    model_cfg.max_length = max(int(model_cfg.max_length), length)
    attention_cfg = OmegaConf.load(REPO / "conf" / "attention" / f"{attention}.yaml")
    attention_cfg = {key: value for key, value in OmegaConf.to_container(attention_cfg).items()
                     if key != "feature_seed"}  # ${seed}: resolved by train.yaml, not needed here
    config = config_from_hydra(model_cfg, attention_cfg, vocab_size=len(alphabet), pad_idx=alphabet.pad_idx,
                               causal=objective == "clm")

    tokens = concat_window(length)
    if objective == "mlm":  # 15% of positions masked and scored, as the data module does
        masked = np.random.default_rng(0).random(length) < 0.15
        labels = np.where(masked, tokens, -100)
        inputs = np.where(masked, alphabet.mask_idx, tokens)
    else:  # every next token scored
        inputs, labels = tokens, np.append(tokens[1:], -100)
    batch = {"input_ids": torch.from_numpy(inputs)[None].to(device),
             "labels": torch.from_numpy(labels)[None].to(device),
             # nothing padded: the data module passes no mask either
             "padding_mask": torch.zeros(1, length, dtype=torch.bool, device=device) if mask else None}

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    module = ProteinLM(config.to_dict(), objective).to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        loss_sum, _, count = module.token_statistics(batch)
        (loss_sum / count.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = min(times)  # the least disturbed step: other processes share the cores
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux: the process's high-water mark
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    return {"seconds_per_step": seconds, "tokens_per_sec": length / seconds, "peak_mb": peak_mb,
            "parameters": module.model.num_parameters()}


def run_child(attention: str, length: int, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", attention, str(length), "--model", args.model,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
               "--malloc", args.malloc, "--objective", args.objective]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--kinds", nargs="+", default=["softmax", "favor"],
                        help="first one is the baseline; <kind>+mask passes an all-False padding mask")
    parser.add_argument("--objective", choices=["mlm", "clm"], default="mlm", help="clm: a causal model")
    parser.add_argument("--model", default="concat", help="a conf/model preset")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per kind and length; best kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: reuse freed memory, as training does (protein_performer.runtime); "
                             "default: glibc's stock malloc")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.model, args.steps, args.warmup,
                                 args.device, args.malloc, args.objective)))
        return

    import torch

    print(f"model={args.model}, batch of 1 window, {args.objective.upper()}, "
          f"{args.warmup} warmup + {args.steps} timed optimizer steps "
          f"(fastest kept) x {args.repeats} repeats, "
          f"device={args.device}, malloc={args.malloc}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f})")
    baseline, others = args.kinds[0], args.kinds[1:]
    header = f"{'L':>6} | " + " | ".join(f"{kind:>10} tok/s  {'peak MB':>8}" for kind in args.kinds)
    header += " | " + " | ".join(f"{kind}/{baseline} tok/s  mem" for kind in others)
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        results: dict[str, dict[str, float]] = {}
        for _ in range(args.repeats):
            for kind in args.kinds:
                result = run_child(kind, length, args)
                best = results.get(kind)
                if best is None or "error" in best or ("error" not in result
                                                       and result["tokens_per_sec"] > best["tokens_per_sec"]):
                    results[kind] = result
        cells = []
        for kind in args.kinds:
            r = results[kind]
            cells.append(f"{r['tokens_per_sec']:>16,.0f}  {r['peak_mb']:>8,.0f}" if "error" not in r
                         else f"{'error':>26}")
        ratios = []
        for kind in others:
            a, b = results[kind], results[baseline]
            ratios.append(f"{a['tokens_per_sec'] / b['tokens_per_sec']:>12.2f}x  {a['peak_mb'] / b['peak_mb']:.2f}x"
                          if "error" not in a and "error" not in b else f"{'-':>18}")
        print(f"{length:>6} | " + " | ".join(cells) + " | " + " | ".join(ratios), flush=True)
        for kind, r in results.items():
            if "error" in r:
                print(f"    {kind} at L={length}: {r['error']}")


if __name__ == "__main__":
    main()
