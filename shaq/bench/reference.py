"""`ReferenceStyleSHARNN`: SHA-RNN computed the way the original sha-rnn code computes it.

The benchmark's baseline. shaq's SHARNN computes the same function (tests/test_bench.py checks
it, weights copied across) in a faster way; timing both, side by side, measures what shaq's way
of computing gains, apart from anything the model's definition changes.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from shaq.models import SHARNN, SHARNNConfig
from shaq.nn import Overparam

# An nn.LSTM's (h, c), each [1, B, d].
LSTMState = tuple[torch.Tensor, torch.Tensor]


class ReferenceStyleAttention(nn.Module):
    """SHA-RNN's attention computed the way the original code does, time-major.

    Explicit matmuls; the additive mask [T, M + T] (zeros over the memory, -inf above the
    diagonal of the segment) is added to the full score matrix; dropout on q, on v and on
    the whole [T, M + T] probability matrix; q is projected, cast to float32 and
    layer-normalised. Parameter names follow shaq's SingleHeadAttention so weights copy over.
    """

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.query = nn.Linear(d_model, d_model)
        self.query_norm = nn.LayerNorm(d_model, eps=1e-12)
        self.qs = nn.Parameter(torch.zeros(d_model))
        self.ks = nn.Parameter(torch.zeros(d_model))
        self.vs = nn.Parameter(torch.zeros(d_model))
        self.value_gate = Overparam(d_model)

    def forward(
        self, query: torch.Tensor, keys_values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """query [T, B, d], keys_values [S, B, d], mask [T, S] additive -> [T, B, d]."""
        d = query.shape[-1]
        q = self.query_norm(self.query(query).float()) * torch.sigmoid(self.qs)
        k = keys_values * torch.sigmoid(self.ks)
        v = keys_values * self.value_gate(torch.sigmoid(self.vs))
        q = F.dropout(q, self.dropout, self.training)
        v = F.dropout(v, self.dropout, self.training)
        scores = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)) / math.sqrt(d)  # [B, T, S]
        weights = F.softmax(scores + mask, dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return torch.matmul(weights, v.transpose(0, 1)).transpose(0, 1)  # [T, B, d]


class ReferenceStyleBoom(nn.Module):
    """Boom as the original computes it: Linear, x * sigmoid(1.702 x), dropout, chunk sum."""

    def __init__(self, d_model: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.d_model, self.dropout = d_model, dropout
        self.up = nn.Linear(d_model, expansion * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> [..., d]: the expanded activations, cut into d-wide chunks, summed."""
        u = self.up(x)
        u = F.dropout(
            u * torch.sigmoid(1.702 * u), self.dropout, self.training
        )  # the original's GELU, as written
        return u.view(*u.shape[:-1], -1, self.d_model).sum(dim=-2)


class ReferenceStyleBlock(nn.Module):
    """One time-major SHA-RNN block (LSTM, optional attention, Boom); see shaq.models."""

    def __init__(self, config: SHARNNConfig, use_attention: bool) -> None:
        super().__init__()
        d, p = config.d_model, config.dropout_hidden
        self.dropout = p
        self.ln_start = nn.LayerNorm(d, eps=1e-12)
        self.rnn = nn.LSTM(d, d)
        self.attention = None
        if use_attention:
            self.ln_mid = nn.LayerNorm(d, eps=1e-12)
            self.ln_mem = nn.LayerNorm(d, eps=1e-12)
            self.attention = ReferenceStyleAttention(d, p)
        self.ln_xff = nn.LayerNorm(d, eps=1e-12)
        self.ln_ff = nn.LayerNorm(d, eps=1e-12)
        self.boom = ReferenceStyleBoom(d, config.boom_expansion, p)

    def forward(
        self,
        x: torch.Tensor,
        hidden: LSTMState | None,
        memory: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, LSTMState, torch.Tensor | None]:
        """x [T, B, d] -> (y [T, B, d], hidden, memory [M', B, d] or None)."""
        h, hidden = self.rnn(self.ln_start(x), hidden)
        h = F.dropout(h, self.dropout, self.training)
        if self.attention is not None:
            a, m = self.ln_mid(h), self.ln_mem(h)
            memory = m if memory is None else torch.cat([memory, m], dim=0)
            y = self.attention(a, memory, mask)
            h = F.dropout(y, self.dropout, self.training) + a
        h = self.ln_ff(h) + F.dropout(self.boom(self.ln_xff(h)), self.dropout, self.training)
        return h, hidden, memory


