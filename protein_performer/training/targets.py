"""Target sets: which scored positions an evaluation metric (or a baseline) averages over.

A masked LM is trained on the BERT/ESM 80/10/10 recipe: of the chosen positions, 80% are shown as
<mask>, 10% as a random amino acid and 10% unchanged. Scoring all of them (`all`) flatters the model:
a position that shows its own residue can be copied. The honest figure scores only the positions
replaced by <mask> (`masked`), where the residue must be predicted from the context.

In homolog windows (data.sampling=homologs) a window holds clusters packed one after another, each
`<cls> m1 <eos> m2 <eos> m3 ...` (cropped at the window end). A target in the first member of its
cluster can use only its own sequence; a target in a later member can also read the earlier
homologs. Their perplexities apart (`masked_first` / `masked_later`; `first` / `later` over all
targets of a causal LM) measure what the model reads from homologs.

Each set is one row of TARGET_SETS: a function of (input_ids, labels, member index of each target)
that returns a bool mask [batch, length] of the targets in the set.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from protein_performer.data import IGNORE_INDEX, OBJECTIVES, Alphabet

__all__ = ["TARGET_SETS", "member_index", "target_member_index", "target_masks", "target_set_names"]


def member_index(tokens: Tensor, cls_id: int, eos_id: int) -> Tensor:
    """Which member of its cluster each position belongs to: LongTensor of the same shape as `tokens`.

    The number of <eos> tokens since the last <cls> strictly before the position (0 = the first
    member; a <cls> itself gets 0; a member's closing <eos> belongs to that member). Before the first
    <cls> of a window (a window cut inside a cluster) members are counted from the window start.
    Along the last dimension; no host sync.
    """
    is_eos = (tokens == eos_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # <eos> strictly before each position
    # eos_before never decreases, so its running maximum over <cls> positions is its value at the last <cls>.
    at_cls = torch.where(tokens == cls_id, eos_before, torch.zeros_like(eos_before))
    return eos_before - at_cls.cummax(-1).values


def target_member_index(input_ids: Tensor, causal: bool, cls_id: int, eos_id: int) -> Tensor:
    """The member index (see member_index) of the token each position's label is.

    Masked LM: a label is the original token at its own position. Causal LM: labels[..., i] is the
    token at i + 1, so its member index is member_index's at i + 1; at the last position (whose next
    token the window does not hold) it follows from the tokens up to i (an <eos> at i closes a member).
    """
    members = member_index(input_ids, cls_id, eos_id)
    if not causal:
        return members
    last = members[..., -1:] + (input_ids[..., -1:] == eos_id).long()
    last = torch.where(input_ids[..., -1:] == cls_id, torch.zeros_like(last), last)
    return torch.cat([members[..., 1:], last], dim=-1)


TargetSet = Callable[[Tensor, Tensor, Tensor | None, int], Tensor]
# name -> (input_ids, labels, member index of each target or None, mask id) -> bool [batch, length]
TARGET_SETS: dict[str, TargetSet] = {
    "all": lambda ids, labels, members, mask_id: labels != IGNORE_INDEX,
    "masked": lambda ids, labels, members, mask_id: (labels != IGNORE_INDEX) & (ids == mask_id),
    "masked_first": lambda ids, labels, members, mask_id: (labels != IGNORE_INDEX) & (ids == mask_id) & (members == 0),
    "masked_later": lambda ids, labels, members, mask_id: (labels != IGNORE_INDEX) & (ids == mask_id) & (members > 0),
    "first": lambda ids, labels, members, mask_id: (labels != IGNORE_INDEX) & (members == 0),
    "later": lambda ids, labels, members, mask_id: (labels != IGNORE_INDEX) & (members > 0),
}
_MEMBER_SETS = frozenset({"masked_first", "masked_later", "first", "later"})


def target_set_names(objective: str, members: bool = False) -> tuple[str, ...]:
    """The target sets an evaluation of `objective` reports, `all` first.

    mlm: all, masked (+ masked_first, masked_later with members); clm (no <mask>): all (+ first, later).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "mlm":
        return ("all", "masked", *(("masked_first", "masked_later") if members else ()))
    return ("all", *(("first", "later") if members else ()))


def target_masks(input_ids: Tensor | None, labels: Tensor, names: Sequence[str], *, causal: bool,
                 alphabet: Alphabet) -> Tensor:
    """bool [len(names), batch, length]: the targets of each named set (rows of TARGET_SETS).

    input_ids: the model's input (for MLM the corrupted one, <mask> where a residue is hidden); may be
    None when only `all` is asked for.
    """
    unknown = [name for name in names if name not in TARGET_SETS]
    if unknown:
        raise ValueError(f"unknown target sets {unknown}; known: {list(TARGET_SETS)}")
    if input_ids is None and any(name != "all" for name in names):
        raise ValueError(f"target sets {list(names)} need the batch's input_ids")
    members = (target_member_index(input_ids, causal, alphabet.cls_idx, alphabet.eos_idx)
               if _MEMBER_SETS.intersection(names) else None)
    return torch.stack([TARGET_SETS[name](input_ids, labels, members, alphabet.mask_idx) for name in names])
