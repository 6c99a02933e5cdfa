"""FLIP secondary structure: linear probes of trained checkpoints against sequence-only baselines.

    python benchmarks/flip_probe.py outputs/<date>/<time>/checkpoints/last.ckpt
    python benchmarks/flip_probe.py run_a/ run_b/ --threads 1          # several models, one table
    python benchmarks/flip_probe.py <ckpt> --fast                      # tiny subsets: a smoke run

The downstream notebook's experiment (protein_performer.embedding.probe.probe_secondary_structure)
on each checkpoint: 3-state accuracy on FLIP's test chains of a logistic-regression probe on the
one-hot residue, on its one-hot window of ±7 residues, on each layer's embedding, and on the window
plus the best layer (chosen on FLIP's validation chains). The last row asks whether the model's
embedding adds anything to what a linear model reads from the local sequence. `--untrained` runs the
same probes on an untrained model of the same architecture (seed 0) beside it: the control for that
question, since random features of the context can add something too. Prints a Markdown table; "vs
window" is the difference to the one-hot window probe, in accuracy points.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def by_role(probes) -> dict[str, object]:
    """The results of one model by what they are (its best layer may differ from another model's)."""
    return {"residue": probes.onehot, "window": probes.window, "last": probes.by_layer[probes.last_layer],
            "best": probes.by_layer[probes.best_layer], "window + best": probes.window_plus_best}


ROLES = ("residue", "window", "last", "best", "window + best")  # the order of SecondaryStructureProbes.rows()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path,
                        help=".ckpt files, training run directories or exported model directories")
    parser.add_argument("--data", type=Path, default=REPO / "data", help="folder of flip_ss_*.fasta.gz")
    parser.add_argument("--fast", action="store_true", help="a few chains per split: checks the pipeline only")
    parser.add_argument("--untrained", action="store_true",
                        help="also probe an untrained model of each checkpoint's architecture (the control)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    for checkpoint in args.checkpoints:
        if not checkpoint.exists():
            parser.error(f"checkpoint {checkpoint} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)

    from protein_performer import load_model
    from protein_performer.embedding.probe import probe_secondary_structure

    limits = {"fit": 12, "validation": 4, "test": 6} if args.fast else None
    options = {"weight_decays": [1e-3], "steps": 10} if args.fast else {}
    for checkpoint in args.checkpoints:
        start = time.perf_counter()
        model, alphabet = load_model(checkpoint)
        models = {"trained": model}
        if args.untrained:
            torch.manual_seed(0)
            models["untrained"] = type(model)(model.config).eval()
        probes = {name: probe_secondary_structure(m, alphabet, args.data, limits=limits, progress=True, **options)
                  for name, m in models.items()}
        trained = probes["trained"]
        print(f"\n{checkpoint}: {model.config.attention} attention, {model.num_parameters():,} parameters; "
              f"scored residues {trained.residues}; {time.perf_counter() - start:.0f} s\n")
        print("Row names are the trained model's; another column's best layer is its own (below).\n")
        print("| probe | " + " | ".join(f"{name} Q3 test | vs window" for name in probes) + " |")
        print("|---|" + "---:|---:|" * len(probes))
        names = list(trained.rows())
        if len(names) < len(ROLES):  # the trained model's best layer is its last: one row for both
            names.insert(3, f"embedding, layer {trained.best_layer} (best on validation)")
        for name, role in zip(names, ROLES, strict=True):
            accuracies = [(by_role(r)[role].test_accuracy, r.window.test_accuracy) for r in probes.values()]
            cells = [f"{acc:.3f} | {acc - window:+.3f}" for acc, window in accuracies]
            print(f"| {name} | " + " | ".join(cells) + " |")
        for name, result in probes.items():
            layers = ", ".join(f"{layer}: {r.test_accuracy:.3f}" for layer, r in result.by_layer.items())
            print(f"\n{name}, best layer on validation {result.best_layer}; by layer (0 = token embeddings): {layers}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
