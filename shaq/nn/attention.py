"""Merity's single-headed attention with a memory of earlier states.

One head, one matrix: only the query is projected (then layer-normalised). Keys and values
are the stored states themselves, scaled elementwise by learned sigmoid gates. Because keys
and values need no matmul, a long memory (5000 positions in the paper) is cheap to attend
over. The value gate is "over-parameterised": a constant vector pushed through a Linear
layer, which lets it flip sign and, after training, collapses to a plain vector.
Built step by step in the book's chapter "Single-headed attention with memory".
"""

import torch
from torch import nn

from shaq.nn.attention_core import gated_attention
from shaq.nn.onednn import Linear


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

    q = LayerNorm(W_q a + b_q) * sigmoid(qs)
    k = kv * sigmoid(ks)
    v = kv * Overparam(sigmoid(vs))
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
        self.query = Linear(d_model, d_model)
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
        self,
        query: torch.Tensor,
        keys_values: torch.Tensor,
        return_weights: bool = False,
        *,
        frozen: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from the segment over memory plus segment.

        Args:
            query: [B, T, d], the (normalised) states of the current segment.
            keys_values: [B, M + T, d], the memory (M earlier positions) followed by the
                T positions of the current segment.
            return_weights: also return the attention probabilities.
            frozen: how many leading positions of keys_values are a detached memory
                (at most M). No gradient is computed for them: it comes back as zeros. With
                a 5000-position memory that skips most of the backward's work for the keys
                and values. Only the CPU path uses it.

        Returns:
            y [B, T, d] and, if asked, weights [B, T, M + T] (after softmax, before dropout).
        """
        T, S = query.shape[1], keys_values.shape[1]
        if S < T:
            raise ValueError(f"keys_values must hold at least the {T} segment positions, got {S}")
        if not 0 <= frozen <= S - T:
            raise ValueError(f"frozen must be in [0, {S - T}] (the memory length), got {frozen}")
        g_q, g_k, g_v = self.gates()
        q = self.query_norm(self.query(query))  # [B, T, d]
        # q * g_q, k = kv * g_k and v = kv * g_v, the scores, softmax and weighted sum: the core
        # moves the gates where they cost least (see shaq.nn.attention_core).
        p = self.dropout if self.training else 0.0
        return gated_attention(q, keys_values, g_q, g_k, g_v, p, frozen, return_weights)
