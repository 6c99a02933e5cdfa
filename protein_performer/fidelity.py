"""How close a model's attention is to exact softmax, on its own q, k, v over real proteins.

For each layer and head of a ProteinPerformer, `attention_fidelity` runs the model once, takes the q, k,
v each layer attends with (after rotary), and measures, on valid (non-padding) tokens only:

- error: ||A_hat v - A v|| / ||A v|| over all valid queries, A_hat the layer's own attention (for FAVOR+
  the random-feature estimate) and A exact softmax(q k^T / sqrt(d)) with the same masks (and, for a kind
  with a relative bias such as favor_rpe, the same bias: softmax(q k^T / sqrt(d) + b_(j-i)));
- u_bar: the mean over valid (query, key) pairs of ||q' + k'||^2, q' = q d^(-1/4), k' = k d^(-1/4): the
  positive features' estimator variance grows as exp(u_bar) - 1 (Likhosherstov et al., FAVOR++). Pairs
  are those the layer attends: all valid pairs, or j <= i for a causal layer;
- entropy: the exact attention's mean row entropy in nats (log of the number of keys a query spreads over).

For FAVOR+ with the ReLU kernel the error is the distance to softmax, not an estimator's error (that
kernel does not estimate softmax). The statistics are sums (`AttentionFidelity`): add the results of
several batches to pool them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from protein_performer import ops
from protein_performer.config import PerformerConfig
from protein_performer.model import ProteinPerformer, projection_seed
from protein_performer.nn.attention import SelfAttention
from protein_performer.ops.softmax.reference import allowed_keys

__all__ = ["AttentionFidelity", "attention_fidelity", "captured_attention_inputs", "exact_attention",
           "exact_attention_weights", "fidelity_of_records", "pair_norm_sums", "rebuilt_layer", "variant_config"]

# The `step` argument of projection_seed for fresh draws: beyond any training run, so a fresh draw never
# repeats a projection the model trained with.
FRESH_DRAW_STEP = 2 ** 40


@dataclass
class AttentionFidelity:
    """Sums over the proteins measured, each [layers, heads] float64; `a + b` pools two measurements."""

    error_sq: Tensor  # sum over valid queries of ||A_hat v - A v||^2
    exact_sq: Tensor  # sum over valid queries of ||A v||^2
    pair_sum: Tensor  # sum over attended valid pairs of ||q' + k'||^2
    pairs: Tensor  # number of attended valid pairs
    entropy_sum: Tensor | None  # sum over valid queries of the exact row entropy (nats); None: not measured
    queries: Tensor  # number of valid queries

    def __add__(self, other: AttentionFidelity) -> AttentionFidelity:
        values = {}
        for name in (f.name for f in dataclasses.fields(self)):
            mine, theirs = getattr(self, name), getattr(other, name)
            values[name] = None if mine is None or theirs is None else mine + theirs
        return AttentionFidelity(**values)

    @property
    def error(self) -> Tensor:
        """[layers, heads]: ||A_hat v - A v|| / ||A v|| over every valid query measured."""
        return (self.error_sq / self.exact_sq.clamp(min=1e-300)).sqrt()

    @property
    def u_bar(self) -> Tensor:
        """[layers, heads]: mean ||q' + k'||^2 over the attended valid pairs."""
        return self.pair_sum / self.pairs.clamp(min=1)

    @property
    def entropy(self) -> Tensor | None:
        """[layers, heads]: the exact attention's mean row entropy in nats (None when not measured)."""
        return None if self.entropy_sum is None else self.entropy_sum / self.queries.clamp(min=1)

    def per_layer(self) -> dict[str, Tensor]:
        """The median over heads of each statistic: {name: [layers]} (the figure logged in validation)."""
        values = {"error": self.error, "u_bar": self.u_bar}
        if self.entropy is not None:
            values["entropy"] = self.entropy
        return {name: value.median(dim=1).values for name, value in values.items()}


@contextmanager
def captured_attention_inputs(model: ProteinPerformer) -> Iterator[list[dict[str, Any]]]:
    """Record, for every attention call during the block, {layer, config, q, k, v, key_padding_mask, output}.

    q and k are as the layer's kind receives them (after rotary); output is the layer's own attention
    [batch, heads, length, head_dim]. The layers are restored on exit.
    """
    records: list[dict[str, Any]] = []
    layers = [block.attention for block in model.blocks]

    def recorder(layer: SelfAttention):
        def attend(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                   positions: Tensor | None = None) -> Tensor:
            output = SelfAttention.attend(layer, q, k, v, key_padding_mask, positions)
            records.append({"layer": layer, "config": model.config, "q": q, "k": k, "v": v,
                            "key_padding_mask": key_padding_mask, "positions": positions, "output": output})
            return output
        return attend

    for layer in layers:
        layer.attend = recorder(layer)  # an instance attribute shadows the method
    try:
        yield records
    finally:
        for layer in layers:
            del layer.attend


