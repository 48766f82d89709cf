"""Merity's single-headed attention with a memory of earlier states.

One head, one matrix: only the query is projected (then layer-normalised). Keys and values
are the stored states themselves, scaled elementwise by learned sigmoid gates. Because keys
and values need no matmul, a long memory (5000 positions in the paper) is cheap to attend
over. The value gate is "over-parameterised": a constant vector pushed through a Linear
layer, which lets it flip sign and, after training, collapses to a plain vector.
Built step by step in the book's chapter "Single-headed attention with memory".
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Overparam(nn.Module):
    """Maps a vector z [d] to sigmoid(f) * tanh(c) where [c, f] = Linear(z), d -> 2d.

    Applied to a constant (sigmoid of a learned vector), so its output is a learned
    vector in (-1, 1) that can change sign; the Linear only reshapes the optimisation.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_model, 2 * d_model)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c, f = self.linear(z).chunk(2, dim=-1)
        return torch.sigmoid(f) * torch.tanh(c)


class SingleHeadAttention(nn.Module):
    """Single-head attention over [memory; current segment], as in SHA-RNN.

    q = LayerNorm(W_q a + b_q) * sigmoid(qs);  k = kv * sigmoid(ks);  v = kv * Overparam(sigmoid(vs))
    y = softmax(q k^T / sqrt(d) + causal mask) v

    No key, value or output projection. The causal mask is aligned to the *end* of the keys:
    query i of the segment sees all memory positions and segment positions <= i.
    Dropout (p = `dropout`) is applied to q and v (not k: a mask on q already reaches the
    dot product), and to the attention probabilities, as in the reference.

    Args:
        d_model: width d of queries, keys and values.
        dropout: dropout probability (the paper's `dropouth`).
        overparam: use the over-parameterised value gate (True in the paper); False uses
            sigmoid(vs) directly.
    """

    def __init__(self, d_model: int, dropout: float = 0.0, overparam: bool = True):
        super().__init__()
        self.d_model = d_model
        self.dropout = dropout
        self.query = nn.Linear(d_model, d_model)
        self.query_norm = nn.LayerNorm(d_model, eps=1e-12)
        # Gate vectors start at zero, i.e. every gate at sigmoid(0) = 0.5.
        self.qs = nn.Parameter(torch.zeros(d_model))
        self.ks = nn.Parameter(torch.zeros(d_model))
        self.vs = nn.Parameter(torch.zeros(d_model))
        self.value_gate = Overparam(d_model) if overparam else None

    def gates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three gate vectors (g_q, g_k, g_v), each [d]."""
        g_v = torch.sigmoid(self.vs)
        if self.value_gate is not None:
            g_v = self.value_gate(g_v)
        return torch.sigmoid(self.qs), torch.sigmoid(self.ks), g_v

    def forward(
        self, query: torch.Tensor, keys_values: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from the segment over memory plus segment.

        Args:
            query: [B, T, d], the (normalised) states of the current segment.
            keys_values: [B, M + T, d], the memory (M earlier positions) followed by the
                T positions of the current segment.
            return_weights: also return the attention probabilities.

        Returns:
            y [B, T, d] and, if asked, weights [B, T, M + T] (after softmax, before dropout).
        """
        B, T, d = query.shape
        S = keys_values.shape[1]
        if S < T:
            raise ValueError(f"keys_values must hold at least the {T} segment positions, got {S}")
        g_q, g_k, g_v = self.gates()
        q = self.query_norm(self.query(query)) * g_q  # [B, T, d]
        k = keys_values * g_k  # [B, S, d]
        v = keys_values * g_v  # [B, S, d]
        p = self.dropout if self.training else 0.0
        q = F.dropout(q, p, self.training)
        v = F.dropout(v, p, self.training)
        # Query i (of T) may see key j (of S = M + T) when j <= i + M.
        allowed = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(diagonal=S - T)
        if not return_weights:
            # The fused kernel (flash / memory-efficient) never materialises [T, S] probabilities.
            q, k, v = (t.to(q.dtype) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
            return y, None
        scores = (q @ k.transpose(1, 2)) / math.sqrt(d)  # [B, T, S]
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = scores.float().softmax(dim=-1).to(v.dtype)
        y = F.dropout(weights, p, self.training) @ v  # [B, T, d]
        return y, weights
