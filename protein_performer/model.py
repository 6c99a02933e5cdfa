"""ProteinPerformer: a protein language model whose attention is exact softmax, FAVOR+ or a relative.

Reading order: PerformerOutput -> ProteinPerformer (embeddings, pre-LN blocks from `protein_performer.nn`,
final norm, tied LM head, decoding). The config (PerformerConfig, config_from_hydra) and the registry of
attention kinds live in `protein_performer.config`. A plain nn.Module: no Lightning here.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from protein_performer.config import (  # re-exported: the config lived here before config.py
    ATTENTION,
    ATTENTION_GROUP_FIELDS,
    COMBINER_VARIANTS,
    POSITION_KINDS,
    PerformerConfig,
    config_from_hydra,
)
from protein_performer.nn import Block, member_positions
from protein_performer.pretrained import PretrainedMixin

__all__ = ["ATTENTION_GROUP_FIELDS", "COMBINER_VARIANTS", "POSITION_KINDS", "DecodingState", "PerformerConfig",
           "PerformerOutput", "ProteinPerformer", "config_from_hydra", "count_parameters", "projection_seed"]


@dataclass
class PerformerOutput:
    """What ProteinPerformer.forward returns.

    logits: [batch, length, vocab_size].
    hidden_states: {layer: [batch, length, d_model]} for the requested repr_layers, keyed by the
        non-negative index (0 = embeddings, i = after block i, n_layers = after the final LayerNorm).
    attentions: [batch, n_layers, heads, length, length] when return_attention=True, else None.
    """

    logits: Tensor
    hidden_states: dict[int, Tensor] = field(default_factory=dict)
    attentions: Tensor | None = None


@dataclass
class DecodingState:
    """Where step-by-step decoding is: the next position and each layer's recurrent attention state (and,
    with position_scope='member', each sequence's last <cls>/<eos> so far, long [batch])."""

    position: int
    layers: list[Any]
    last_separator: Tensor | None = None