def variant_config(config: PerformerConfig, nb_features: int | None = None,
                   overrides: Mapping[str, Any] | None = None) -> PerformerConfig:
    """`config` with another number of features and/or other attention settings; unknown keys raise ValueError."""
    changes = dict(overrides or {})
    if nb_features is not None:
        changes["nb_features"] = nb_features
    return PerformerConfig.from_dict({**config.to_dict(), **changes})


@torch.no_grad()
def attention_fidelity(model: ProteinPerformer, input_ids: Tensor, padding_mask: Tensor | None = None, *,
                       nb_features: int | None = None, overrides: Mapping[str, Any] | None = None,
                       seed: int | None = None, entropy: bool = True,
                       dtype: torch.dtype = torch.float64) -> AttentionFidelity:
    """Measure every layer and head of `model` on input_ids [batch, length] (see the module docstring).

    Runs one eager forward (in eval mode; the model's mode is restored) and records each layer's q, k, v.
    By default the estimate is the model's own, with the projections it holds. With `nb_features`,
    `overrides` (attention settings, e.g. {"features": "oprf"}) or `seed`, each layer is rebuilt with
    that config, given the layer's weights, and a fresh projection drawn from (seed or 0, layer); the
    rebuilt layer then attends to the very same q, k, v.

    padding_mask: bool [batch, length], True at padding; padded positions enter no statistic.
    entropy: also the exact attention's row entropy (materialises each protein's L x L matrix).
    dtype: of the exact attention and the sums (float32 is enough for errors above ~1e-5).
    """
    was_training = model.training
    model.eval()
    try:
        with captured_attention_inputs(model) as records:
            model.forward(input_ids, padding_mask)  # .forward: eager even when the model was compiled
    finally:
        model.train(was_training)
    return fidelity_of_records(records, nb_features=nb_features, overrides=overrides, seed=seed, entropy=entropy,
                               dtype=dtype)


def fidelity_of_records(records: Sequence[Mapping[str, Any]], *, nb_features: int | None = None,
                        overrides: Mapping[str, Any] | None = None, seed: int | None = None, entropy: bool = True,
                        dtype: torch.dtype = torch.float64) -> AttentionFidelity:
    """`attention_fidelity` of the attention calls recorded by `captured_attention_inputs` (one per layer)."""
    variant = None
    if nb_features is not None or overrides or seed is not None:
        variant = variant_config(records[0]["config"], nb_features, overrides)
    layers = []
    for record in records:
        layer: SelfAttention = record["layer"]
        q, k, v, mask = record["q"], record["k"], record["v"], record["key_padding_mask"]
        estimate = record["output"]
        if variant is not None:
            estimate = rebuilt_layer(layer, variant, 0 if seed is None else seed).attend(q, k, v, mask,
                                                                                          record.get("positions"))
        layers.append(layer_fidelity(layer, q, k, v, mask, estimate, entropy=entropy, dtype=dtype))
    return AttentionFidelity(**{name: None if layers[0][name] is None else torch.stack([s[name] for s in layers])
                                for name in layers[0]})


def rebuilt_layer(layer: SelfAttention, config: PerformerConfig, seed: int) -> SelfAttention:
    """A SelfAttention of `config` holding `layer`'s weights and a projection drawn from (seed, layer)."""
    fresh = SelfAttention(config, layer.layer_index)
    weights = {name: value for name, value in layer.state_dict().items() if name != "projection"}
    fresh.load_state_dict(weights, strict=False)  # a variant may hold buffers of its own
    generator = torch.Generator(device="cpu")
    generator.manual_seed(projection_seed(seed, FRESH_DRAW_STEP, layer.layer_index))
    fresh.redraw_projection(generator)
    reference = next(layer.parameters())
    return fresh.to(device=reference.device, dtype=reference.dtype).eval()


