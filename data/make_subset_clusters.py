"""Rebuild data/swissprot_subset.clusters50.tsv.gz (and clusters90): the bundled subset's MMseqs2 clusters.

    python data/make_subset_clusters.py data/swissprot_subset.fasta.gz CLUSTERS.tsv.gz data/swissprot_subset.clusters50.tsv.gz

Keeps the lines (representative TAB member) of the full set's cluster file whose member is in the
subset, in their order; a representative outside the subset still names its cluster. Gzip level 9 with
a fixed mtime: the output is byte-reproducible. Prints how many clusters have several members.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import os
import sys

from Bio.SeqIO.FastaIO import SimpleFastaParser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("subset", help="the subset FASTA (make_swissprot_subset.py's output)")
    parser.add_argument("clusters", help="the full set's cluster TSV (representative TAB member)")
    parser.add_argument("output")
    args = parser.parse_args(argv)

    with gzip.open(args.subset, "rt") as handle:
        members = {title.split("|")[1] if title.count("|") >= 2 else title.split()[0]
                   for title, _ in SimpleFastaParser(handle)}
    lines = []
    sizes: collections.Counter[str] = collections.Counter()
    with gzip.open(args.clusters, "rt") as handle:
        for line in handle:
            representative, member = line.rstrip("\n").split("\t")
            if member in members:
                lines.append(line if line.endswith("\n") else line + "\n")
                sizes[representative] += 1
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as out:
        out.write("".join(lines).encode())
    os.replace(tmp, args.output)
    multi = [size for size in sizes.values() if size >= 2]
    print(f"{len(lines):,} of {len(members):,} subset records in {len(sizes):,} clusters; {len(multi):,} clusters "
          f"with >= 2 members ({sum(multi):,} records), {sum(s >= 5 for s in multi):,} with >= 5, largest "
          f"{max(multi, default=0)} -> {args.output} ({os.path.getsize(args.output):,} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