class ProteinPerformer(nn.Module, PretrainedMixin):
    """Token embedding (+ learned positions) -> n_layers pre-LN blocks -> LayerNorm -> LM head.

    save_pretrained(dir) / from_pretrained(dir or Hub id) / push_to_hub(repo id): see protein_performer.pretrained.
    """

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_idx)
        self.position_embedding = (nn.Embedding(config.max_length, config.d_model)
                                   if config.position == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer_index) for layer_index in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)

        self.apply(self._init_weights)
        # GPT-2's scaling: each block adds two residual branches, so shrink their output projections to
        # keep the residual stream's variance independent of depth.
        for block in self.blocks:
            for linear in (block.attention.out_proj, block.feedforward.down):
                nn.init.normal_(linear.weight, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.redraw_projections(step=0)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    @property
    def uses_random_features(self) -> bool:
        """True when the layers hold projections that the training loop should redraw."""
        return self.config.attention_kind.random_features

    @torch.no_grad()
    def redraw_projections(self, step: int) -> None:
        """Redraw every layer's random-feature projection from (config.feature_seed, step, layer index).

        A fresh CPU torch.Generator per layer makes the result a pure function of those three numbers:
        every DDP rank computes the same matrices without communication. No-op without random features.
        """
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            raise ValueError(f"redraw_projections needs a non-negative integer step, got {step!r}")
        for block in self.blocks:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(projection_seed(self.config.feature_seed, step, block.attention.layer_index))
            block.attention.redraw_projection(generator)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters, tied ones counted once (buffers such as projections excluded)."""
        return count_parameters(self, trainable_only=trainable_only)

    def positions(self, input_ids: Tensor) -> Tensor | None:
        """Each token's position [batch, length] with position_scope='member' (counted from the last <cls>
        or <eos>: see nn.member_positions); None with 'window' (0, 1, ... along the input)."""
        if self.config.position_scope == "window":
            return None
        return member_positions(input_ids, self.separators)

    @functools.cached_property
    def separators(self) -> tuple[int, int]:
        """The ids where position_scope='member' restarts the count: <cls> and <eos>."""
        from protein_performer.data.alphabet import Alphabet  # on first use, as config.py does

        alphabet = Alphabet()
        return alphabet.cls_idx, alphabet.eos_idx

    def embed(self, input_ids: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """input_ids [batch, length] (first token at position `offset`, or at `positions` [batch, length])
        -> [batch, length, d_model]."""
        x = self.token_embedding(input_ids)
        if self.position_embedding is not None:
            if positions is None:
                positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
            if positions.numel() and int(positions.max()) >= self.config.max_length:
                raise ValueError(f"position {int(positions.max())} is beyond max_length={self.config.max_length} "
                                 "of the learned position table; crop the input or use position='rotary'")
            x = x + self.position_embedding(positions)
        return self.dropout(x)

    def forward(self, input_ids: Tensor, padding_mask: Tensor | None = None, *,
                repr_layers: Sequence[int] = (), return_attention: bool = False) -> PerformerOutput:
        """Logits for input_ids [batch, length] (long); see PerformerOutput.

        padding_mask: bool [batch, length], True at padding: padded positions are never attended to, so a
            sequence's outputs do not depend on the padding around it.
        repr_layers: layers whose hidden states to return; negatives count from the end (-1 = n_layers).
        return_attention: also return every layer's attention matrix (the one applied to v).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if padding_mask is not None and (padding_mask.shape != input_ids.shape
                                         or padding_mask.dtype != torch.bool):
            raise ValueError(f"padding_mask must be bool {tuple(input_ids.shape)} (True at padding), got "
                             f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
        n_layers = self.config.n_layers
        wanted = self._layer_indices(repr_layers)

        positions = self.positions(input_ids)
        x = self.embed(input_ids, positions=positions)
        hidden_states: dict[int, Tensor] = {0: x} if 0 in wanted else {}
        attentions: list[Tensor] = []
        for index, block in enumerate(self.blocks, start=1):
            x, weights = block(x, padding_mask, return_attention, positions=positions)
            if weights is not None:
                attentions.append(weights)
            if index in wanted and index != n_layers:
                hidden_states[index] = x
        x = self.final_norm(x)
        if n_layers in wanted:
            hidden_states[n_layers] = x
        return PerformerOutput(
            logits=self.lm_head(x),
            hidden_states=hidden_states,
            attentions=torch.stack(attentions, dim=1) if return_attention else None,  # (B, layers, H, L, L)
        )

    def _layer_indices(self, repr_layers: Sequence[int]) -> set[int]:
        n_layers = self.config.n_layers
        bad = [layer for layer in repr_layers if not -(n_layers + 1) <= layer <= n_layers]
        if bad:
            raise ValueError(f"repr_layers {bad} out of range for a {n_layers}-layer model: use 0..{n_layers} "
                             f"(0 = embeddings, {n_layers} = after the final norm) or negatives from the end")
        return {layer % (n_layers + 1) for layer in repr_layers}

    def decode_step(self, input_ids: Tensor, state: DecodingState | None = None) -> tuple[Tensor, DecodingState]:
        """Feed one token per sequence, input_ids [batch] -> (next-token logits [batch, vocab], new state).

        Recurrent FAVOR+ (causal favor/favor_relu models, and favor_rpe with a windowed bias: the last w
        keys plus the far state): memory per step is constant in the length decoded so far, and the
        logits equal the parallel forward's at the same position. No padding:
        all sequences of the batch advance together. Call in eval mode for deterministic outputs.
        """
        if not self.config.recurrent:
            recurrent = [name for name, row in ATTENTION.items() if row.recurrent]
            raise ValueError(f"decode_step needs causal=True and an attention kind with a recurrent state "
                             f"({recurrent}; favor_rpe with rpe_max_distance set; not with band_order='member'); "
                             f"this model has attention={self.config.attention!r}, causal={self.config.causal}, "
                             f"rpe_max_distance={self.config.rpe_max_distance}, band_order={self.config.band_order!r}")
        if state is None:
            state = DecodingState(position=0, layers=[None] * self.config.n_layers)
        rotary_position = last_separator = None
        if self.config.position_scope == "member":  # the step form of member_positions
            last_separator = state.last_separator
            if last_separator is None:
                last_separator = torch.zeros_like(input_ids, dtype=torch.long)
            rotary_position = state.position - last_separator
            is_separator = (input_ids == self.separators[0]) | (input_ids == self.separators[1])
            last_separator = torch.where(is_separator, state.position, last_separator)
        x = self.embed(input_ids[:, None], offset=state.position,
                       positions=None if rotary_position is None else rotary_position[:, None])[:, 0]  # (B, d_model)
        layer_states = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block.step(x, state.position, layer_state, rotary_position)
            layer_states.append(layer_state)
        logits = self.lm_head(self.final_norm(x))
        return logits, DecodingState(position=state.position + 1, layers=layer_states, last_separator=last_separator)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample a continuation: prompt_ids [batch, prompt_length] -> [batch, prompt_length + max_new_tokens].

        The prompt is fed token by token through decode_step (constant memory); temperature 0 is greedy.
        Pass a torch.Generator on the model's device for reproducible samples.
        """
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids must be [batch, prompt_length >= 1], got {tuple(prompt_ids.shape)}")
        state = None
        for t in range(prompt_ids.shape[1]):
            logits, state = self.decode_step(prompt_ids[:, t], state)
        tokens = [prompt_ids]
        for _ in range(max_new_tokens):
            if temperature == 0:
                next_ids = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
            tokens.append(next_ids[:, None])
            logits, state = self.decode_step(next_ids, state)
        return torch.cat(tokens, dim=1)


def projection_seed(feature_seed: int, step: int, layer_index: int) -> int:
    """A 63-bit torch seed that mixes (feature_seed, step, layer) so that nearby triples are unrelated."""
    entropy = np.random.SeedSequence([feature_seed, step, layer_index]).generate_state(1, dtype=np.uint64)[0]
    return int(entropy >> np.uint64(1))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `module`, shared (tied) tensors counted once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
