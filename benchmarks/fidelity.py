"""How far a checkpoint's attention is from exact softmax, on its own q, k, v over real proteins.

    python benchmarks/fidelity.py CKPT FASTA                         # held-out proteins of the run's split
    python benchmarks/fidelity.py CKPT data/flip_ss_sequences.fasta.gz --split all --proteins 64
    python benchmarks/fidelity.py CKPT FASTA --output benchmarks/results/fidelity/demo.md

Prints Markdown tables (`protein_performer.fidelity` defines the statistics):

1. by layer and head, with the projections the checkpoint holds: relative output error
   ||A_hat v - A v|| / ||A v||, u_bar (mean ||q' + k'||^2, which sets the estimator's variance
   ~ exp(u_bar) - 1) and the exact attention's row entropy;
2. by layer, unmasked proteins against the same proteins MLM-masked (15%, 80/10/10), as validation sees them;
3. by number of features m, fresh draws (--draws of them, pooled), error as a ratio to the checkpoint's m;
4. by feature variant: attention config overrides (VARIANTS) applied by rebuilding each layer, same draws,
   error as a ratio to the plain variant; a variant whose keys this version's config does not know is
   skipped with a note;
5. the cost of the per-validation logging (val/attn_error, val/u_bar on one batch) as a fraction of a
   validation pass over the selected proteins.

Errors pool every selected protein (a root-mean-square over their valid queries); "median" is over
heads (per layer) or over all layers and heads (one figure). FASTA proteins are cropped to --max-length
residues and framed as in training (<cls> residues <eos>).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from protein_performer.checkpoint import load_model, read_checkpoint, saved_run_settings
from protein_performer.config import PerformerConfig
from protein_performer.data import Alphabet
from protein_performer.data.alphabet import frame
from protein_performer.data.fasta import read_fasta
from protein_performer.data.masking import mask_for_mlm
from protein_performer.data.splits import SPLITS, SplitAssigner, SplitSpec, accession_hash
from protein_performer.fidelity import (
    AttentionFidelity,
    attention_fidelity,
    captured_attention_inputs,
    fidelity_of_records,
    variant_config,
)

# Rows of the variant table: a name and the attention config overrides that make it. Keys come from
# issue 21 (attention.features, attention.coupling, attention.exact_window); a row whose keys the
# installed PerformerConfig lacks is skipped with a note.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("plain (the checkpoint's settings)", {}),
    ("features=positive (FAVOR+'s)", {"features": "positive"}),
    ("exact_window=0 (no exact band)", {"exact_window": 0}),
    ("features=oprf", {"features": "oprf"}),
    ("coupling=simplex", {"coupling": "simplex"}),
    ("oprf + simplex", {"features": "oprf", "coupling": "simplex"}),
    ("exact_window=16", {"exact_window": 16}),
    ("exact_window=64", {"exact_window": 64}),
    ("oprf + exact_window=64", {"features": "oprf", "exact_window": 64}),
]
FEATURE_COUNTS = (64, 128, 256, 512, 1024)


def held_out_proteins(fasta: str, checkpoint: str, split: str, count: int, max_length: int) -> list[str]:
    """Up to `count` sequences of `fasta` in `split` of the checkpoint's run ('all': every record)."""
    spec = None
    if split != "all":
        data = saved_run_settings(read_checkpoint(checkpoint)[1]).get("data", {})
        spec = SplitSpec(valid_fraction=data.get("valid_fraction", 0.01), test_fraction=data.get("test_fraction", 0.01))
    assigner = SplitAssigner(spec) if spec is not None else None
    chosen = []
    for record in read_fasta(fasta):
        if assigner is not None:
            code = assigner.assign(np.array([accession_hash(record.accession.encode())], dtype=np.uint64))[0]
            if SPLITS[code] != split:
                continue
        if record.sequence:
            chosen.append(record.sequence[:max_length])
        if len(chosen) == count:
            break
    if not chosen:
        raise SystemExit(f"{fasta}: no protein in split {split!r}")
    return chosen


Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids [B, L], padding_mask [B, L]


