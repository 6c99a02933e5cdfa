"""Looking inside a trained model: attention maps, contact estimates, amino-acid similarity.

- :func:`attention_maps`: every head of every layer for one protein, [layers, heads, L, L]; exact
  for softmax attention, the matrix implied by the random features for FAVOR+ (the matrix that the
  linear-time forward actually applied to the values), the dense equivalent for Combiner.
- :func:`query_keys`: each layer's queries and keys for one protein, to put the exact softmax map of
  the same q and k beside a FAVOR+ map (:func:`favor_approximation_error`).
- :func:`contact_map`: unsupervised contact estimate: symmetrise each head's map, remove the
  average-product background (APC, as ESM does before its contact regression), average the heads.
- :func:`amino_acid_similarity`: the analysis of Vig et al. (2020) that the Performer paper repeats:
  how alike two amino acids are in the attention the heads direct at them, compared with BLOSUM62
  (:func:`blosum62`, :func:`matrix_correlation`).

Maps cover residues only: the <cls> and <eos> tokens around a protein are dropped, so index i of a map
is residue i of the sequence.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from protein_performer import ops
from protein_performer.data import Alphabet, frame
from protein_performer.nn.attention import SelfAttention

__all__ = [
    "AMINO_ACIDS",
    "AminoAcidSimilarity",
    "amino_acid_similarity",
    "apc",
    "attention_maps",
    "attention_maps_of_tokens",
    "blosum62",
    "contact_map",
    "favor_approximation_error",
    "matrix_correlation",
    "query_keys",
    "symmetrize",
    "tokenize",
]

# The 20 standard amino acids in one-letter alphabetical order: the rows and columns of similarity
# matrices and of blosum62() unless another order is asked for.
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def tokenize(alphabet: Alphabet, sequence: str) -> Tensor:
    """One protein as the model saw it in training: <cls> residues <eos> -> LongTensor [L + 2]."""
    residues = alphabet.encode(sequence)
    return torch.from_numpy(frame(alphabet, residues, [0], [len(residues)])[0])


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _attention_layers(model: nn.Module) -> list[SelfAttention]:
    layers = sorted((m for m in model.modules() if isinstance(m, SelfAttention)), key=lambda m: m.layer_index)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SelfAttention modules; pass a ProteinPerformer")
    return layers


@torch.no_grad()
def attention_maps(model: nn.Module, alphabet: Alphabet, sequence: str) -> Tensor:
    """Attention of every head of every layer for one protein.

    Args:
        model: a ProteinPerformer (any attention kind), e.g. from ``load_model``.
        sequence: residues as one-letter codes.

    Returns:
        float32 [layers, heads, L, L] on the CPU, L = len(sequence); row i is what residue i attends to.
        Rows sum to at most 1: the mass that went to <cls>/<eos> is not shown.
    """
    return attention_maps_of_tokens(model, tokenize(alphabet, sequence))[:, :, 1:-1, 1:-1]


@torch.no_grad()
def attention_maps_of_tokens(model: nn.Module, tokens: Tensor) -> Tensor:
    """Attention of every head of every layer over any token sequence (e.g. a homolog window).

    Args:
        tokens: int [T], special tokens included as the model should see them.

    Returns:
        float32 [layers, heads, T, T] on the CPU, rows summing to 1 (the model's own attention: exact for
        softmax, implied by the random features for FAVOR+).
    """
    was_training = model.training
    model.eval()
    try:
        batch = tokens.long()[None].to(_model_device(model))  # (1, T)
        attentions = model(batch, return_attention=True).attentions  # (1, layers, heads, T, T)
    finally:
        model.train(was_training)
    return attentions[0].float().cpu()


@torch.no_grad()
def query_keys(model: nn.Module, alphabet: Alphabet, sequence: str) -> list[tuple[Tensor, Tensor]]:
    """Each layer's queries and keys for one protein, as its attention op received them.

    Rotary position (if the model uses it) is already applied; queries and keys are unscaled, as
    every op in ``protein_performer.ops`` expects.

    Returns:
        one (q, k) pair per layer, each [1, heads, L + 2, head_dim] (float32, CPU), positions 0 and
        L + 1 being <cls> and <eos>. ``ops.softmax_attention_weights(q, k)`` is the exact map of that
        layer's q and k; ``ops.implied_attention(q, k, projection)`` the FAVOR+ estimate of it.
    """
    layers = _attention_layers(model)
    captured: dict[int, tuple[Tensor, Tensor]] = {}

    def capture(module: SelfAttention, args: tuple, kwargs: dict) -> None:
        # The pre-hook sees the block's normalised input (and the token positions); projecting it again
        # gives exactly the q, k that the forward computes (project_qkv is deterministic).
        q, k, _ = module.project_qkv(args[0], positions=kwargs.get("positions"))
        captured[module.layer_index] = (q.float().cpu(), k.float().cpu())

    handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        model(tokenize(alphabet, sequence)[None].to(_model_device(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [captured[layer.layer_index] for layer in layers]


@torch.no_grad()
def favor_approximation_error(
    q: Tensor,
    k: Tensor,
    nb_features: Sequence[int],
    *,
    draws: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """How far the FAVOR+ implied attention of q, k is from their exact softmax attention.

    The error of one map is the mean over queries of the total-variation distance between the exact
    and the implied attention rows, 0.5 * sum_j |A_ij - Â_ij|: the fraction of each query's attention
    mass that FAVOR+ puts in the wrong place (0 = identical, 1 = disjoint), averaged over heads.

    Args:
        q, k: [batch, heads, length, head_dim], e.g. from :func:`query_keys`.
        nb_features: feature counts m to try (positive softmax-kernel features, FAVOR+).
        draws: independent orthogonal random projections per m, drawn from a generator seeded `seed`.

    Returns:
        float64 [len(nb_features), draws].
    """
    q, k = q.double(), k.double()
    exact = ops.softmax_attention_weights(q, k)  # (B, H, L, L)
    generator = torch.Generator().manual_seed(seed)
    errors = np.zeros((len(nb_features), draws))
    for i, m in enumerate(nb_features):
        for d in range(draws):
            # Drawn by the CPU generator (the same draws on any device), then moved to q's device.
            projection = ops.gaussian_orthogonal_random_matrix(
                m, q.shape[-1], generator=generator, device=q.device, dtype=torch.float64)
            implied = ops.implied_attention(q, k, projection)
            errors[i, d] = (0.5 * (implied - exact).abs().sum(-1)).mean().item()
    return errors


def symmetrize(maps: Tensor) -> Tensor:
    """A + A^T over the last two dimensions: [..., L, L] -> [..., L, L]; contacts are symmetric."""
    return maps + maps.transpose(-1, -2)


def apc(maps: Tensor) -> Tensor:
    """Average-product correction: subtract the background F_i. F_.j / F_.. that a residue's overall
    attention level predicts, leaving pair-specific signal (Dunn et al. 2008; ESM's contact head).

    Args:
        maps: [..., L, L].

    Returns:
        [..., L, L], same dtype.
    """
    row = maps.sum(-1, keepdim=True)  # (..., L, 1)
    col = maps.sum(-2, keepdim=True)  # (..., 1, L)
    total = maps.sum((-1, -2), keepdim=True)  # (..., 1, 1)
    return maps - row * col / total


def contact_map(maps: Tensor, *, layers: Iterable[int] | None = None) -> Tensor:
    """Unsupervised contact scores from attention maps: symmetrise, APC, then average over heads.

    ESM feeds the per-head APC maps to a logistic regression trained on known structures; without
    structures the plain average is the estimate (higher = more likely in contact).

    Args:
        maps: [layers, heads, L, L] from :func:`attention_maps`.
        layers: which layers to average (default all; negative counts from the last).

    Returns:
        [L, L] symmetric.
    """
    if maps.dim() != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"contact_map expects [layers, heads, L, L] maps, got {tuple(maps.shape)}")
    if layers is not None:
        maps = maps[list(layers)]
    return apc(symmetrize(maps.double())).mean((0, 1)).to(maps.dtype)


@dataclass
class AminoAcidSimilarity:
    """Amino acids compared through the attention the heads direct at them.

    Attributes:
        letters: the amino acids of the rows and columns, e.g. AMINO_ACIDS.
        similarity: [20, 20] Pearson correlation of profile columns a and b (1 on the diagonal).
        profile: [layers * heads, 20]: the share of each head's attention that lands on each amino
            acid (every row sums to 1 over the 20 standard residues).
        residues: how many residues of each amino acid were seen, [20].
    """

    letters: str
    similarity: np.ndarray
    profile: np.ndarray
    residues: np.ndarray


@torch.no_grad()
def amino_acid_similarity(
    model: nn.Module,
    alphabet: Alphabet,
    sequences: Iterable[str],
    *,
    letters: str = AMINO_ACIDS,
    max_length: int | None = 1024,
) -> AminoAcidSimilarity:
    """Amino-acid x amino-acid similarity from attention over many proteins (Vig et al. 2020).

    For each head, the attention that every residue receives (summed over the queries, residues only)
    is added up per amino acid over all `sequences`, then normalised into that head's share per amino
    acid. Two amino acids are similar when the heads attend to them alike: the similarity is the
    Pearson correlation of their shares across all heads of all layers. Amino-acid frequency scales a
    column without changing its correlations, so common residues are not favoured.

    Args:
        sequences: proteins (one-letter codes); each is one forward pass with materialised maps.
        letters: the amino acids to compare (standard one-letter codes).
        max_length: proteins longer than this are cut to their first `max_length` residues, since a
            map costs L^2 memory; None keeps them whole.
    """
    ids = torch.from_numpy(alphabet.encode(letters).astype(np.int64))  # (A,)
    received = None  # (layers * heads, A): attention mass landing on each amino acid
    counts = torch.zeros(len(letters), dtype=torch.float64)
    for sequence in sequences:
        if max_length is not None:
            sequence = sequence[:max_length]
        maps = attention_maps(model, alphabet, sequence).double()  # (layers, heads, L, L)
        tokens = torch.from_numpy(alphabet.encode(sequence).astype(np.int64))  # (L,)
        onehot = (tokens[:, None] == ids[None, :]).double()  # (L, A); non-standard residues match none
        per_key = maps.flatten(0, 1).sum(1)  # (layers * heads, L): attention received by each key
        mass = per_key @ onehot  # (layers * heads, A)
        received = mass if received is None else received + mass
        counts += onehot.sum(0)
    if received is None:
        raise ValueError("amino_acid_similarity needs at least one sequence")
    missing = [a for a, n in zip(letters, counts.tolist()) if n == 0]
    if missing:
        raise ValueError(f"amino acids {''.join(missing)} never occur in the sequences given; "
                         "pass more (or longer) proteins")
    profile = (received / received.sum(1, keepdim=True)).numpy()
    return AminoAcidSimilarity(letters=letters, similarity=np.corrcoef(profile.T), profile=profile,
                               residues=counts.numpy().astype(np.int64))


def blosum62(letters: str = AMINO_ACIDS) -> np.ndarray:
    """BLOSUM62 substitution scores (half-bits) for `letters` x `letters`: int64 [A, A].

    Read from the matrix file that ships with Biopython (``Bio.Align.substitution_matrices``), so no
    network is needed.
    """
    from Bio.Align import substitution_matrices

    matrix = substitution_matrices.load("BLOSUM62")
    return np.array([[matrix[a][b] for b in letters] for a in letters], dtype=np.int64)


def matrix_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two symmetric [A, A] matrices over their off-diagonal pairs (i < j).

    The diagonal is left out: a similarity from correlations is 1 there by construction, while
    BLOSUM62's self-scores measure how conserved a residue is, not how alike two residues are.
    """
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"matrix_correlation needs two square matrices of one shape, got {a.shape} and {b.shape}")
    upper = np.triu_indices(a.shape[0], k=1)
    return float(np.corrcoef(a[upper], b[upper])[0, 1])
