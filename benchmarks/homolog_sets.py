"""Cluster-ordered training FASTA + held-out clusters for benchmarks/homolog_reading.py (issue 20 item 5).

    python benchmarks/homolog_sets.py IDENTITY DATA_DIR

DATA_DIR holds swissprot_2014_01_dev.fasta.gz and its clusters TSVs (swissprot_2014_01_dev.clusters<IDENTITY>.tsv.gz).
Writes, in the current directory, train<IDENTITY>.fasta (the multi-member clusters not held out, in a
shuffled cluster order, each cluster's members consecutive in a shuffled order: concat windows then hold
consecutive homologs) and eval<IDENTITY>.tsv (the held-out clusters: 1 in 25 by a SHA-1 of the representative).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import random
from pathlib import Path

from Bio.SeqIO.FastaIO import SimpleFastaParser

from protein_performer.homologs import read_cluster_members

HELD_OUT_ONE_IN = 25


def is_held_out(representative: str) -> bool:
    return int(hashlib.sha1(representative.encode()).hexdigest(), 16) % HELD_OUT_ONE_IN == 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("identity", help="clustering identity in the file name: 50 or 90")
    parser.add_argument("data_dir", type=Path, help="directory of the development FASTA and its cluster TSVs")
    args = parser.parse_args(argv)

    with gzip.open(args.data_dir / "swissprot_2014_01_dev.fasta.gz", "rt") as fasta:
        sequences = {title.split("|")[1]: sequence for title, sequence in SimpleFastaParser(fasta)}
    clusters = read_cluster_members(args.data_dir / f"swissprot_2014_01_dev.clusters{args.identity}.tsv.gz")
    multi = [representative for representative in clusters if len(clusters[representative]) >= 2]
    rng = random.Random(0)
    train = [representative for representative in multi if not is_held_out(representative)]
    rng.shuffle(train)
    written = 0
    with open(f"train{args.identity}.fasta", "w") as out:
        for representative in train:
            members = clusters[representative][:]
            rng.shuffle(members)
            for member in members:
                out.write(f">sp|{member}|{member}\n{sequences[member]}\n")
                written += 1
    with open(f"eval{args.identity}.tsv", "w") as out:
        for representative in multi:
            if is_held_out(representative):
                for member in clusters[representative]:
                    out.write(f"{representative}\t{member}\n")
    print(args.identity, "train clusters", len(train), "seqs", written, "held-out clusters",
          sum(is_held_out(representative) for representative in multi))


if __name__ == "__main__":
    main()