def batches(alphabet: Alphabet, sequences: Sequence[str], tokens_per_batch: int) -> list[Batch]:
    """(input_ids, padding_mask) batches of similar lengths, about tokens_per_batch tokens each."""
    encoded = sorted((alphabet.encode(s).astype(np.int64) for s in sequences), key=len)
    out, current = [], []
    for tokens in encoded:
        if current and (len(current) + 1) * (len(tokens) + 2) > tokens_per_batch:
            out.append(current)
            current = []
        current.append(tokens)
    out.append(current)
    framed = []
    for group in out:
        take = np.array([len(t) for t in group])
        ids = torch.from_numpy(frame(alphabet, np.concatenate(group), np.cumsum(take) - take, take))
        framed.append((ids, ids == alphabet.pad_idx))
    return framed


def masked(alphabet: Alphabet, data: list[Batch]) -> list[Batch]:
    """The same batches MLM-masked (15%: 80% <mask>, 10% random, 10% kept), as validation sees them."""
    rng = np.random.default_rng(0)
    return [(torch.from_numpy(mask_for_mlm(ids.numpy(), alphabet, rng)[0]), padding) for ids, padding in data]


def measure(model, data, **options: Any) -> AttentionFidelity:
    total = None
    for ids, padding in data:
        report = attention_fidelity(model, ids, padding, **options)
        total = report if total is None else total + report
    assert total is not None
    return total


def fresh_draws(model, data, draws: int, **options: Any) -> AttentionFidelity:
    """Pooled over `draws` fresh projections (seeds 0 .. draws - 1)."""
    total = None
    for seed in range(draws):
        report = measure(model, data, seed=seed, entropy=False, **options)
        total = report if total is None else total + report
    assert total is not None
    return total


def unknown_keys(overrides: Mapping[str, Any]) -> list[str]:
    known = {f.name for f in dataclasses.fields(PerformerConfig)}
    return sorted(set(overrides) - known)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def uniform_entropy(sequences: Sequence[str], causal: bool) -> float:
    """Mean row entropy of uniform attention over the keys each query sees (<cls>, <eos> included)."""
    rows = [np.log(np.arange(1, len(s) + 3)) if causal else np.full(len(s) + 2, np.log(len(s) + 2))
            for s in sequences]
    return float(np.concatenate(rows).mean())


def overall(values: torch.Tensor) -> float:
    return float(values.flatten().median())


