"""Boom: SHA-RNN's feed-forward layer without a down-projection.

A Transformer feed-forward layer maps d -> N*d -> d with two matrices. Boom keeps the
first (d -> N*d, then GELU) and replaces the second by *summing the N chunks* of width d.
That removes a d x N*d matrix (4.2M parameters per block at the paper's size) and its
matmul, at the cost of a fixed instead of a learned way back to width d.
Built step by step in the book's chapter "Boom".
"""

import torch
from torch import nn

from shaq.nn.activation import gelu
from shaq.nn.dropout import Dropout
from shaq.nn.onednn import Linear


class Boom(nn.Module):
    """Linear d -> expansion*d, GELU, dropout, then the sum of the `expansion` chunks.

    Args:
        d_model: input and output width d.
        expansion: inner width is expansion * d_model (4 in the paper: 1024 -> 4096).
        dropout: dropout probability after the GELU.
        shortcut: True sums the chunks (SHA-RNN); False uses an ordinary second Linear
            expansion*d -> d, for comparison.

    Shapes: x [B, T, d] -> [B, T, d].
    """

    def __init__(
        self, d_model: int, expansion: int = 4, dropout: float = 0.0, shortcut: bool = True
    ):
        super().__init__()
        if d_model < 1 or expansion < 1:
            raise ValueError(
                f"Boom needs d_model >= 1 and expansion >= 1, got {d_model} and {expansion}"
            )
        self.d_model = d_model
        self.expansion = expansion
        self.shortcut = shortcut
        self.up = Linear(d_model, expansion * d_model)
        self.dropout = Dropout(dropout)
        self.down = None if shortcut else Linear(expansion * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.dropout(gelu(self.up(x)))  # [B, T, N*d]
        if self.down is not None:
            return self.down(u)
        return u.unflatten(-1, (self.expansion, self.d_model)).sum(
            dim=-2
        )  # [B, T, N, d] -> [B, T, d]
