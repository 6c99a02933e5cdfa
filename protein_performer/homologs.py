"""Does a model read homologs? Where later members of a homolog window look in earlier ones.

A homolog window is what ``data.sampling=homologs`` trains on: ``<cls> m1 <eos> m2 <eos> ...``, members of
one cluster (:func:`homolog_window` builds it with the sampler's own code). A model that reads homologs
lets a residue of a later member attend to the residue it aligns with in an earlier member, the way
PoET-style models copy from their context. :func:`homolog_attention` measures that for every layer and
head of a model, on its attention maps (exact for softmax, the matrix FAVOR+'s random features imply
for FAVOR+; see :func:`protein_performer.maps.attention_maps_of_tokens`):

- aligned: the mean attention weight from a later member's residue onto its aligned residue in an
  earlier member (pairs from a pairwise alignment, :func:`align_members`);
- chance: for the same residues, their mean weight per residue of that earlier member (the mass they
  put on the earlier member divided by its length): what a head that spreads its attention over the
  earlier member without regard to alignment would give the aligned residue;
- lift = aligned / chance: 1 = no preference for the aligned residue; a head that looks only at the
  aligned residue gets the earlier member's length;
- same_letter: for the same residues, their mean weight per *other* residue of the earlier member
  that carries the aligned residue's amino acid (pairs whose earlier member has no other such residue
  are left out of this mean): a head that looks for the same amino acid anywhere, rather than for the
  aligned position, gives these as much as the aligned residue. lift_over_same_letter = aligned /
  same_letter (both over those pairs) separates the two; between near-identical homologs the aligned
  residue is usually the same amino acid, so a lift alone does not show alignment;
- top1: the share of those residues whose largest weight in the earlier member is the aligned residue
  (chance about 1 / length);
- earlier_share: the attention mass of a later member's residues that lands on residues of earlier
  members (the rest goes to its own member, later members and the <cls>/<eos> tokens).

Alignments: Biopython's PairwiseAligner, global with free end gaps (a member cropped by the window, or
one longer at either end, costs nothing there), BLOSUM62, gap open -11 and extend -1 (BLAST's protein
defaults). Non-standard letters are aligned as X.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from protein_performer.data import SPLITS, Alphabet, SplitSpec, accession_hash, read_fasta
from protein_performer.data.fasta import GZIP, GZIP_MAGIC
from protein_performer.data.sampling import Clusters, homolog_segment, segment_lengths
from protein_performer.data.splits import SplitAssigner
from protein_performer.config import ATTENTION, FEATURE_OPTIONS
from protein_performer.fidelity import variant_config
from protein_performer.maps import attention_maps_of_tokens
from protein_performer.model import ProteinPerformer

__all__ = [
    "HomologAttention",
    "HomologWindow",
    "align_members",
    "aligned_attention",
    "aligned_offset_profile",
    "cluster_split",
    "homolog_attention",
    "homolog_window",
    "mask_later_members",
    "member_aligner",
    "member_alignments",
    "read_cluster_members",
    "read_sequences",
    "with_attention",
]

# BLAST's protein defaults with BLOSUM62.
GAP_OPEN = -11.0
GAP_EXTEND = -1.0


@dataclass(frozen=True)
class HomologWindow:
    """One homolog window and where its members sit in it.

    Attributes:
        tokens: int64 [T]: <cls> m1 <eos> m2 <eos> ..., as the homolog sampler builds it.
        members: each member's residues inside the window (one-letter codes; cropped as the sampler
            crops, and a member cut by the window's end is only its first part). Members wholly past
            the end are left out.
        starts: int64 [n]: the window position of each member's first residue.
    """

    tokens: Tensor
    members: list[str]
    starts: np.ndarray

    def positions(self, member: int) -> np.ndarray:
        """Window positions of `member`'s residues, int64 [len(members[member])]."""
        return self.starts[member] + np.arange(len(self.members[member]))


