"""Multi-head self-attention: projections, head split, rotary, and dispatch to the `ops` kernels.

The math of each attention kind lives in `protein_performer.ops`, and how a layer calls it in the kind's
row of `protein_performer.config.ATTENTION`; this module owns the weights and buffers those functions
need (q/k/v projections, the random-feature projection, the RPE bias) and gives every kind the same
interface. For a feature map, return_attention=True gives the matrix that
the kind's forward applied to v (exact for softmax, implied by the features for FAVOR+).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from protein_performer import ops
from protein_performer.config import (  # the kind tuples are re-exported: they lived here before the registry
    ATTENTION,
    ATTENTION_KINDS,
    RANDOM_FEATURE_KINDS,
    RECURRENT_KINDS,
    AttentionKind,
    PerformerConfig,
)
from protein_performer.nn.rotary import RotaryEmbedding

__all__ = ["ATTENTION_KINDS", "OPRF_MOMENTUM", "RANDOM_FEATURE_KINDS", "RECURRENT_KINDS", "RPE_BUCKETS_PER_OCTAVE",
           "SelfAttention",
           "relative_buckets"]

# Log-spaced buckets of the windowed favor_rpe bias between rpe_exact_distance and rpe_max_distance.
RPE_BUCKETS_PER_OCTAVE = 4
# Causal FAVOR++'s running statistic: the plain mean of the first 1 / (1 - momentum) training batches,
# then an exponential moving average with this momentum (it follows the sharpening of attention).
OPRF_MOMENTUM = 0.99


def relative_buckets(exact_distance: int, max_distance: int) -> Tensor:
    """The bias column for each entry of [far before, offsets -(w-1) .. w-1, far after], w = max_distance.

    T5's shape: one column per offset with |j - i| < exact_distance; from there to w, distances d share
    a column per direction when floor(4 log2(d / exact_distance)) agrees (4 buckets per octave); one
    far column per direction beyond w. Returns a long tensor [2w + 1]; columns 0 .. max are all used.
    """
    if not 1 <= exact_distance <= max_distance:
        raise ValueError(f"relative_buckets: need 1 <= rpe_exact_distance ({exact_distance}) <= rpe_max_distance "
                         f"({max_distance})")
    exact = 2 * exact_distance - 1  # columns of offsets -(E-1) .. E-1
    # floor(4 log2(d / E)) in integers: the largest k with E^4 2^k <= d^4
    octaves = [(d ** RPE_BUCKETS_PER_OCTAVE // exact_distance ** RPE_BUCKETS_PER_OCTAVE).bit_length() - 1
               for d in range(exact_distance, max_distance)]
    rank = {k: i for i, k in enumerate(sorted(set(octaves)))}
    log_buckets = len(rank)
    columns = []
    for offset in range(-(max_distance - 1), max_distance):
        distance = abs(offset)
        if distance < exact_distance:
            columns.append(offset + exact_distance - 1)
        else:
            bucket = rank[octaves[distance - exact_distance]]
            columns.append(exact + bucket + (log_buckets if offset > 0 else 0))
    far = exact + 2 * log_buckets
    return torch.tensor([far, *columns, far + 1])


class SelfAttention(nn.Module):
    """Self-attention of one block, for any kind of the ATTENTION registry (`protein_performer.config`).

    No dropout on attention weights: kernelized attention never materialises them, and keeping the
    kinds alike makes their comparison fair. Dropout acts on the output, as it enters the residual.
    """

    projection: Tensor | None

    def __init__(self, config: PerformerConfig, layer_index: int) -> None:
        super().__init__()
        self.kind = config.attention
        self.causal = config.causal
        self.layer_index = layer_index  # place in the stack (0-based): seeds its projection, names it in hooks
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.combiner_block_size = config.combiner_block_size
        self.combiner_variant = config.combiner_variant
        self.features = config.features
        self.coupling = config.coupling
        self.exact_window = config.exact_window
        self.band_order = config.band_order

        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.rotary = RotaryEmbedding(self.head_dim) if config.position == "rotary" else None
        # Persistent buffer: saved in checkpoints, moved with .to(), never touched by the optimiser.
        # Filled by redraw_projection (the model draws all layers at construction).
        projection = torch.zeros(config.nb_features, self.head_dim) if self.spec.random_features else None
        self.register_buffer("projection", projection, persistent=True)
        # Causal FAVOR++: the statistic u of every head, a running mean of training batches (an EMA after
        # OPRF_MOMENTUM's horizon), fixed in eval: a batch statistic would let future tokens in.
        if config.features == "oprf" and config.causal:
            self.register_buffer("oprf_u", torch.zeros(config.n_heads), persistent=True)
            self.register_buffer("oprf_updates", torch.zeros((), dtype=torch.long), persistent=True)
        else:
            self.oprf_u = self.oprf_updates = None
        # favor_rpe's b_(j-i), zero = plain FAVOR+ at initialisation. Windowed (rpe_max_distance = w): a
        # table [heads, columns] read through rpe_index (relative_buckets), the same size at any length.
        # Full (rpe_max_distance None): b for offsets -(max_length-1) .. max_length-1, cut to the centre
        # [heads, 2L-1] for each input.
        self.rpe_bias: nn.Parameter | None = None
        index = None
        if self.spec.relative_bias and config.rpe_max_distance is not None:
            index = relative_buckets(config.rpe_exact_distance, config.rpe_max_distance)
            self.rpe_bias = nn.Parameter(torch.zeros(config.n_heads, int(index.max()) + 1))
        elif self.spec.relative_bias:
            self.rpe_bias = nn.Parameter(torch.zeros(config.n_heads, 2 * config.max_length - 1))
        self.register_buffer("rpe_index", index, persistent=False)  # derived from the config
        # a causal layer of this kind has a finite recurrent state (it can `step`)
        self.recurrent = self.spec.step is not None and config.recurrent_kind

    @property
    def spec(self) -> AttentionKind:
        """This layer's row of the ATTENTION registry: how to call its op, what the kind holds. (Looked
        up by name, not stored: the rows hold closures, and a module must stay picklable.)"""
        return ATTENTION[self.kind]

    def relative_bias(self, length: int) -> Tensor | ops.WindowedBias:
        """favor_rpe's bias in the form its op takes: a WindowedBias, or the full [heads, 2L - 1] one."""
        assert self.rpe_bias is not None
        if self.rpe_index is None:
            return ops.slice_rpe_bias(self.rpe_bias, length)  # (H, 2L-1)
        table = self.rpe_bias[:, self.rpe_index]  # (H, 2w + 1): far before, offsets -(w-1) .. w-1, far after
        # Columns 0 and 2w by a strided slice: a Python-list index would copy the list to the device.
        return ops.WindowedBias(band=table[:, 1:-1], far=table[:, :: table.shape[1] - 1])

    def extra_repr(self) -> str:
        features = f", nb_features={self.projection.shape[0]}" if self.projection is not None else ""
        return f"kind={self.kind}, causal={self.causal}, heads={self.n_heads}, head_dim={self.head_dim}{features}"

    @torch.no_grad()
    def redraw_projection(self, generator: torch.Generator) -> None:
        """Draw a fresh orthogonal Gaussian projection [nb_features, head_dim] from `generator` (CPU).

        Drawn on the generator's device (CPU) in float64, then copied into the buffer's device and dtype,
        so the matrix does not depend on where the model lives. No-op for kinds without random features.
        """
        if self.projection is None:
            return
        fresh = ops.gaussian_orthogonal_random_matrix(
            self.projection.shape[0], self.head_dim, coupling=self.coupling, generator=generator, dtype=torch.float64)
        self.projection.copy_(fresh)

    def oprf_a(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor | None:
        """FAVOR++'s coefficient A for this input (None with positive features): [batch, heads] from the
        valid tokens bidirectionally, [heads] from the running statistic causally."""
        if self.features != "oprf":
            return None
        if self.oprf_u is not None:
            return ops.oprf_coefficient(self.oprf_u, self.head_dim)
        return ops.oprf_coefficient(ops.oprf_statistic(q, k, key_padding_mask), self.head_dim)

    @torch.no_grad()
    def update_oprf_statistic(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> None:
        """Fold this training batch's per-head u into the running statistic (after the forward used the old
        one). Rows without a valid token are skipped; under DDP the batch means are averaged over ranks
        first, so every rank holds the same statistic."""
        u = ops.oprf_statistic(q, k, key_padding_mask).float()  # (B, H)
        valid = torch.ones(u.shape[0], device=u.device) if key_padding_mask is None else (
            (~key_padding_mask).any(dim=1).float())
        sums = torch.cat([(u * valid[:, None]).sum(dim=0), valid.sum()[None]])  # (H + 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        # no branch on a device value: a training step never waits on the host
        seen = sums[-1] > 0
        batch_u = sums[:-1] / sums[-1].clamp(min=1.0)
        rate = torch.clamp(1.0 / (self.oprf_updates + 1).float(), min=1.0 - OPRF_MOMENTUM) * seen
        self.oprf_u.add_(rate * (batch_u.to(self.oprf_u) - self.oprf_u))
        self.oprf_updates.add_(seen.long())

    def project_qkv(self, x: Tensor, offset: int = 0,
                    positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [batch, length, d_model] -> q, k, v, each [batch, heads, length, head_dim].

        Rotary (if configured) is applied to q and k here, before any feature map; `offset` is the
        position of x's first token (non-zero during step-by-step decoding), or `positions` [batch, length]
        gives every token's (position_scope='member').
        """
        batch, length, _ = x.shape
        q, k, v = (self.qkv(x)
                   .view(batch, length, 3, self.n_heads, self.head_dim)
                   .permute(2, 0, 3, 1, 4)  # (3, B, H, L, D)
                   .unbind(0))
        if self.rotary is not None:
            q, k = self.rotary(q, offset, positions), self.rotary(k, offset, positions)
        return q, k, v

    def band_permutation(self, positions: Tensor | None, key_padding_mask: Tensor | None) -> Tensor | None:
        """band_order='member': the order [batch, length] that sorts tokens by their position within their
        member (ties in input order; padding last, so that it moves no valid token), None otherwise."""
        if self.band_order != "member":
            return None
        if positions is None:
            raise ValueError("band_order='member' sorts tokens by their position within their member: pass "
                             "positions (the model does with position_scope='member')")
        if key_padding_mask is not None:
            positions = positions.masked_fill(key_padding_mask, torch.iinfo(positions.dtype).max)
        return torch.sort(positions, dim=1, stable=True).indices

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
               positions: Tensor | None = None) -> Tensor:
        """Attention output [batch, heads, length, head_dim] of this layer's kind. positions [batch, length]
        (member positions) are read only by band_order='member', whose band follows their sorted order."""
        order = self.band_permutation(positions, key_padding_mask)
        if order is None:
            out = self.spec.attend(self, q, k, v, key_padding_mask)
        else:
            out = ops.favor_sorted_band_attention(q, k, v, self.projection, self.exact_window, order,
                                                  causal=self.causal, key_padding_mask=key_padding_mask,
                                                  oprf_a=self.oprf_a(q, k, key_padding_mask))
        if self.training and self.oprf_u is not None:
            self.update_oprf_statistic(q, k, key_padding_mask)
        return out

    def attention_weights(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None,
                          positions: Tensor | None = None) -> Tensor:
        """The [batch, heads, length, length] matrix A that `attend` applies: attend(q, k, v) = A @ v."""
        order = self.band_permutation(positions, key_padding_mask)
        if order is None:
            return self.spec.weights(self, q, k, key_padding_mask)
        return ops.implied_sorted_band_attention(q, k, self.projection, self.exact_window, order, causal=self.causal,
                                                 key_padding_mask=key_padding_mask,
                                                 oprf_a=self.oprf_a(q, k, key_padding_mask))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, return_attention: bool = False,
                positions: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x [batch, length, d_model] -> (output [batch, length, d_model], weights [batch, heads, L, L] | None).

        key_padding_mask: bool [batch, length], True at padding; padded keys get zero weight.
        positions: long [batch, length], each token's rotary position; None: 0, 1, ... (see project_qkv).
        """
        batch, length, d_model = x.shape
        q, k, v = self.project_qkv(x, positions=positions)
        y = self.attend(q, k, v, key_padding_mask, positions)  # (B, H, L, D)
        weights = self.attention_weights(q, k, key_padding_mask, positions) if return_attention else None
        y = y.transpose(1, 2).reshape(batch, length, d_model)  # (B, L, H*D)
        return self.dropout(self.out_proj(y)), weights

    def step(self, x_t: Tensor, position: int, state: Any = None,
             rotary_position: Tensor | None = None) -> tuple[Tensor, Any]:
        """One causal decoding step: x_t [batch, d_model] at `position` -> (output [batch, d_model], state).

        The state is the op's constant-size running sum of phi(k) v^T and phi(k) (favor kinds), plus the
        last w keys for a windowed favor_rpe; pass None at position 0. rotary_position [batch] (long), if
        given, is each sequence's rotary position instead of `position` (position_scope='member').
        """
        if not self.causal or not self.recurrent:
            raise ValueError(f"step-by-step decoding needs a causal model with attention in {RECURRENT_KINDS} or "
                             f"favor_rpe with a windowed bias (rpe_max_distance set), this layer is "
                             f"attention={self.kind!r}, causal={self.causal}")
        positions = None if rotary_position is None else rotary_position[:, None]
        q, k, v = (t.squeeze(2) for t in self.project_qkv(x_t[:, None, :], position, positions))  # (B, H, D)
        y, state = self.spec.step(self, q, k, v, position, state)
        return self.dropout(self.out_proj(y.reshape(x_t.shape[0], -1))), state

