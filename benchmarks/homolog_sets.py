"""Cluster-ordered training FASTA + held-out clusters for benchmarks/homolog_reading.py (issue 20 item 5).

python benchmarks/homolog_sets.py IDENT DATA_DIR  (DATA_DIR holds swissprot_2014_01_dev.fasta.gz and its clusters TSVs)
"""
import gzip, hashlib, random, sys
from collections import defaultdict
from Bio.SeqIO.FastaIO import SimpleFastaParser

ident = sys.argv[1]  # 50 or 90
D = sys.argv[2]
seqs = {}
with gzip.open(f"{D}/swissprot_2014_01_dev.fasta.gz", "rt") as f:
    for h, s in SimpleFastaParser(f):
        seqs[h.split("|")[1]] = s
cl = defaultdict(list)
with gzip.open(f"{D}/swissprot_2014_01_dev.clusters{ident}.tsv.gz", "rt") as f:
    for line in f:
        r, m = line.split()
        cl[r].append(m)
multi = [r for r in cl if len(cl[r]) >= 2]
held = lambda r: int(hashlib.sha1(r.encode()).hexdigest(), 16) % 25 == 0
rng = random.Random(0)
train = [r for r in multi if not held(r)]
rng.shuffle(train)
n = 0
with open(f"train{ident}.fasta", "w") as out:
    for r in train:
        ms = cl[r][:]
        rng.shuffle(ms)
        for m in ms:
            out.write(f">sp|{m}|{m}\n{seqs[m]}\n"); n += 1
with open(f"eval{ident}.tsv", "w") as out:
    for r in multi:
        if held(r):
            for m in cl[r]:
                out.write(f"{r}\t{m}\n")
print(ident, "train clusters", len(train), "seqs", n, "held-out clusters", sum(held(r) for r in multi))