def homolog_window(alphabet: Alphabet, sequences: Sequence[str], max_length: int) -> HomologWindow:
    """The window ``data.sampling=homologs`` makes of one cluster whose members come in this order.

    Each member is cropped to its first max_length - 2 residues (evaluation crops at the start), and
    the window is cut at max_length tokens (sampling.homolog_segment, segment_lengths).
    Raises ValueError for fewer than two members, or when the window holds only the first.
    """
    if len(sequences) < 2:
        raise ValueError(f"a homolog window needs at least two member sequences, got {len(sequences)}")
    encoded = [alphabet.encode(sequence) for sequence in sequences]
    lengths = np.array([len(tokens) for tokens in encoded], dtype=np.int64)
    one_cluster = Clusters.from_keys(np.zeros(len(encoded), dtype=np.int64))
    length = int(segment_lengths(one_cluster, lengths, max_length)[0])
    tokens = homolog_segment(encoded, length, alphabet.cls_idx, alphabet.eos_idx, max_length, rng=None)
    letters = [token if len(token) == 1 else "X" for token in alphabet.tokens]  # <unk> aligns as X
    members, starts = [], []
    start = 1  # after <cls>
    for residues in encoded:
        inside = min(len(residues), max_length - 2, length - start)
        if inside <= 0:
            break
        members.append("".join(letters[token] for token in residues[:inside].tolist()))
        starts.append(start)
        start += min(len(residues), max_length - 2) + 1  # residues and their <eos>
    if len(members) < 2:
        raise ValueError(f"a window of {max_length} tokens holds only the first member ({len(sequences[0])} "
                         "residues); pass a larger max_length or shorter members")
    return HomologWindow(torch.from_numpy(tokens), members, np.array(starts, dtype=np.int64))


def member_aligner():
    """The PairwiseAligner used for members: global, free end gaps, BLOSUM62, gaps -11 / -1."""
    from Bio.Align import PairwiseAligner, substitution_matrices

    aligner = PairwiseAligner()
    aligner.mode = "global"
    aligner.substitution_matrix = substitution_matrices.load("BLOSUM62")
    aligner.open_gap_score = GAP_OPEN
    aligner.extend_gap_score = GAP_EXTEND
    aligner.end_gap_score = 0.0  # a member cropped by the window, or longer at an end, costs nothing there
    return aligner


def align_members(later: str, earlier: str, aligner=None) -> np.ndarray:
    """Aligned residue pairs of two members, int64 [n, 2]: (index in `later`, index in `earlier`),
    from one optimal alignment (gapped positions have no pair)."""
    aligner = aligner or member_aligner()
    letters = set(aligner.substitution_matrix.alphabet)
    clean = ["".join(letter if letter in letters else "X" for letter in sequence) for sequence in (later, earlier)]
    alignment = aligner.align(clean[0], clean[1])[0]
    pairs = [np.stack([np.arange(later_start, later_end), np.arange(earlier_start, earlier_end)], axis=1)
             for (later_start, later_end), (earlier_start, earlier_end) in zip(*alignment.aligned)]
    return np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), dtype=np.int64)