def validation_cost(model, data) -> tuple[float, float]:
    """(seconds of a validation pass over `data`, seconds the fidelity logging adds to it).

    As ProteinLM validates: the first batch's forward records q, k, v (captured_attention_inputs) and
    fidelity_of_records measures them in float32, without the entropy.
    """
    with torch.no_grad():
        start = time.perf_counter()
        for ids, padding in data:
            logits = model(ids, padding).logits
            F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="sum")
        validation = time.perf_counter() - start
        with captured_attention_inputs(model) as records:
            model(*data[0])
        start = time.perf_counter()
        fidelity_of_records(records, entropy=False, dtype=torch.float32)
        logging = time.perf_counter() - start
    return validation, logging


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt written by protein_performer.train, or its run directory")
    parser.add_argument("fasta", help="proteins to measure on (FASTA, .gz ok)")
    parser.add_argument("--split", default="valid", choices=["valid", "test", "all"],
                        help="which of the FASTA's proteins: the run's held-out split (default valid) or all")
    parser.add_argument("--proteins", type=int, default=64, help="how many proteins (default 64)")
    parser.add_argument("--max-length", type=int, default=512, help="crop proteins to this many residues")
    parser.add_argument("--tokens-per-batch", type=int, default=8192)
    parser.add_argument("--features", type=int, nargs="+", default=list(FEATURE_COUNTS), help="m values to compare")
    parser.add_argument("--draws", type=int, default=3, help="fresh projections pooled per m and variant")
    parser.add_argument("--output", help="also write the report (Markdown) here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    model, alphabet = load_model(args.checkpoint)
    config = model.config
    sequences = held_out_proteins(args.fasta, args.checkpoint, args.split, args.proteins, args.max_length)
    data = batches(alphabet, sequences, args.tokens_per_batch)
    residues = sum(len(s) for s in sequences)
    sections = [
        f"# Attention fidelity: {args.checkpoint}",
        f"{config.attention} ({'causal' if config.causal else 'bidirectional'}), {config.n_layers} layers x "
        f"{config.n_heads} heads, head_dim {config.head_dim}, m = {config.nb_features}; {len(sequences)} proteins "
        f"({residues:,} residues, cropped to {args.max_length}) of {args.fasta} (split {args.split}); "
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s).",
    ]

    own = measure(model, data)
    rows = [[layer, head, f"{own.error[layer, head]:.4f}", f"{own.u_bar[layer, head]:.3f}",
             f"{own.entropy[layer, head]:.3f}"]
            for layer in range(config.n_layers) for head in range(config.n_heads)]
    sections += ["## By layer and head (the checkpoint's projections, unmasked proteins)",
                 table(["layer", "head", "error", "u_bar", "entropy (nats)"], rows),
                 f"Median over layers and heads: error {overall(own.error):.4f}, u_bar {overall(own.u_bar):.3f}, "
                 f"entropy {overall(own.entropy):.3f} (uniform attention over each protein would give "
                 f"{uniform_entropy(sequences, config.causal):.3f})."]

    mlm = measure(model, masked(alphabet, data), entropy=False)
    plain, hidden = own.per_layer(), mlm.per_layer()
    rows = [[layer, f"{plain['error'][layer]:.4f}", f"{hidden['error'][layer]:.4f}",
             f"{hidden['error'][layer] / plain['error'][layer]:.3f}", f"{plain['u_bar'][layer]:.3f}",
             f"{hidden['u_bar'][layer]:.3f}"] for layer in range(config.n_layers)]
    sections += ["## Unmasked vs MLM-masked inputs (median over heads; validation logs the masked kind)",
                 table(["layer", "error unmasked", "error masked", "masked / unmasked", "u_bar unmasked",
                        "u_bar masked"], rows)]

    if config.attention_kind.random_features:
        baseline = fresh_draws(model, data, args.draws, nb_features=config.nb_features)
        rows = []
        for m in args.features:
            report = baseline if m == config.nb_features else fresh_draws(model, data, args.draws, nb_features=m)
            per_layer = report.per_layer()["error"]
            rows.append([m, f"{overall(report.error):.4f}", f"{overall(report.error) / overall(baseline.error):.3f}",
                         " / ".join(f"{e:.3f}" for e in per_layer)])
        sections += [f"## By number of features m ({args.draws} fresh draws pooled; ratio to m = {config.nb_features})",
                     table(["m", "median error", f"ratio to m={config.nb_features}", "per layer (median over heads)"],
                           rows)]

        plain_variant = baseline  # the same config and seeds
        rows, notes = [], []
        for name, overrides in VARIANTS:
            missing = unknown_keys(overrides)
            if missing:
                notes.append(f"- skipped {name}: this version's config has no {', '.join(missing)}")
                continue
            try:
                variant_config(config, overrides=overrides)
            except ValueError as error:
                notes.append(f"- skipped {name}: {error}")
                continue
            start = time.perf_counter()
            report = plain_variant if not overrides else fresh_draws(model, data, args.draws, overrides=overrides)
            seconds = time.perf_counter() - start
            error = overall(report.error)
            rows.append([name, f"{error:.4f}", f"{error / overall(plain_variant.error):.3f}",
                         " / ".join(f"{e:.3f}" for e in report.per_layer()["error"]),
                         f"{seconds:.1f}" if overrides else "-"])
        sections += [f"## By feature variant (m = {config.nb_features}, {args.draws} fresh draws pooled, same seeds)",
                     table(["variant", "median error", "ratio to plain", "per layer", "measure time (s)"], rows)]
        if notes:
            sections.append("\n".join(notes))

    validation, logging = validation_cost(model, masked(alphabet, data))
    sections += ["## Cost of the validation logging (log_attention_fidelity)",
                 table(["what", "seconds", "ratio to the validation", "ratio to one validation batch"],
                       [[f"validation over {len(data)} batches ({len(sequences)} proteins)", f"{validation:.2f}",
                         "1.000", f"{len(data):.3f}"],
                        ["+ fidelity of its first batch", f"{logging:.2f}", f"{logging / validation:.3f}",
                         f"{logging / validation * len(data):.3f}"]]),
                 "A validation of N batches pays the last column's ratio / N (the logging measures one batch)."]

    report = "\n\n".join(sections) + "\n"
    print(report, end="")
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(report)


if __name__ == "__main__":
    main()