def layer_fidelity(layer: SelfAttention, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                   estimate: Tensor, *, entropy: bool = True,
                   dtype: torch.dtype = torch.float64) -> dict[str, Tensor | None]:
    """One layer's sums (the fields of AttentionFidelity, each [heads]) from q, k, v [B, H, L, D] and the
    layer's estimate A_hat v [B, H, L, D], over valid queries and attended valid pairs."""
    batch, heads, length, dim = q.shape
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    valid = torch.ones(batch, length, dtype=torch.bool, device=q.device) if key_padding_mask is None \
        else ~key_padding_mask
    queries = valid[:, None, :, None]  # (B, 1, L, 1)
    bias = _full_relative_bias(layer, length, dtype)
    exact = exact_attention(q, k, v, bias, causal=layer.causal, key_padding_mask=key_padding_mask)
    exact = torch.where(queries, exact, 0)
    difference = torch.where(queries, estimate.to(dtype) - exact, 0)
    scale = dim ** -0.25
    pair_sum, pairs = pair_norm_sums(q * scale, k * scale, valid[:, None, :].expand(batch, heads, length),
                                     causal=layer.causal)
    sums = {"error_sq": difference.square().sum(dim=(0, 2, 3)), "exact_sq": exact.square().sum(dim=(0, 2, 3)),
            "pair_sum": pair_sum.sum(0), "pairs": pairs.sum(0), "entropy_sum": None,
            "queries": valid.sum().to(dtype).expand(heads).clone()}
    if entropy:
        sums["entropy_sum"] = torch.zeros(heads, dtype=dtype, device=q.device)
        for b in range(batch):  # one protein at a time, cut to its valid tokens: an [H, n, n] matrix
            positions = valid[b].nonzero().squeeze(1)
            protein_bias = None if bias is None else bias[:, _offsets(positions, length)]
            weights = exact_attention_weights(q[b][:, positions], k[b][:, positions], protein_bias,
                                              causal=layer.causal)
            sums["entropy_sum"] -= torch.special.xlogy(weights, weights).sum(dim=(1, 2))
    return sums


def exact_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, *, causal: bool,
                    key_padding_mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d) + b_(j-i)) v over [B, H, L, D]; bias [H, 2L - 1] (entry (j - i) + L - 1) or None."""
    if bias is None:
        return ops.softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    length = q.shape[-2]
    scores_bias = bias[:, _offsets(torch.arange(length, device=q.device), length)]  # (H, L, L)
    allowed = allowed_keys(length, length, causal, key_padding_mask, q.device)
    if allowed is not None:
        scores_bias = scores_bias.masked_fill(~allowed, float("-inf"))  # (B | 1, H, L, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=scores_bias)


def exact_attention_weights(q: Tensor, k: Tensor, bias: Tensor | None, *, causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) for one protein's valid tokens: q, k [H, n, D], bias [H, n, n] or None."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1)


def pair_norm_sums(q: Tensor, k: Tensor, valid: Tensor | None = None, *, causal: bool) -> tuple[Tensor, Tensor]:
    """(sum of ||q_i + k_j||^2 over the attended valid pairs, number of those pairs), in O(n D).

    q, k: [..., n, D]; valid: bool [..., n] (None: all). Over all valid pairs the sum is
    N sum||q||^2 + N sum||k||^2 + 2 (sum q).(sum k), N valid tokens; causal (j <= i) it is
    sum_i (N_i ||q_i||^2 + C2_i + 2 q_i.C1_i), with N_i, C1_i, C2_i the running count, sum of k_j and of
    ||k_j||^2 over the valid j <= i. Returns two tensors of shape [...].
    """
    if valid is None:
        valid = torch.ones(q.shape[:-1], dtype=torch.bool, device=q.device)
    weight = valid.to(q.dtype)
    q, k = q * weight[..., None], k * weight[..., None]  # padding contributes nothing
    q_sq, k_sq = q.square().sum(-1), k.square().sum(-1)  # (..., n)
    if not causal:
        n = weight.sum(-1)
        total = n * q_sq.sum(-1) + n * k_sq.sum(-1) + 2 * (q.sum(-2) * k.sum(-2)).sum(-1)
        return total, n * n
    seen = weight.cumsum(-1)  # valid keys at or before each query
    total = ((seen * q_sq).sum(-1) + (weight * k_sq.cumsum(-1)).sum(-1)
             + 2 * (q * k.cumsum(-2)).sum(dim=(-1, -2)))
    return total, (weight * seen).sum(-1)


def _offsets(positions: Tensor, length: int) -> Tensor:
    """[n, n] index of b_(j-i) in a full bias [H, 2L - 1] for the tokens at `positions` (i rows, j columns)."""
    return positions[None, :] - positions[:, None] + length - 1


def _full_relative_bias(layer: SelfAttention, length: int, dtype: torch.dtype) -> Tensor | None:
    """The layer's relative bias over every offset, [heads, 2L - 1] (None for kinds without one)."""
    if not layer.spec.relative_bias:
        return None
    bias = layer.relative_bias(length)
    if isinstance(bias, ops.WindowedBias):
        bias = ops.expand_windowed_bias(bias, length)
    return bias.to(dtype)