class ReferenceStyleSHARNN(nn.Module):
    """A re-creation, from the architecture description alone, of how the original sha-rnn
    code computes a training step: the baseline that shaq's SHARNN is measured against.

    Same function as `shaq.models.SHARNN` (a test checks it, weights copied across), but
    computed as the original does: time-major [T, B, d] tensors throughout, nn.LSTM without
    batch_first, the attention of `ReferenceStyleAttention` with an additive mask built for
    the full memory span, plain nn.LayerNorm (the original used apex's), plain float32
    matmuls. LSTM only (the original had no QRNN).

    forward(x [T, B], hidden, memory, targets [T, B]) -> (logits [T, B, V], loss, hidden, memory)
    where hidden is a list of (h, c) pairs [1, B, d] and memory a list of [M, B, d] or None.
    """

    def __init__(self, config: SHARNNConfig) -> None:
        super().__init__()
        if config.rnn != "lstm" or not config.overparam or not config.boom_shortcut:
            raise ValueError(
                "ReferenceStyleSHARNN re-creates the original: LSTM, Overparam, Boom shortcut"
            )
        self.config = config
        attention = set(config.attention_blocks)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.blocks = nn.ModuleList(
            ReferenceStyleBlock(config, i in attention) for i in range(config.n_layers)
        )
        self.init_weights()

    def init_weights(self) -> None:
        """The original's rule: Linear and Embedding weights N(0, 0.1 / sqrt(d)), biases 0;
        the LSTM keeps PyTorch's default; LayerNorms keep gain 1 and bias 0."""
        std = 0.1 / math.sqrt(self.config.d_model)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @classmethod
    def from_sharnn(cls, model: SHARNN) -> "ReferenceStyleSHARNN":
        """A reference-style model holding a copy of `model`'s weights."""
        ref = cls(model.config)
        ref.load_state_dict(model.state_dict())
        return ref.to(next(model.parameters()).device)

    def forward(
        self,
        x: torch.Tensor,
        hidden: list[LSTMState | None] | None = None,
        memory: list[torch.Tensor | None] | None = None,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[LSTMState], list[torch.Tensor | None]]:
        """One segment, time-major: see the class docstring."""
        c = self.config
        T = x.shape[0]
        hidden = hidden or [None] * len(self.blocks)
        memory = memory or [None] * len(self.blocks)
        # Before the segment, keep the last memory_len - T positions of each memory.
        keep = max(c.memory_len - T, 0)
        memory = [m[-keep:] if m is not None and keep > 0 else None for m in memory]
        M = max((m.shape[0] for m in memory if m is not None), default=0)
        causal = torch.full((T, T), float("-inf"), device=x.device).triu(diagonal=1)
        mask = torch.cat([torch.zeros(T, M, device=x.device), causal], dim=1)  # [T, M + T]
        h = F.dropout(self.embedding(x), c.dropout_input, self.training)
        new_hidden, new_memory = [], []
        for block, hid, mem in zip(self.blocks, hidden, memory, strict=True):
            h, hid, mem = block(h, hid, mem, mask)
            new_hidden.append(hid)
            new_memory.append(
                mem[-c.memory_len :] if mem is not None and c.memory_len > 0 else None
            )
        h = F.dropout(h, c.dropout_output, self.training)
        logits = F.linear(h, self.embedding.weight, self.decoder_bias)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, c.vocab_size).float(), targets.reshape(-1))
        return logits, loss, new_hidden, new_memory