@dataclass
class HomologAttention:
    """Per layer and head, float64 [layers, heads] (see the module docstring)."""

    aligned: np.ndarray
    chance: np.ndarray
    top1: np.ndarray
    earlier_share: np.ndarray
    same_letter: np.ndarray
    aligned_where_same: np.ndarray  # aligned, over the same_letter pairs only
    aligned_pairs: int  # (later residue, earlier member) pairs the means run over
    later_residues: int  # residues of later members (earlier_share's count)
    same_letter_pairs: int  # aligned pairs whose earlier member has another residue of the same amino acid
    alignments: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (later, earlier) -> pairs

    @property
    def lift(self) -> np.ndarray:
        """aligned / chance, [layers, heads]."""
        return self.aligned / np.maximum(self.chance, 1e-300)

    @property
    def lift_over_same_letter(self) -> np.ndarray:
        """aligned / same_letter over the pairs whose earlier member has other residues of the aligned amino
        acid, [layers, heads]."""
        with np.errstate(divide="ignore", invalid="ignore"):  # no same-letter weight: inf (or nan for 0 / 0)
            return self.aligned_where_same / self.same_letter

    @classmethod
    def pooled(cls, results: Sequence[HomologAttention]) -> HomologAttention:
        """Several windows as one: means weighted by their aligned pairs (earlier_share: by later residues).
        The alignments are not kept."""
        if not results:
            raise ValueError("pooled needs at least one HomologAttention")
        pairs = sum(result.aligned_pairs for result in results)
        residues = sum(result.later_residues for result in results)

        def by_pairs(name: str) -> np.ndarray:
            return sum(getattr(result, name) * result.aligned_pairs for result in results) / pairs

        share = sum(result.earlier_share * result.later_residues for result in results) / residues
        same_pairs = sum(result.same_letter_pairs for result in results)
        same, aligned_where_same = (sum(getattr(result, name) * result.same_letter_pairs for result in results)
                                    / max(same_pairs, 1) for name in ("same_letter", "aligned_where_same"))
        return cls(aligned=by_pairs("aligned"), chance=by_pairs("chance"), top1=by_pairs("top1"),
                   earlier_share=share, same_letter=same, aligned_where_same=aligned_where_same,
                   aligned_pairs=pairs, later_residues=residues, same_letter_pairs=same_pairs)

    def to_markdown(self, title: str = "") -> str:
        """A Markdown table: one row per layer/head."""
        lines = [f"{title}\n" if title else "",
                 "| layer | head | aligned | chance | lift | same amino acid | lift over same | top1 | earlier share |",
                 "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        layers, heads = self.aligned.shape
        for layer in range(layers):
            for head in range(heads):
                lines.append(f"| {layer + 1} | {head} | {self.aligned[layer, head]:.4f} "
                             f"| {self.chance[layer, head]:.4f} "
                             f"| {self.lift[layer, head]:.2f} | {self.same_letter[layer, head]:.4f} "
                             f"| {self.lift_over_same_letter[layer, head]:.2f} | {self.top1[layer, head]:.3f} "
                             f"| {self.earlier_share[layer, head]:.3f} |")
        return "\n".join(line for line in lines if line)


def aligned_attention(maps: Tensor, window: HomologWindow,
                      alignments: Mapping[tuple[int, int], np.ndarray] | None = None) -> HomologAttention:
    """The statistics of :class:`HomologAttention` from given maps of a window.

    Args:
        maps: [layers, heads, T, T] attention over the window's tokens (row = query).
        window: the window the maps are of.
        alignments: (later, earlier) member indices -> aligned pairs from :func:`align_members`;
            computed when None.
    """
    count = len(window.members)
    if maps.dim() != 4 or maps.shape[-1] != maps.shape[-2] or maps.shape[-1] != len(window.tokens):
        raise ValueError(f"maps must be [layers, heads, {len(window.tokens)}, {len(window.tokens)}] for this window, "
                         f"got {tuple(maps.shape)}")
    if alignments is None:
        alignments = member_alignments(window)
    maps = maps.double()
    shape = maps.shape[:2]
    aligned, chance, top1, share, same, aligned_where_same = (torch.zeros(shape, dtype=torch.float64) for _ in range(6))
    pairs = later_residues = same_pairs = 0
    codes = [torch.tensor([ord(letter) for letter in member]) for member in window.members]
    for later in range(1, count):
        rows = torch.from_numpy(window.positions(later))
        earlier_columns = torch.from_numpy(np.concatenate([window.positions(before) for before in range(later)]))
        share += maps[:, :, rows][..., earlier_columns].sum(-1).sum(-1)  # (layers, heads)
        later_residues += len(rows)
        for earlier in range(later):
            pair = torch.from_numpy(alignments[(later, earlier)])
            if not len(pair):
                continue
            columns = torch.from_numpy(window.positions(earlier))
            block = maps[:, :, rows[pair[:, 0]]][..., columns]  # (layers, heads, n, len(earlier))
            onto_aligned = block.gather(-1, pair[:, 1].expand(*shape, -1)[..., None]).squeeze(-1)  # (layers, heads, n)
            aligned += onto_aligned.sum(-1)
            chance += block.mean(-1).sum(-1)
            top1 += (block.argmax(-1) == pair[:, 1]).double().sum(-1)
            pairs += len(pair)
            # Other residues of the earlier member with the aligned residue's amino acid.
            letters = codes[earlier]
            alike = letters[None, :] == letters[pair[:, 1]][:, None]  # (n, len(earlier))
            alike[torch.arange(len(pair)), pair[:, 1]] = False
            others = alike.sum(-1)  # (n,)
            has_others = others > 0
            per_pair = (block * alike).sum(-1) / others.clamp(min=1)  # (layers, heads, n)
            same += per_pair[..., has_others].sum(-1)
            aligned_where_same += onto_aligned[..., has_others].sum(-1)
            same_pairs += int(has_others.sum())
    if pairs == 0:
        raise ValueError("no residue of a later member aligns with an earlier one: are these homologs?")
    return HomologAttention(aligned=(aligned / pairs).numpy(), chance=(chance / pairs).numpy(),
                            top1=(top1 / pairs).numpy(), earlier_share=(share / later_residues).numpy(),
                            same_letter=(same / max(same_pairs, 1)).numpy(), same_letter_pairs=same_pairs,
                            aligned_where_same=(aligned_where_same / max(same_pairs, 1)).numpy(),
                            aligned_pairs=pairs, later_residues=later_residues, alignments=dict(alignments))


def aligned_offset_profile(maps: Tensor, window: HomologWindow, alignments: Mapping[tuple[int, int], np.ndarray],
                           max_offset: int = 10) -> np.ndarray:
    """Mean weight from a later member's residue onto the earlier member's residue `offset` places from
    the aligned one, for offset in -max_offset..max_offset: float64 [layers, heads, 2 * max_offset + 1].

    A head that reads the alignment peaks at offset 0; one that reads a neighbour of the aligned residue
    peaks beside it; a flat profile is no reading. Offsets falling outside the earlier member are skipped
    (each offset is the mean over the pairs where it exists).
    """
    offsets = np.arange(-max_offset, max_offset + 1)
    total = torch.zeros(*maps.shape[:2], len(offsets), dtype=torch.float64)
    counts = torch.zeros(len(offsets), dtype=torch.float64)
    for (later, earlier), pairs in alignments.items():
        if not len(pairs):
            continue
        rows = torch.from_numpy(window.positions(later)[pairs[:, 0]])  # (n,)
        targets = pairs[:, 1][:, None] + offsets[None, :]  # (n, offsets)
        inside = (targets >= 0) & (targets < len(window.members[earlier]))
        columns = torch.from_numpy(window.starts[earlier] + np.clip(targets, 0, len(window.members[earlier]) - 1))
        weights = maps.double()[:, :, rows[:, None], columns]  # (layers, heads, n, offsets)
        total += (weights * torch.from_numpy(inside)).sum(2)
        counts += torch.from_numpy(inside.sum(0)).double()
    return (total / counts.clamp(min=1)).numpy()


def member_alignments(window: HomologWindow, aligner=None,
                      masked: Mapping[int, np.ndarray] | None = None) -> dict[tuple[int, int], np.ndarray]:
    """Aligned residue pairs of every (later, earlier) pair of the window's members (:func:`align_members`);
    with `masked` (later member -> bool per residue, from :func:`mask_later_members`) only the pairs whose
    later residue is masked: the queries a masked LM has to answer from context."""
    aligner = aligner or member_aligner()
    alignments = {}
    for later in range(1, len(window.members)):
        for earlier in range(later):
            pairs = align_members(window.members[later], window.members[earlier], aligner)
            alignments[(later, earlier)] = pairs if masked is None else pairs[masked[later][pairs[:, 0]]]
    return alignments


def mask_later_members(alphabet: Alphabet, window: HomologWindow, mask_rate: float,
                       rng: np.random.Generator) -> tuple[Tensor, dict[int, np.ndarray]]:
    """The window's tokens with a `mask_rate` share of each later member's residues (drawn from `rng`)
    replaced by <mask>, and which (later member -> bool per residue). A masked LM's heads may look for a
    homolog only where they cannot see the residue: measure attention from these queries."""
    if not 0.0 <= mask_rate < 1.0:
        raise ValueError(f"mask_rate must be in [0, 1), got {mask_rate}")
    tokens = window.tokens.clone()
    masked = {}
    for later in range(1, len(window.members)):
        masked[later] = rng.random(len(window.members[later])) < mask_rate
        tokens[torch.as_tensor(window.starts[later] + np.flatnonzero(masked[later]))] = alphabet.mask_idx
    return tokens, masked


def homolog_attention(model: nn.Module, alphabet: Alphabet, sequences: Sequence[str],
                      max_length: int | None = None, *, mask_rate: float = 0.0,
                      seed: int = 0) -> tuple[HomologWindow, Tensor, HomologAttention]:
    """Window, maps and statistics of one cluster's members (in this order) for every layer and head.

    max_length: the window length (default: the model's max_length).
    mask_rate: > 0 replaces that share of each later member's residues by <mask> (drawn with `seed`, so
        every model given the same members and seed sees the same window) and measures only those
        queries (:func:`mask_later_members`); the maps are then of the masked window.
    Returns (window, maps float32 [layers, heads, T, T] over all window tokens, statistics).
    """
    window = homolog_window(alphabet, sequences, max_length or model.config.max_length)
    tokens, masked = (window.tokens, None) if mask_rate == 0 else mask_later_members(
        alphabet, window, mask_rate, np.random.default_rng(seed))
    maps = attention_maps_of_tokens(model, tokens)
    return window, maps, aligned_attention(maps, window, member_alignments(window, masked=masked))


def with_attention(model: ProteinPerformer, **overrides) -> ProteinPerformer:
    """A copy of `model` whose layers attend another way with the same weights, e.g.
    ``with_attention(model, attention="favor", nb_features=256)``: the FAVOR+ estimate of a softmax model's
    attention (a model never trained with FAVOR+). Random-feature projections are drawn from the config's
    feature_seed at step 0, as a new model's are. Overrides are PerformerConfig fields (unknown ones raise).
    """
    if "attention" in overrides:  # options the new kind does not take go back to their defaults
        honoured = ATTENTION[overrides["attention"]].feature_options
        overrides = {**{key: value for key, value in FEATURE_OPTIONS.items() if key not in honoured}, **overrides}
    swapped = ProteinPerformer(variant_config(model.config, overrides=overrides))
    own_buffers = {name for name, _ in swapped.named_buffers()} | {name for name, _ in model.named_buffers()}
    weights = {name: value for name, value in model.state_dict().items() if name not in own_buffers}
    missing, unexpected = swapped.load_state_dict(weights, strict=False)
    missing = [name for name in missing if name not in own_buffers]
    if missing or unexpected:
        raise ValueError(f"attention {overrides} needs weights the model lacks or drops some it has: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    reference = next(model.parameters())
    return swapped.to(device=reference.device, dtype=reference.dtype).train(model.training)


def read_cluster_members(path: str | Path) -> dict[str, list[str]]:
    """An MMseqs2 cluster TSV (representative TAB member; plain or .gz) -> {representative: members in file
    order}. Small files only (a dict of strings; training reads clusters with data.read_clusters)."""
    path = Path(path)
    with open(path, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    clusters: dict[str, list[str]] = {}
    with (GZIP.open(path, "rt") if compressed else open(path)) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            columns = line.split()
            if len(columns) != 2:
                raise ValueError(f"{path}:{number}: expected 'representative<TAB>member', got {line.strip()[:60]!r}")
            clusters.setdefault(columns[0], []).append(columns[1])
    return clusters


def cluster_split(representative: str, spec: SplitSpec) -> str:
    """The split ("train", "valid", "test") a cluster falls in when training with ``data.clusters``
    and these fractions: the hash of its representative decides, as in preprocessing."""
    code = SplitAssigner(spec).assign(np.array([accession_hash(representative.encode())], dtype=np.uint64))[0]
    return SPLITS[int(code)]


def read_sequences(path: str | Path, accessions: set[str]) -> dict[str, str]:
    """{accession: sequence} of the FASTA records with these accessions."""
    return {record.accession: record.sequence for record in read_fasta(path) if record.accession in accessions}
