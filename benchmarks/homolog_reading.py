"""Does a model read homologs? Masked-only perplexity of held-out clusters' members inside a homolog window
against the same members alone (same masked positions), beside amino-acid frequencies.

python benchmarks/homolog_reading.py CKPT CLUSTERS.tsv FASTA[.gz] [L] [max_clusters]
CLUSTERS.tsv: representative TAB member lines of held-out clusters (MMseqs2 format); FASTA holds them.
Windows: <cls> m1 <eos> m2 <eos> ... (members in file order), cropped to L tokens. 15% of each member's
residues are replaced by <mask> (same positions in both conditions); NLL is scored only there.
"""
import gzip, math, sys
from collections import defaultdict
import numpy as np, torch
from Bio.SeqIO.FastaIO import SimpleFastaParser
from protein_performer.checkpoint import load_model

ckpt, tsv, fasta = sys.argv[1], sys.argv[2], sys.argv[3]
L = int(sys.argv[4]) if len(sys.argv) > 4 else 1024
maxc = int(sys.argv[5]) if len(sys.argv) > 5 else 300
torch.manual_seed(0); rng = np.random.default_rng(0)
model, al = load_model(ckpt); model.eval()
cls, eos, msk = al.index("<cls>"), al.index("<eos>"), al.index("<mask>")
cl = defaultdict(list)
for line in open(tsv):
    r, m = line.split(); cl[r].append(m)
want = {m for ms in cl.values() for m in ms}
seqs = {}
with (gzip.open(fasta, "rt") if fasta.endswith(".gz") else open(fasta)) as f:
    for h, s in SimpleFastaParser(f):
        a = h.split("|")[1]
        if a in want: seqs[a] = s
# frequencies of the evaluated members' own residues (add-one smoothed): a baseline that ignores context
counts = np.zeros(len(al), np.float64)
for s in seqs.values():
    counts += np.bincount(al.encode(s), minlength=len(al))
freq = (counts + 1) / (counts + 1).sum()
acc = defaultdict(lambda: [0.0, 0])  # key -> [nll sum, n]
def add(key, nll):
    acc[key][0] += float(nll.sum()); acc[key][1] += nll.numel()
with torch.no_grad():
    for ci, (r, ms) in enumerate(list(cl.items())[:maxc]):
        toks = [torch.as_tensor(al.encode(seqs[m]), dtype=torch.long) for m in ms]
        masks = [torch.as_tensor(rng.random(len(t)) < 0.15) for t in toks]
        # window
        parts, owner, pos = [torch.tensor([cls])], [-1], [-1]
        ids = [cls]; mem = [-1]; idx = [-1]
        for k, t in enumerate(toks):
            ids += t.tolist() + [eos]; mem += [k] * len(t) + [-1]; idx += list(range(len(t))) + [-1]
        ids, mem, idx = ids[:L], mem[:L], idx[:L]
        x = torch.tensor(ids); mem = torch.tensor(mem); idx = torch.tensor(idx)
        target = x.clone()
        sel = torch.zeros(len(x), dtype=torch.bool)
        for k in range(len(toks)):
            here = (mem == k)
            if here.any():
                m = masks[k][idx[here]]
                sel[torch.nonzero(here).squeeze(1)[m]] = True
        inp = x.clone(); inp[sel] = msk
        lp = torch.log_softmax(model(inp[None]).logits[0].float(), -1)
        nll = -lp[sel].gather(1, target[sel][:, None]).squeeze(1)
        fnll = -torch.log(torch.as_tensor(freq[target[sel].numpy()]))
        first = mem[sel] == 0
        add("window/first", nll[first]); add("window/later", nll[~first])
        add("freq/first", fnll[first]); add("freq/later", fnll[~first])
        # each member alone, same masked positions (only the part inside the window)
        for k, t in enumerate(toks):
            here = (mem == k)
            if not here.any(): continue
            n = int(here.sum())
            a = torch.tensor([cls] + t[:n].tolist() + [eos])[: L]
            s = torch.zeros(len(a), dtype=torch.bool); s[1:n + 1] = masks[k][:n]
            ai = a.clone(); ai[s] = msk
            lp = torch.log_softmax(model(ai[None]).logits[0].float(), -1)
            nl = -lp[s].gather(1, a[s][:, None]).squeeze(1)
            add("alone/first" if k == 0 else "alone/later", nl)
ppl = lambda k: math.exp(acc[k][0] / max(acc[k][1], 1))
print(f"ckpt {ckpt}  clusters {min(maxc, len(cl))}  L {L}")
print("| targets | in window | alone | frequencies | window/alone | window/freq | n |")
print("|---|---:|---:|---:|---:|---:|---:|")
for g in ("first", "later"):
    w, a, f = ppl("window/" + g), ppl("alone/" + g), ppl("freq/" + g)
    print(f"| {g} members | {w:.3f} | {a:.3f} | {f:.3f} | {w/a:.3f} | {w/f:.3f} | {acc['window/'+g][1]} |")
