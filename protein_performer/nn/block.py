"""A pre-LayerNorm Transformer block: x + attention(norm(x)), then x + feedforward(norm(x))."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from protein_performer.config import PerformerConfig
from protein_performer.nn.attention import SelfAttention
from protein_performer.nn.feedforward import FeedForward


class Block(nn.Module):
    """Pre-LN keeps the residual stream un-normalised, which trains deep stacks without warmup tricks."""

    def __init__(self, config: PerformerConfig, layer_index: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = SelfAttention(config, layer_index)
        self.feedforward_norm = nn.LayerNorm(config.d_model)
        self.feedforward = FeedForward(config.d_model, config.d_ff, config.dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, return_attention: bool = False,
                positions: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x [batch, length, d_model] -> (x' [batch, length, d_model], attention [batch, heads, L, L] | None)."""
        attended, weights = self.attention(self.attention_norm(x), key_padding_mask, return_attention,
                                           positions=positions)
        x = x + attended
        x = x + self.feedforward(self.feedforward_norm(x))
        return x, weights

    def step(self, x_t: Tensor, position: int, state: Any = None,
             rotary_position: Tensor | None = None) -> tuple[Tensor, Any]:
        """One causal decoding step on x_t [batch, d_model]; see SelfAttention.step."""
        attended, state = self.attention.step(self.attention_norm(x_t), position, state, rotary_position)
        x_t = x_t + attended
        return x_t + self.feedforward(self.feedforward_norm(x_t)), state
