"""Embedding throughput and peak memory against protein length: FAVOR+ vs exact softmax attention.

    python benchmarks/embed.py                       # lengths 256 .. 16384, the demo model size (conf/model/small)
    python benchmarks/embed.py --threads 1           # steadier numbers on a machine shared with other jobs
    python benchmarks/embed.py --lengths 1024 4096 --d-model 512 --n-layers 6 --n-heads 8 --d-ff 2048

Proteins of each length go through `protein_performer.embed.embed` (tokenise, forward, mean over
residues) with randomly initialised models of the same size; only the attention kind differs. Each run
embeds at least --residues residues (many short proteins in one batch, or one long protein). Each
(kind, length) runs in its own process, so peak memory is that run's alone: the peak resident set size
above the process's size just before embedding (CPU), or torch's peak allocation (CUDA). Speed is the
best of --repeats timed runs after one warm-up run. The proteins are real FLIP chains from data/, joined
end to end until they reach the length.
"""
from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "data" / "flip_ss_sequences.fasta.gz"


def protein_of_length(length: int) -> str:
    residues = []
    with gzip.open(DATA, "rt") as handle:
        for line in handle:
            if not line.startswith(">"):
                residues.append(line.strip())
            if sum(map(len, residues)) >= length:
                break
    joined = "".join(residues)
    while len(joined) < length:
        joined += joined
    return joined[:length]


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def worker(args: argparse.Namespace) -> None:
    """Measure one (kind, length) and print a JSON line."""
    from protein_performer.data import Alphabet
    from protein_performer.embed import embed
    from protein_performer.model import PerformerConfig, ProteinPerformer

    alphabet = Alphabet()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = PerformerConfig(vocab_size=len(alphabet), d_model=args.d_model, n_layers=args.n_layers,
                             n_heads=args.n_heads, d_ff=args.d_ff, dropout=0.0, attention=args.kind,
                             nb_features=args.nb_features, max_length=1024, pad_idx=alphabet.pad_idx)
    model = ProteinPerformer(config).to(device).eval()
    proteins = [protein_of_length(args.length)] * max(1, -(-args.residues // args.length))

    def run() -> None:
        embed(model, alphabet, proteins, device=device, max_tokens=len(proteins) * (args.length + 2))
        if device.type == "cuda":
            torch.cuda.synchronize()

    baseline = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run()  # warm-up; also the run whose memory peak is reported
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline  # ru_maxrss is KiB on Linux
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"kind": args.kind, "length": args.length, "residues": len(proteins) * args.length,
                      "seconds": min(times), "peak_mib": peak}))


def measure(kind: str, length: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", "--kind", kind, "--length", str(length),
               "--repeats", str(args.repeats), "--device", args.device, "--d-model", str(args.d_model),
               "--n-layers", str(args.n_layers), "--n-heads", str(args.n_heads), "--d-ff", str(args.d_ff),
               "--nb-features", str(args.nb_features), "--residues", str(args.residues),
               "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--kinds", nargs=2, default=["favor", "softmax"], metavar=("FAST", "BASELINE"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=256)
    parser.add_argument("--nb-features", type=int, default=256)
    parser.add_argument("--residues", type=int, default=16384,
                        help="residues per timed run (short proteins are batched together)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return

    fast, baseline = args.kinds
    print(f"Embedding throughput, >= {args.residues} residues per run; {args.device}, torch threads "
          f"{torch.get_num_threads()}; d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, "
          f"d_ff {args.d_ff}, nb_features {args.nb_features}\n")
    print(f"| length | {fast} res/s | {baseline} res/s | speed {fast}/{baseline} | {fast} peak MiB "
          f"| {baseline} peak MiB | memory {baseline}/{fast} |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        a, b = measure(fast, length, args), measure(baseline, length, args)
        if "error" in a or "error" in b:
            print(f"| {length} | failed: {a.get('error') or b.get('error')} ||||||")
            continue
        speed_a, speed_b = a["residues"] / a["seconds"], b["residues"] / b["seconds"]
        print(f"| {length:,} | {speed_a:,.0f} | {speed_b:,.0f} | {speed_a / speed_b:.2f}x | {a['peak_mib']:,.0f} "
              f"| {b['peak_mib']:,.0f} | {b['peak_mib'] / max(a['peak_mib'], 1e-9):.2f}x |")
    print(f"\nRatios above 1 favour {fast}. Peak memory is the run's resident-set growth (CPU) or torch's peak "
          "allocation (CUDA).")


if __name__ == "__main__":
    main()
