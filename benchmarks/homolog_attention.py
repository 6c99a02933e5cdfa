"""Where do later members of a homolog window look? Aligned lift of every layer and head, softmax and FAVOR+.

    python benchmarks/homolog_attention.py CKPT CLUSTERS.tsv FASTA[.gz] [--window 1024] [--clusters 100] [--features 256]

For each held-out cluster (CLUSTERS.tsv: representative TAB member, members in file order; FASTA holds
them) the homolog window <cls> m1 <eos> m2 <eos> ... is built as data.sampling=homologs builds it, and the
attention maps of the checkpoint are measured with protein_performer.homologs: for every residue of a later
member aligned (BLOSUM62, global with free end gaps) to a residue of an earlier member, the weight on that
residue against chance (its mean weight per residue of the earlier member). Lift = aligned / chance is a
ratio to that baseline, measured on the same maps; "over same amino acid" is aligned / the mean weight on
the earlier member's other residues of the aligned residue's amino acid (> 1: the head finds the aligned
position, not just the same letter). Both kinds use the same weights: the checkpoint's own
attention (softmax or favor) and the other swapped in (`with_attention`; FAVOR+ with --features random
features). Windows are pooled, weighting each by its aligned pairs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from protein_performer.checkpoint import load_model
from protein_performer.homologs import (
    HomologAttention,
    aligned_attention,
    homolog_window,
    mask_later_members,
    member_aligner,
    member_alignments,
    read_cluster_members,
    read_sequences,
    with_attention,
)
from protein_performer.maps import attention_maps_of_tokens

KINDS = ("softmax", "favor")


def measure(models: dict, alphabet, members: list[str], window_length: int, aligner,
            mask_rate: float = 0.0, rng: np.random.Generator | None = None) -> dict[str, HomologAttention]:
    """One cluster's statistics for each model, on one window and one set of alignments.

    mask_rate > 0: that share of each later member's residues is replaced by <mask> (drawn from `rng`), and
    only those residues are queries: where a masked LM has to look for what it cannot see."""
    window = homolog_window(alphabet, members, window_length)
    tokens, masked = (window.tokens, None) if mask_rate == 0 else mask_later_members(alphabet, window, mask_rate, rng)
    alignments = member_alignments(window, aligner, masked)
    return {kind: aligned_attention(attention_maps_of_tokens(model, tokens), window, alignments)
            for kind, model in models.items()}


def table(pooled: dict[str, HomologAttention], labels: dict[str, str]) -> str:
    lines = ["| layer | head | " + " | ".join(f"{labels[kind]} lift | over same amino acid | top1 | earlier share"
                                            for kind in KINDS) + " | favor / softmax aligned |",
             "|---:|---:|" + "---:|---:|---:|---:|" * len(KINDS) + "---:|"]
    layers, heads = pooled["softmax"].aligned.shape
    for layer in range(layers):
        for head in range(heads):
            cells = []
            for kind in KINDS:
                result = pooled[kind]
                cells += [f"{result.lift[layer, head]:.2f}", f"{result.lift_over_same_letter[layer, head]:.2f}",
                          f"{result.top1[layer, head]:.3f}",
                          f"{result.earlier_share[layer, head]:.3f}"]
            ratio = pooled["favor"].aligned[layer, head] / pooled["softmax"].aligned[layer, head]
            lines.append(f"| {layer + 1} | {head} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a softmax or favor .ckpt, or an exported model directory")
    parser.add_argument("clusters", help="held-out clusters: representative TAB member (MMseqs2 TSV)")
    parser.add_argument("fasta", help="FASTA (plain or .gz) holding the members")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    parser.add_argument("--clusters", dest="max_clusters", type=int, default=100,
                        help="clusters measured, in file order, among those whose window holds 2+ members (default 100)")
    parser.add_argument("--features", type=int, default=256, help="FAVOR+ random features when swapped in (default 256)")
    parser.add_argument("--mask", type=float, default=0.0,
                        help="replace this share of each later member's residues by <mask> and measure only those "
                             "queries (a masked LM's heads may look for homologs only where they cannot see; default 0)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.mask < 1.0:
        parser.error(f"--mask must be in [0, 1), got {args.mask}")
    rng = np.random.default_rng(0)

    model, alphabet = load_model(args.checkpoint)
    kind = model.config.attention
    if kind not in KINDS:
        parser.error(f"the checkpoint's attention is {kind}; this benchmark compares softmax and favor")
    models = {kind: model}
    if kind == "softmax":
        models["favor"] = with_attention(model, attention="favor", nb_features=args.features)
    else:
        models["softmax"] = with_attention(model, attention="softmax")
    labels = {name: name if name == kind else f"{name} (swapped)" for name in KINDS}
    clusters = read_cluster_members(args.clusters)
    sequences = read_sequences(args.fasta, {member for members in clusters.values() for member in members})
    aligner = member_aligner()
    results: dict[str, list[HomologAttention]] = {name: [] for name in KINDS}
    windows = members_measured = 0
    start = time.perf_counter()
    for accessions in clusters.values():
        if windows == args.max_clusters:
            break
        members = [sequences[accession] for accession in accessions if accession in sequences]
        try:
            measured = measure(models, alphabet, members, args.window, aligner, args.mask, rng)
        except ValueError:  # fewer than two members inside the window: nothing to read
            continue
        for name in KINDS:
            results[name].append(measured[name])
        windows += 1
        members_measured += len(members)
    if not windows:
        parser.error(f"no cluster of {args.clusters} puts two members in a window of {args.window} tokens")
    pooled = {name: HomologAttention.pooled(results[name]) for name in KINDS}
    config = models["favor"].config
    print(f"checkpoint {args.checkpoint} (trained with {kind}); {windows} windows of <= {args.window} tokens, "
          f"{pooled['softmax'].aligned_pairs} aligned (later residue, earlier member) pairs"
          f"{f', queries: the {args.mask:.0%} of later residues shown as <mask>' if args.mask else ''}; FAVOR+ m = "
          f"{config.nb_features} ({config.features} features); {time.perf_counter() - start:.0f} s")
    print()
    print(table(pooled, labels))
    print()
    for name in KINDS:
        lift = pooled[name].lift
        best = divmod(int(lift.argmax()), lift.shape[1])
        print(f"{labels[name]}: highest lift {lift.max():.2f} (layer {best[0] + 1}, head {best[1]}; over same "
              f"amino acid {pooled[name].lift_over_same_letter[best]:.2f}), median over heads "
              f"{float(torch.as_tensor(lift).median()):.2f}")


if __name__ == "__main__":
    main()
