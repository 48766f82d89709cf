"""Shatter's single-head attention with soft partitions of the relative position, made causal.

Shatter (Tian, Maynez and Parikh, 2021, arXiv 2108.13032) is a Transformer encoder with one
attention head that "softly partition[s] the space of relative positions and appl[ies] different
value matrices to different parts of the sequence". Only the paper's abstract and introduction
could be read; its equations and code could not. Every choice below is labelled:

    [paper]      stated in the abstract or introduction;
    [secondary]  from a reading note of the paper (rosinality/ml-papers), not checked against it;
    [ours]       our reading, for a causal byte-level language model with a memory.

The attention, for query i of the segment and key j of [memory; segment]::

    q_i   = W_q h_i + b_q                              query projection only, no key one
    a_ij  = sigmoid(q_i . h_j / sqrt(d) + c)           for j <= i (causal), else 0
    y_i   = sum_k sum_j a_ij pi_k(i - j) (h_j W_v^k)   one value matrix per partition

    pi_k(r) = C(K-1, k) t^k (1 - t)^(K-1-k),  t(r) = clamp(log(1 + r) / log(1 + R), 0, 1)

The K partitions pi_k are the Bernstein polynomials of degree K - 1 in a log-scaled distance t:
non-negative and summing to 1 at every distance, pi_0 holds distance 0, pi_(K-1) everything at
R or beyond, and the ones between peak in turn. Read as matrices, with A = [a_ij], Pi_k =
[pi_k(i - j)] and H the keys (the states themselves)::

    Y = [(A * Pi_1) H, ..., (A * Pi_K) H] [W_v^1; ...; W_v^K]

one matmul with the stacked value matrices, and that is how `ShatterAttention` computes it:
the K weighted sums are over the (possibly long) memory but only d wide, and the value matrices
then act on T rows instead of on every memory position.

Choices:

- one head; soft partitions of the relative position, a value matrix for each [paper];
- the attention weights multiplied elementwise by polynomials of the relative position, a
  sigmoid in place of the softmax, no key projection [secondary];
- causal over a carried memory of earlier states, as in SHA-RNN, for a decoder where the paper
  has an encoder [ours];
- K = 3 by default: with no output projection the attention then holds (K + 1) d^2 weights,
  as many as multi-head attention's 4 d^2 [ours];
- the partitions: Bernstein polynomials in the log distance t(r) above, fixed (not learned),
  R = the memory length (the farthest a query sees) [ours];
- the sigmoid's bias c: one learned scalar started at -log R, so that a query's weights over a
  full context of R keys start summing to about 1 (sigmoid attention needs such a bias:
  Ramapuram et al. 2024, arXiv 2409.04431, use -log n fixed) [ours]; `softmax=True` normalises
  instead, for the ablation (it has no c) [ours];
- scores scaled by 1/sqrt(d); a bias on the query, none on the values; no LayerNorm or gates on
  the query; no output projection; no absolute positions [ours];
- dropout on the attention weights (after taking them for `return_weights`), as SHA-RNN drops
  out its probabilities [ours].
"""

import math

import torch
from torch import Tensor, nn

from shaq.nn.dropout import dropout
from shaq.nn.onednn import Linear


def relative_distances(T: int, S: int, device: torch.device | str | None = None) -> Tensor:
    """r [T, S]: how far key j lies behind query i, r_ij = (S - T + i) - j [ours: the layout].

    The T queries are the last T of the S keys (the segment after a memory of S - T), so
    r >= 0 for every key a query may see and r < 0 for the future.
    """
    query_positions = torch.arange(S - T, S, device=device).unsqueeze(1)  # [T, 1]
    key_positions = torch.arange(S, device=device).unsqueeze(0)  # [1, S]
    return query_positions - key_positions


