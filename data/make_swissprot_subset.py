"""Rebuild data/swissprot_subset.fasta.gz, the bundled Swiss-Prot subset of the demo and the tests.

    python data/make_swissprot_subset.py SWISSPROT.fasta.gz data/swissprot_subset.fasta.gz [--per-mille 165]

A record is kept when a salted hash of its accession falls below the chosen fraction, so the subset
does not depend on file order and is independent of the hash that assigns train/valid/test splits.
Sequences are written on one line each (gzip level 9, fixed mtime: the output is byte-reproducible).
The development copy of the source file lives outside the repository; nothing reads it at run time.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import sys

from Bio.SeqIO.FastaIO import SimpleFastaParser

SALT = b"protein-performer-demo-subset:"


def keep(accession: str, per_mille: int) -> bool:
    digest = hashlib.blake2b(SALT + accession.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1000 < per_mille


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("source")
    parser.add_argument("output")
    parser.add_argument("--per-mille", type=int, default=165, help="records kept per thousand (default 165)")
    args = parser.parse_args(argv)

    kept = residues = 0
    buffer = io.StringIO()
    opener = gzip.open if args.source.endswith(".gz") else open
    with opener(args.source, "rt") as handle:
        for title, sequence in SimpleFastaParser(handle):
            fields = title.split("|")
            accession = fields[1] if len(fields) > 2 else title.split()[0]
            if keep(accession, args.per_mille):
                buffer.write(f">{title}\n{sequence}\n")
                kept += 1
                residues += len(sequence)
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0,
                                               filename="") as out:
        out.write(buffer.getvalue().encode())
    os.replace(tmp, args.output)
    print(f"{kept:,} records, {residues:,} residues -> {args.output} ({os.path.getsize(args.output):,} bytes)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
