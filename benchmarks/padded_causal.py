"""Padded causal softmax training step, before and after `is_causal` without a mask (issue 22, item 3).

    OMP_NUM_THREADS=1 python benchmarks/padded_causal.py

Setting B of benchmarks/compare.py in small: model=small with max_length 1024, causal LM, one batch of 8
rows cut at random lengths in [512, 1024] and right-padded (8,192 tokens, as B's token budget). Times a
full step (forward, loss, backward, clipping, AdamW) of softmax with the dense [B,1,L,L] mask it used
before (the registry's unmasked_right_padding switched off), softmax as trained now, and FAVOR+,
interleaved in one process, fastest of 4 after a warm-up. Prints a Markdown table with ratios to the
dense-mask softmax. Random residues: the step time does not depend on which residues they are.
"""
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from protein_performer.config import ATTENTION, config_from_hydra
from protein_performer.data import Alphabet
from protein_performer.training import ProteinLM

REPO = Path(__file__).resolve().parent.parent
torch.manual_seed(0)
a = Alphabet()
L, R = 1024, 8
rng = np.random.default_rng(0)
lengths = rng.integers(L // 2, L + 1, R)
ids = torch.full((R, L), a.pad_idx)
pad = torch.ones(R, L, dtype=torch.bool)
for i, n in enumerate(lengths):
    ids[i, :n] = torch.from_numpy(rng.integers(5, 25, n))
    pad[i, :n] = False
labels = torch.where(pad, torch.tensor(-100), ids.roll(-1, 1))
labels[:, -1] = -100
batch = {"input_ids": ids, "padding_mask": pad, "labels": labels}
model_cfg = OmegaConf.load(REPO / "conf" / "model" / "small.yaml")
model_cfg.max_length = L
mods = {}
for kind in ("softmax", "favor"):
    att = OmegaConf.create({"seed": 0, "attention": OmegaConf.load(REPO / "conf" / "attention" / f"{kind}.yaml")}).attention
    cfg = config_from_hydra(model_cfg, att, vocab_size=len(a), pad_idx=a.pad_idx, causal=True)
    m = ProteinLM(cfg.to_dict(), "clm", seed=0, alphabet_tokens=a.tokens)
    mods[kind] = (m, torch.optim.AdamW(m.parameters(), 1e-4))
orig = ATTENTION["softmax"]
def step(kind, masked):
    ATTENTION["softmax"] = dataclasses.replace(orig, unmasked_right_padding=not masked)
    m, opt = mods[kind]
    t = time.perf_counter()
    losses, _ = m.token_losses(batch)
    losses.sum().div(int((labels != -100).sum())).backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t
rows = {"softmax, dense mask (before)": ("softmax", True), "softmax, is_causal (after)": ("softmax", False), "favor": ("favor", False)}
best = {k: float("inf") for k in rows}
for kind_and_mask in rows.values():  # warm-up
    step(*kind_and_mask)
for _ in range(4):
    for k, v in rows.items():
        best[k] = min(best[k], step(*v))
tokens = int((~pad).sum())
base = best["softmax, dense mask (before)"]
print(f"real tokens per step {tokens} of {R*L}")
print("| path | fastest step s | real tokens/s | vs dense-mask softmax |\n|---|---:|---:|---:|")
for k, t in best.items():
    print(f"| {k} | {t:.3f} | {tokens/t:,.0f} | {base/t:.2f}x |")
