"""How far apart, in position within their member, the aligned residues of homologs sit.

    python benchmarks/member_offsets.py CLUSTERS_TSV FASTA [--clusters 60] [--members 12]

`model.position_scope=member` numbers every member's residues 1, 2, ... and `attention.band_order=member`
weighs exactly the residues at nearby member positions of every member. Both pay when the aligned
residue of an earlier homolog sits at (nearly) the same member position. This script measures that:
each cluster's members (file order, at most --members) are aligned to the member before them
(protein_performer.homologs.align_members: global, free end gaps, BLOSUM62) and every aligned pair's
|position in later - position in earlier| is counted. Prints a Markdown table: the share of aligned
pairs at offset <= d.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from protein_performer.homologs import align_members, member_aligner, read_cluster_members, read_sequences

OFFSETS = (0, 1, 2, 5, 10, 20, 50)


def member_offsets(clusters: dict[str, list[str]], sequences: dict[str, str], max_clusters: int,
                   max_members: int, crop: int = 1000) -> tuple[np.ndarray, int]:
    """|offset| of every aligned pair of consecutive members, over the first `max_clusters` clusters with
    two or more members found in `sequences`; (offsets int64 [pairs], clusters used)."""
    aligner = member_aligner()
    found, used = [], 0
    for members in clusters.values():
        present = [sequences[m][:crop] for m in members if m in sequences][:max_members]
        if len(present) < 2:
            continue
        used += 1
        for later, earlier in zip(present[1:], present[:-1]):
            pairs = align_members(later, earlier, aligner)
            found.append(np.abs(pairs[:, 0] - pairs[:, 1]))
        if used == max_clusters:
            break
    return (np.concatenate(found) if found else np.zeros(0, dtype=np.int64)), used


def table(offsets: np.ndarray, used: int) -> str:
    lines = [f"Aligned residue pairs of consecutive members: {len(offsets):,} pairs in {used} clusters", "",
             "| offset <= | share of pairs |", "|---:|---:|"]
    lines += [f"| {d} | {(offsets <= d).mean():.3f} |" for d in OFFSETS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clusters", type=Path, help="MMseqs2 cluster TSV (representative TAB member)")
    parser.add_argument("fasta", type=Path, help="FASTA holding the members")
    parser.add_argument("--clusters", dest="max_clusters", type=int, default=60, help="clusters to align")
    parser.add_argument("--members", type=int, default=12, help="members per cluster, at most")
    args = parser.parse_args(argv)
    clusters = read_cluster_members(args.clusters)
    sequences = read_sequences(args.fasta, {m for members in clusters.values() for m in members})
    offsets, used = member_offsets(clusters, sequences, args.max_clusters, args.members)
    if not used:
        parser.error(f"no cluster of {args.clusters} has two members in {args.fasta}")
    print(table(offsets, used))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
