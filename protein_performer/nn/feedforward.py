"""Position-wise feed-forward network of a Transformer block."""
from __future__ import annotations

from torch import Tensor, nn


class FeedForward(nn.Module):
    """d_model -> d_ff -> GELU -> d_model, then dropout on the way back into the residual stream."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.activation = nn.GELU()
        self.down = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x [batch, length, d_model] -> [batch, length, d_model]."""
        return self.dropout(self.down(self.activation(self.up(x))))
