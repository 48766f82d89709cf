"""ShatterLM: a causal byte-level language model of Shatter blocks (shaq.nn.ShatterAttention).

Shatter (Tian, Maynez and Parikh, 2021, arXiv 2108.13032) is a Transformer encoder whose single
attention head softly partitions the relative positions [paper]. Of the paper only the abstract
and introduction could be read; the model below is our causal adaptation, and the labels say
whose each choice is ([paper], [secondary], [ours]: see `shaq.nn.shatter`). One block::

    a = LN_att(x)                                a is also what enters the memory
    h = x + Drop(ShatterAttention(a, [memory; a]))
    y = h + Drop(FF(LN_ff(h)))                   FF: a GELU MLP, or SHA-RNN's Boom

and the model: bytes -> embedding -> Drop -> blocks -> LN_final -> Drop -> tied softmax.

- pre-LayerNorm residual blocks, a final LayerNorm, the embedding tied to the softmax [ours];
- no recurrence and no absolute positions: a byte's position enters only through the causal
  mask and the partitions of the relative position [ours];
- every block attends, over a memory of earlier normalised states carried from segment to
  segment as SHA-RNN's attention does: before a segment of length T a block keeps the last
  memory_len - T of them [ours];
- the feed-forward layer: a GELU MLP d -> N d -> d by default (a Transformer's), or SHA-RNN's
  Boom (the N chunks summed, no down-projection) [ours]; GELU is SHA-RNN's sigmoid form;
- SHA-RNN's initialisation (`_ByteLM.init_weights`: N(0, 0.1/sqrt(d)), LayerNorm eps 1e-12) and
  its three dropouts (input, hidden, output), the hidden one also on the attention weights [ours].

The model keeps the interface of shaq.models: ``model(x [B, T], state=None, targets=None,
return_attention=False) -> ModelOutput``, with a `State` of no recurrent layers (rnn=[]) and one
memory per block.
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from shaq.byte_lm import ModelConfig, ModelOutput, State, _ByteLM, common_problems
from shaq.nn import Boom, ShatterAttention
from shaq.nn.dropout import Dropout


@dataclass
class ShatterConfig(ModelConfig):
    """Everything that fixes the shape of a ShatterLM. Presets: `paper()`, `cpu()`, `smoke()`.

    `memory_len` bounds how many positions a query may see (before a segment of length T each
    block's memory is trimmed to memory_len - T positions), and is the horizon R of the
    partitions: from distance R on, all weight is on the last one.
    """

    vocab_size: int = 256
    d_model: int = 1024
    n_layers: int = 4
    n_partitions: int = 3  # K, the soft partitions (and value matrices) of each attention
    memory_len: int = 5000
    ff: str = "mlp"  # "mlp": Linear d -> N d, GELU, Linear N d -> d; "boom": SHA-RNN's Boom
    ff_expansion: int = 4  # N
    softmax: bool = False  # normalise the attention with a softmax instead of the biased sigmoid
    dropout_input: float = 0.1  # on the embeddings
    dropout_hidden: float = 0.1  # attention weights, inside the FF, each residual branch
    dropout_output: float = 0.1  # before the tied softmax

    def __post_init__(self):
        problems = common_problems(self)
        for name in ("n_partitions", "ff_expansion"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.memory_len < 1:
            problems.append(
                "memory_len must be >= 1 (it is also the partitions' horizon), got "
                f"{self.memory_len}"
            )
        if self.ff not in ("mlp", "boom"):
            problems.append(f"ff must be 'mlp' or 'boom', got {self.ff!r}")
        if problems:
            raise ValueError("invalid ShatterConfig: " + "; ".join(problems))

    @classmethod
    def paper(cls, **overrides) -> "ShatterConfig":
        """About the SHA-RNN's size: its 4 blocks, 1024 wide, memory 5000; MLP 4096 [ours]."""
        return cls(**overrides)

    @classmethod
    def cpu(cls, **overrides) -> "ShatterConfig":
        """About SHAQ's cpu preset in size: 2 blocks, 256 wide, memory 1024, MLP 2d, no dropout
        [ours]."""
        return replace(
            cls(
                d_model=256,
                n_layers=2,
                memory_len=1024,
                ff_expansion=2,
                dropout_input=0.0,
                dropout_hidden=0.0,
                dropout_output=0.0,
            ),
            **overrides,
        )

    @classmethod
    def smoke(cls, **overrides) -> "ShatterConfig":
        """Runs a few steps in seconds: 2 blocks, 64 wide, memory 128."""
        return replace(
            cls(
                d_model=64,
                n_layers=2,
                memory_len=128,
                dropout_input=0.0,
                dropout_hidden=0.0,
                dropout_output=0.0,
            ),
            **overrides,
        )


class ShatterBlock(nn.Module):
    """One pre-LayerNorm block: Shatter attention over [memory; segment], then the FF layer."""

    def __init__(self, config: ShatterConfig):
        super().__init__()
        d = config.d_model
        self.config = config
        self.ln_att = nn.LayerNorm(d, eps=1e-12)
        self.attention = ShatterAttention(
            d,
            config.memory_len,
            config.n_partitions,
            softmax=config.softmax,
            dropout=config.dropout_hidden,
        )
        self.ln_ff = nn.LayerNorm(d, eps=1e-12)
        # Boom without its shortcut is the ordinary two-Linear MLP.
        self.ff = Boom(
            d, config.ff_expansion, dropout=config.dropout_hidden, shortcut=config.ff == "boom"
        )
        self.drop = Dropout(config.dropout_hidden)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor | None, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [B, T, d], memory [B, M, d] or None -> (y [B, T, d], new memory [B, M', d], weights
        [B, T, M'' + T] or None), with M'' <= memory_len - T the part of the memory kept."""
        a = self.ln_att(x)  # [B, T, d]
        keep = max(self.config.memory_len - x.shape[1], 0)
        if memory is not None and keep > 0:
            kv = torch.cat([memory[:, -keep:].to(a.dtype), a], dim=1)  # [B, M'' + T, d]
        else:
            kv = a
        y, weights = self.attention(a, kv, return_weights=return_attention)
        h = x + self.drop(y)
        h = h + self.drop(self.ff(self.ln_ff(h)))
        return h, kv[:, -self.config.memory_len :], weights


class ShatterLM(_ByteLM):
    """A stack of Shatter blocks with a tied embedding and softmax (see the module docstring)."""

    name = "shatter"
    config_class = ShatterConfig

    def __init__(self, config: ShatterConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(ShatterBlock(config) for _ in range(config.n_layers))
        self.ln_final = nn.LayerNorm(config.d_model, eps=1e-12)
        self.init_weights()

    def recurrent_layers(self) -> list[nn.Module]:
        return []

    def check_state(self, state: State, batch_size: int) -> None:
        """Raise ValueError unless `state` was made by a model of this shape for this batch size."""
        if not isinstance(state, State):
            raise ValueError(
                "state must be a shaq.models.State (from a previous output), got "
                f"{type(state).__name__}"
            )
        if state.rnn or len(state.memory) != len(self.blocks):
            raise ValueError(
                f"state has {len(state.rnn)} recurrent layers and {len(state.memory)} memories, "
                f"this model has none and {len(self.blocks)}: it comes from another model; start "
                "with state=None"
            )
        d = self.config.d_model
        for i, memory in enumerate(state.memory):
            if not isinstance(memory, torch.Tensor) or memory.dim() != 3:
                raise ValueError(
                    f"memory of block {i} must be a [B, M, {d}] tensor: it comes from "
                    "another model; start with state=None"
                )
            if memory.shape[0] != batch_size or memory.shape[2] != d:
                raise ValueError(
                    f"memory of block {i} has shape {tuple(memory.shape)}, expected "
                    f"({batch_size}, M, {d}): it comes from another batch size or model; start "
                    "with state=None"
                )

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        targets: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> ModelOutput:
        """x [B, T] bytes -> ModelOutput (logits [B, T, 256], loss, state, attention: one
        [B, T, M + T] per block when asked for)."""
        x = self.check_inputs(x, targets, state)
        h = self.drop_input(self.embedding(x))  # [B, T, d]
        memories, attention = [], []
        for i, block in enumerate(self.blocks):
            memory = state.memory[i] if state is not None else None
            h, memory, weights = block(h, memory, return_attention)
            memories.append(memory)
            attention.append(weights)
        logits, loss = self.logits_and_loss(self.ln_final(h), targets)
        state = State(rnn=[], memory=memories)
        return ModelOutput(logits, loss, state, attention if return_attention else None)
