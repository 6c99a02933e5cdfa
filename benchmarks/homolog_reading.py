"""Does a model read homologs? Masked-only perplexity of held-out clusters' members inside a homolog window
against the same members alone (same masked positions), beside amino-acid frequencies.

    python benchmarks/homolog_reading.py CKPT CLUSTERS.tsv FASTA[.gz] [WINDOW] [MAX_CLUSTERS]

CLUSTERS.tsv: representative TAB member lines of held-out clusters (MMseqs2 format); FASTA holds them.
Windows: <cls> m1 <eos> m2 <eos> ... (members in file order, whole), cut at WINDOW tokens. 15% of each
member's residues are replaced by <mask> (same positions in both conditions); NLL is scored only there.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict

import numpy as np
import torch

from protein_performer.checkpoint import load_model
from protein_performer.homologs import read_cluster_members, read_sequences

MASK_RATE = 0.15


def residue_frequencies(alphabet, sequences) -> np.ndarray:
    """Add-one smoothed frequencies of the evaluated members' own residues: a baseline that ignores context."""
    counts = np.zeros(len(alphabet), np.float64)
    for sequence in sequences:
        counts += np.bincount(alphabet.encode(sequence), minlength=len(alphabet))
    return (counts + 1) / (counts + 1).sum()


def masked_nll(model, tokens: torch.Tensor, scored: torch.Tensor, mask_idx: int) -> torch.Tensor:
    """NLL of tokens [T] at the `scored` positions (bool [T]), with those positions shown as <mask>."""
    masked = tokens.clone()
    masked[scored] = mask_idx
    log_probs = torch.log_softmax(model(masked[None]).logits[0].float(), -1)
    return -log_probs[scored].gather(1, tokens[scored][:, None]).squeeze(1)


class Totals:
    """NLL sums and counts by key ("window/first", "alone/later", ...)."""

    def __init__(self) -> None:
        self.sums: dict[str, list] = defaultdict(lambda: [0.0, 0])

    def add(self, key: str, nll: torch.Tensor) -> None:
        self.sums[key][0] += float(nll.sum())
        self.sums[key][1] += nll.numel()

    def perplexity(self, key: str) -> float:
        total, count = self.sums[key]
        return math.exp(total / max(count, 1))

    def count(self, key: str) -> int:
        return self.sums[key][1]


def score_cluster(model, alphabet, members: list[str], window_length: int, frequencies: np.ndarray,
                  rng: np.random.Generator, totals: Totals) -> None:
    """Score one cluster's window and each of its members alone, adding to `totals`."""
    cls_idx, eos_idx, mask_idx = alphabet.index("<cls>"), alphabet.index("<eos>"), alphabet.index("<mask>")
    member_tokens = [torch.as_tensor(alphabet.encode(sequence), dtype=torch.long) for sequence in members]
    masks = [torch.as_tensor(rng.random(len(tokens)) < MASK_RATE) for tokens in member_tokens]
    # The window and, for each token, its member (-1 for <cls>/<eos>) and residue index in the member.
    ids, owner, residue = [cls_idx], [-1], [-1]
    for member, tokens in enumerate(member_tokens):
        ids += tokens.tolist() + [eos_idx]
        owner += [member] * len(tokens) + [-1]
        residue += list(range(len(tokens))) + [-1]
    window = torch.tensor(ids[:window_length])
    owner = torch.tensor(owner[:window_length])
    residue = torch.tensor(residue[:window_length])
    scored = torch.zeros(len(window), dtype=torch.bool)
    for member in range(len(member_tokens)):
        here = owner == member
        if here.any():
            scored[torch.nonzero(here).squeeze(1)[masks[member][residue[here]]]] = True
    nll = masked_nll(model, window, scored, mask_idx)
    frequency_nll = -torch.log(torch.as_tensor(frequencies[window[scored].numpy()]))
    first = owner[scored] == 0
    totals.add("window/first", nll[first])
    totals.add("window/later", nll[~first])
    totals.add("freq/first", frequency_nll[first])
    totals.add("freq/later", frequency_nll[~first])
    # Each member alone, same masked positions (only the part inside the window).
    for member, tokens in enumerate(member_tokens):
        inside = int((owner == member).sum())
        if not inside:
            continue
        alone = torch.tensor([cls_idx] + tokens[:inside].tolist() + [eos_idx])[:window_length]
        alone_scored = torch.zeros(len(alone), dtype=torch.bool)
        alone_scored[1:inside + 1] = masks[member][:inside]
        totals.add("alone/first" if member == 0 else "alone/later", masked_nll(model, alone, alone_scored, mask_idx))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .ckpt or an exported model directory")
    parser.add_argument("clusters", help="held-out clusters: representative TAB member (MMseqs2 TSV)")
    parser.add_argument("fasta", help="FASTA (plain or .gz) holding the members")
    parser.add_argument("window", nargs="?", type=int, default=1024, help="tokens per window (default 1024)")
    parser.add_argument("max_clusters", nargs="?", type=int, default=300,
                        help="clusters scored, in file order (default 300)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, alphabet = load_model(args.checkpoint)
    model.eval()
    clusters = read_cluster_members(args.clusters)
    sequences = read_sequences(args.fasta, {member for members in clusters.values() for member in members})
    frequencies = residue_frequencies(alphabet, sequences.values())
    totals = Totals()
    with torch.no_grad():
        for accessions in list(clusters.values())[:args.max_clusters]:
            score_cluster(model, alphabet, [sequences[accession] for accession in accessions], args.window,
                          frequencies, rng, totals)
    print(f"ckpt {args.checkpoint}  clusters {min(args.max_clusters, len(clusters))}  L {args.window}")
    print("| targets | in window | alone | frequencies | window/alone | window/freq | n |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for group in ("first", "later"):
        window, alone, frequency = (totals.perplexity(f"{kind}/{group}") for kind in ("window", "alone", "freq"))
        print(f"| {group} members | {window:.3f} | {alone:.3f} | {frequency:.3f} | {window / alone:.3f} "
              f"| {window / frequency:.3f} | {totals.count('window/' + group)} |")


if __name__ == "__main__":
    main()