def partitions(
    distance: Tensor, n_partitions: int, horizon: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """pi ``[K, *distance.shape]`` in `dtype`: the K soft partitions of the distances r [ours].

    pi_k(r) = C(K-1, k) t^k (1 - t)^(K-1-k) with t(r) = clamp(log(1 + r) / log(1 + R), 0, 1),
    R = `horizon`: the Bernstein basis of degree K - 1, so the K values are >= 0 and sum to 1
    at every distance. K = 1 is the constant 1 (no partitioning). A negative r (the future,
    which the attention masks anyway) counts as 0.
    """
    if n_partitions < 1 or horizon < 1:
        raise ValueError(
            f"partitions need n_partitions >= 1 and horizon >= 1, got {n_partitions} and {horizon}"
        )
    t = (torch.log1p(distance.clamp(min=0).to(dtype)) / math.log1p(horizon)).clamp(max=1.0)
    degree = n_partitions - 1
    pi = [math.comb(degree, k) * t**k * (1 - t) ** (degree - k) for k in range(n_partitions)]
    return torch.stack(pi)


class ShatterAttention(nn.Module):
    """One head over [memory; segment], softly partitioned by relative position (module docstring).

    y_i = sum_k sum_j a_ij pi_k(i - j) (h_j W_v^k),  a_ij = sigmoid(q_i . h_j / sqrt(d) + c), j <= i

    Args:
        d_model: width d of the states, queries and output.
        horizon: R, the distance from which all weight is on the last partition; the model uses
            its memory length (the farthest a query sees). It also starts c at -log R [ours].
        n_partitions: K, the number of soft partitions and value matrices [ours: 3].
        softmax: normalise the scores with a softmax over the visible keys instead of the
            sigmoid with bias c (the ablation) [ours].
        dropout: dropout probability on the attention weights in training [ours].

    Parameters: `query` (W_q, b_q), `value` (the K stacked value matrices, no bias: its weight
    [d, K d] holds W_v^k transposed in columns k d .. (k + 1) d), and `bias` (c, sigmoid only).
    """

    def __init__(
        self,
        d_model: int,
        horizon: int,
        n_partitions: int = 3,
        softmax: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if d_model < 1 or n_partitions < 1 or horizon < 1:
            raise ValueError(
                f"ShatterAttention needs d_model, n_partitions and horizon >= 1, got "
                f"{d_model}, {n_partitions} and {horizon}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.n_partitions = n_partitions
        self.horizon = horizon
        self.softmax = softmax
        self.dropout = dropout
        self.query = Linear(d_model, d_model)
        self.value = Linear(n_partitions * d_model, d_model, bias=False)
        self.bias = None if softmax else nn.Parameter(torch.tensor(-math.log(horizon)))

    def weights(self, query: Tensor, keys: Tensor) -> Tensor:
        """a [B, T, S]: sigmoid(q_i . h_j / sqrt(d) + c), or the softmax, 0 for future keys."""
        T, S = query.shape[1], keys.shape[1]
        q = self.query(query)  # [B, T, d]
        scores = q @ keys.transpose(1, 2) / math.sqrt(self.d_model)  # [B, T, S]
        future = relative_distances(T, S, query.device) < 0
        # -inf gives weight 0 under both the sigmoid and the softmax, and no gradient.
        scores = scores.masked_fill(future, float("-inf"))
        if self.softmax:
            return torch.softmax(scores, dim=-1)
        return torch.sigmoid(scores + self.bias)

    def forward(
        self, query: Tensor, keys_values: Tensor, return_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from the segment over memory plus segment.

        Args:
            query: [B, T, d], the (normalised) states of the current segment.
            keys_values: [B, M + T, d], the memory (M earlier positions) followed by the T
                positions of the segment: the keys h_j, and what the value matrices map.
            return_weights: also return the attention weights a.

        Returns:
            y [B, T, d] and, if asked, a [B, T, M + T] (before the partitions and dropout; with
            the sigmoid a row does not sum to 1).
        """
        self.check_inputs(query, keys_values)
        T, S = query.shape[1], keys_values.shape[1]
        a = self.weights(query, keys_values)  # [B, T, S]
        weights = a if return_weights else None
        a = dropout(a, self.dropout, self.training)
        r = relative_distances(T, S, query.device)
        pi = partitions(r, self.n_partitions, self.horizon, a.dtype)  # [K, T, S]
        z = (a.unsqueeze(1) * pi) @ keys_values.unsqueeze(1)  # [B, K, T, d]: (A * Pi_k) H
        y = self.value(z.transpose(1, 2).flatten(2))  # [B, T, K d] [W_v^1; ...; W_v^K] -> [B, T, d]
        return y, weights

    def check_inputs(self, query: Tensor, keys_values: Tensor) -> None:
        """Raise ValueError unless query is [B, T, d] and keys_values [B, S >= T, d]."""
        for name, x in (("query", query), ("keys_values", keys_values)):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"{name} must be [B, T, {self.d_model}] (batch-first), got {shape}"
                )
        if keys_values.shape[0] != query.shape[0]:
            raise ValueError(
                f"query and keys_values must have the same batch size, got "
                f"{query.shape[0]} and {keys_values.shape[0]}"
            )
        if keys_values.shape[1] < query.shape[1]:
            raise ValueError(
                f"keys_values must hold at least the {query.shape[1]} segment "
                "positions (memory first, then the segment), got "
                f"{keys_values.shape[1]}"
            )
