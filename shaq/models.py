"""SHA-RNN, SHAQ and a plain LSTM baseline: byte-level language models over 256 symbols.

One block of SHA-RNN (Merity, 2019), with every LayerNorm its own::

    u = LN_start(x)
    h = Drop(RNN(u))                            no residual around the recurrent layer
    if the block has attention:
        a = LN_mid(h); m = LN_mem(h)            m is also what enters the memory
        h = Drop(Attention(a, [memory; m])) + a
    h = LN_ff(h) + Drop(Boom(LN_xff(h)))

The residual bases are the *normalised* values (a and LN_ff(h)), exactly as in the reference:
the stream is re-normalised at every sub-layer. SHAQ is the same model with a QRNN in place of
every LSTM. All three models share one interface::

    model(x [B, T], state=None, targets=None, return_attention=False) -> ModelOutput

and carry their recurrent states and attention memories in a `State` from segment to segment.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from shaq.nn import LSTM, QRNN, Boom, Linear, LSTMState, QRNNState, SingleHeadAttention
from shaq.nn.dropout import Dropout


# ----------------------------------------------------------------------------- config


@dataclass
class SHARNNConfig:
    """Everything that fixes the shape of a model. Presets: `paper()`, `cpu()`, `smoke()`.

    `attention_layers=None` means the reference's choice: one attention, in the second-to-last
    block (block 0 when there is only one). `memory_len` bounds how many positions a query
    may see: before a segment of length T the memory is trimmed to memory_len - T positions.
    """

    vocab_size: int = 256
    d_model: int = 1024
    n_layers: int = 4
    boom_expansion: int = 4
    attention_layers: tuple[int, ...] | None = None
    memory_len: int = 5000
    dropout_input: float = 0.1  # on the embeddings (the reference's `dropouti`)
    dropout_hidden: float = 0.1  # inside every block (`dropouth`)
    dropout_output: float = 0.1  # before the tied softmax (`dropout`)
    rnn: str = "lstm"  # filled in by the model (SHARNN, LSTMLM: "lstm"; SHAQ: "qrnn"), never chosen apart
    qrnn_window: int = 1
    overparam: bool = True  # over-parameterised value gate in the attention
    boom_shortcut: bool = True  # Boom sums its chunks instead of a second Linear

    def __post_init__(self):
        if self.attention_layers is not None:
            self.attention_layers = tuple(int(i) for i in self.attention_layers)
        problems = []
        if self.vocab_size != 256:
            problems.append(f"vocab_size must be 256 (bytes), got {self.vocab_size}")
        if self.d_model < 1:
            problems.append(f"d_model must be >= 1, got {self.d_model}")
        if self.n_layers < 1:
            problems.append(f"n_layers must be >= 1, got {self.n_layers}")
        if self.boom_expansion < 1:
            problems.append(f"boom_expansion must be >= 1, got {self.boom_expansion}")
        if self.memory_len < 0:
            problems.append(f"memory_len must be >= 0 (0 = no memory beyond the segment), got {self.memory_len}")
        for name in ("dropout_input", "dropout_hidden", "dropout_output"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                problems.append(f"{name} must be in [0, 1), got {p}")
        if self.rnn not in ("lstm", "qrnn"):
            problems.append(f"rnn must be 'lstm' or 'qrnn', got {self.rnn!r}")
        if self.qrnn_window not in (1, 2):
            problems.append(f"qrnn_window must be 1 or 2, got {self.qrnn_window}")
        for i in self.attention_layers or ():
            if not 0 <= i < self.n_layers:
                problems.append(f"attention layer {i} does not exist in a {self.n_layers}-block model")
        if problems:
            raise ValueError("invalid SHARNNConfig: " + "; ".join(problems))

    @property
    def attention_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks that have attention."""
        if self.attention_layers is not None:
            return self.attention_layers
        return (max(self.n_layers - 2, 0),)

    @classmethod
    def paper(cls, **overrides) -> "SHARNNConfig":
        """The released SHA-RNN: 4 blocks, 1024 wide, Boom 4096, one attention, memory 5000."""
        return cls(**overrides)

    @classmethod
    def cpu(cls, **overrides) -> "SHARNNConfig":
        """Trains meaningfully in minutes on 2 CPU cores: 3 blocks, 256 wide, memory 1024."""
        return replace(cls(d_model=256, n_layers=3, memory_len=1024, dropout_input=0.0,
                           dropout_hidden=0.0, dropout_output=0.0), **overrides)

    @classmethod
    def smoke(cls, **overrides) -> "SHARNNConfig":
        """Runs a few steps in seconds: 2 blocks, 64 wide, memory 128."""
        return replace(cls(d_model=64, n_layers=2, memory_len=128, dropout_input=0.0,
                           dropout_hidden=0.0, dropout_output=0.0), **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> "SHARNNConfig":
        """A preset by name: 'paper', 'cpu' or 'smoke'."""
        presets = {"paper": cls.paper, "cpu": cls.cpu, "smoke": cls.smoke}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**overrides)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["attention_layers"] = list(d["attention_layers"]) if d["attention_layers"] is not None else None
        return d


# ----------------------------------------------------------------------------- state


@dataclass
class State:
    """What a model carries from one segment to the next.

    Attributes:
        rnn: one entry per recurrent layer, an `LSTMState` or a `QRNNState`.
        memory: one entry per block: [B, M, d] normalised states of earlier positions for blocks
            with attention, None for the others.
    """

    rnn: list[LSTMState | QRNNState]
    memory: list[torch.Tensor | None] = field(default_factory=list)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "State":
        """This state with `fn` applied to every tensor: a detach, a move, one process's rows, ..."""
        return State(rnn=[type(layer)(*map(fn, layer)) for layer in self.rnn],
                     memory=[None if m is None else fn(m) for m in self.memory])

    def to_dict(self) -> dict:
        """Plain dicts and lists of tensors, e.g. rnn [{"kind": "LSTMState", "h": .., "c": ..}]."""
        return {"rnn": [{"kind": type(layer).__name__, **layer._asdict()} for layer in self.rnn],
                "memory": list(self.memory)}

    @classmethod
    def from_dict(cls, saved: dict) -> "State":
        """The State that `to_dict` gave."""
        kinds = {kind.__name__: kind for kind in (LSTMState, QRNNState)}
        rnn = [kinds[layer["kind"]](*(layer[name] for name in kinds[layer["kind"]]._fields)) for layer in saved["rnn"]]
        return cls(rnn=rnn, memory=list(saved["memory"]))


def detach(state: State | None) -> State | None:
    """Cut the autograd graph of a state (truncated backpropagation through time)."""
    return None if state is None else state.map(torch.Tensor.detach)


@dataclass
class ModelOutput:
    """logits [B, T, 256]; loss: mean cross-entropy in nats per byte (None without targets);
    state: to pass to the next segment; attention: one [B, T, M + T] tensor per attention
    layer when asked for, else None."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    state: State
    attention: list[torch.Tensor] | None = None


# ----------------------------------------------------------------------------- blocks


class SHABlock(nn.Module):
    """One SHA-RNN block (see the module docstring); `rnn` picks LSTM or QRNN."""

    def __init__(self, config: SHARNNConfig, use_attention: bool):
        super().__init__()
        d = config.d_model
        self.config = config
        self.ln_start = nn.LayerNorm(d, eps=1e-12)
        if config.rnn == "lstm":
            self.rnn = LSTM(d, d)
        else:
            self.rnn = QRNN(d, d, window=config.qrnn_window)
        self.drop = Dropout(config.dropout_hidden)
        self.attention = None
        if use_attention:
            self.ln_mid = nn.LayerNorm(d, eps=1e-12)
            self.ln_mem = nn.LayerNorm(d, eps=1e-12)
            self.attention = SingleHeadAttention(d, dropout=config.dropout_hidden, overparam=config.overparam)
        self.ln_xff = nn.LayerNorm(d, eps=1e-12)
        self.ln_ff = nn.LayerNorm(d, eps=1e-12)
        self.boom = Boom(d, config.boom_expansion, dropout=config.dropout_hidden, shortcut=config.boom_shortcut)

    def forward(self, x, rnn_state, memory, return_attention):
        """x [B, T, d] -> (y [B, T, d], new rnn_state, new memory [B, M', d] or None, weights or None)."""
        u = self.ln_start(x)
        h, rnn_state = self.rnn(u, rnn_state)
        h = self.drop(h)
        weights = None
        if self.attention is not None:
            a = self.ln_mid(h)
            m = self.ln_mem(h)  # [B, T, d]
            T = x.shape[1]
            keep = max(self.config.memory_len - T, 0)
            frozen = 0
            if memory is not None and keep > 0:
                kv = torch.cat([memory[:, -keep:].to(m.dtype), m], dim=1)  # [B, M + T, d]
                # A detached memory (as between training segments) needs no gradient: the
                # attention then skips most of its backward work for keys and values.
                frozen = 0 if memory.requires_grad else kv.shape[1] - T
            else:
                kv = m
            y, weights = self.attention(a, kv, return_weights=return_attention, frozen=frozen)
            h = self.drop(y) + a
            memory = kv[:, -self.config.memory_len:] if self.config.memory_len > 0 else kv[:, :0]
        h = self.ln_ff(h) + self.drop(self.boom(self.ln_xff(h)))
        return h, rnn_state, memory, weights


# ----------------------------------------------------------------------------- models


class _ByteLM(nn.Module):
    """Shared parts: tied embedding/softmax, initialisation, input checks, the loss."""

    def __init__(self, config: SHARNNConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.drop_input = Dropout(config.dropout_input)
        self.drop_output = Dropout(config.dropout_output)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def init_weights(self) -> None:
        """The reference's initialisation: every Linear and the embedding N(0, 0.1/sqrt(d)),
        biases 0, LayerNorm gains 1 and biases 0. Recurrent layers keep PyTorch's default
        (the reference never touched its LSTM; our QRNN follows the LSTM there).

        Trap avoided: the reference's LayerNorms were apex modules its init rule did not
        match, so their gains stayed 1. Re-initialising torch LayerNorm gains like the
        Linears (std 0.003) would silently switch the network off.
        """
        std = 0.1 / math.sqrt(self.config.d_model)
        recurrent = {id(p) for m in self.modules() if isinstance(m, (nn.LSTM, QRNN)) for p in m.parameters()}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in recurrent:
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def check_inputs(self, x: torch.Tensor, targets: torch.Tensor | None, state: State | None) -> torch.Tensor:
        """Validate x (and targets, state) and return x as int64 [B, T]."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a tensor of byte values [B, T], got {type(x).__name__}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"x must hold integer byte values 0..255 (uint8 or int64), got dtype {x.dtype}")
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError(f"x must be [B, T] with T >= 1 (batch-first), got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8 and x.numel() and (x.min() < 0 or x.max() >= self.config.vocab_size):
            raise ValueError(f"x must hold byte values 0..255, got values in [{int(x.min())}, {int(x.max())}]")
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != x.shape:
                shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"targets must have the shape of x {tuple(x.shape)}, got {shape}")
            if targets.dtype.is_floating_point or targets.dtype == torch.bool:
                raise ValueError(f"targets must hold integer byte values, got dtype {targets.dtype}")
        if state is not None:
            self.check_state(state, x.shape[0])
        return x.long()

    def check_state(self, state: State, batch_size: int) -> None:
        """Raise ValueError unless `state` was made by a model of this shape for this batch size."""
        if not isinstance(state, State):
            raise ValueError(f"state must be a shaq.models.State (from a previous output), got {type(state).__name__}")
        rnns = self.recurrent_layers()
        if len(state.rnn) != len(rnns) or len(state.memory) != len(state.rnn):
            raise ValueError(
                f"state has {len(state.rnn)} recurrent layers, this model has {len(rnns)}: "
                "it comes from another model; start with state=None")
        for i, (pair, rnn) in enumerate(zip(state.rnn, rnns)):
            kind = LSTMState if isinstance(rnn, nn.LSTM) else QRNNState
            if not isinstance(pair, kind):
                raise ValueError(
                    f"state of layer {i} is a {type(pair).__name__}, this model's layer {i} needs a "
                    f"{kind.__name__}: the state comes from another model; start with state=None")
            a, b = pair
            hidden = rnn.hidden_size
            expected_b = hidden if isinstance(rnn, nn.LSTM) else rnn.input_size
            if a.shape != (batch_size, hidden) or b.shape != (batch_size, expected_b):
                raise ValueError(
                    f"state of layer {i} has shapes {tuple(a.shape)} and {tuple(b.shape)}, expected "
                    f"({batch_size}, {hidden}) and ({batch_size}, {expected_b}): it comes from another "
                    "batch size or model; start with state=None")

    def recurrent_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def logits_and_loss(self, h: torch.Tensor, targets: torch.Tensor | None):
        """Tied softmax: logits = h E^T + b. Loss in float32, mean nats per byte."""
        logits = Linear.functional(self.drop_output(h), self.embedding.weight, self.decoder_bias)  # [B, T, 256]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.long().flatten())
        return logits, loss


class SHARNN(_ByteLM):
    """SHA-RNN (Merity, 2019): blocks of [LSTM, optional single-head attention, Boom]."""

    name = "sharnn"

    def __init__(self, config: SHARNNConfig):
        check_model_choice(self.name, config)
        super().__init__(config)
        attention = set(config.attention_blocks)
        self.blocks = nn.ModuleList(SHABlock(config, i in attention) for i in range(config.n_layers))
        self.init_weights()

    def recurrent_layers(self) -> list[nn.Module]:
        return [block.rnn for block in self.blocks]

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        targets: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> ModelOutput:
        """x [B, T] bytes -> ModelOutput (logits [B, T, 256], loss, state, attention)."""
        x = self.check_inputs(x, targets, state)
        h = self.drop_input(self.embedding(x))  # [B, T, d]
        rnn_states, memories, attention = [], [], []
        for i, block in enumerate(self.blocks):
            rnn_state = state.rnn[i] if state is not None else None
            memory = state.memory[i] if state is not None else None
            h, rnn_state, memory, weights = block(h, rnn_state, memory, return_attention)
            rnn_states.append(rnn_state)
            memories.append(memory)
            if weights is not None:
                attention.append(weights)
        logits, loss = self.logits_and_loss(h, targets)
        return ModelOutput(logits, loss, State(rnn_states, memories), attention if return_attention else None)


class SHAQ(SHARNN):
    """SHAQ (Bharwani et al., 2021): SHA-RNN with a QRNN in place of every LSTM."""

    name = "shaq"

    def __init__(self, config: SHARNNConfig):
        super().__init__(replace(config, rnn="qrnn"))


class LSTMLM(_ByteLM):
    """A plain byte-level LSTM language model: embedding, n_layers LSTMs, tied softmax.

    Uses d_model as the hidden width and dropout_hidden between layers; no attention, no Boom.
    """

    name = "lstm"

    def __init__(self, config: SHARNNConfig):
        check_model_choice(self.name, config)
        super().__init__(config)
        d = config.d_model
        self.layers = nn.ModuleList(LSTM(d, d) for _ in range(config.n_layers))
        self.drop = Dropout(config.dropout_hidden)
        self.init_weights()

    def recurrent_layers(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        targets: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> ModelOutput:
        """x [B, T] bytes -> ModelOutput; attention is always None (there is none)."""
        x = self.check_inputs(x, targets, state)
        h = self.drop_input(self.embedding(x))
        rnn_states = []
        for i, lstm in enumerate(self.layers):
            h, rnn_state = lstm(h, state.rnn[i] if state is not None else None)
            if i < len(self.layers) - 1:
                h = self.drop(h)
            rnn_states.append(rnn_state)
        logits, loss = self.logits_and_loss(h, targets)
        return ModelOutput(logits, loss, State(rnn_states, [None] * len(rnn_states)), None)


MODELS = {"sharnn": SHARNN, "shaq": SHAQ, "lstm": LSTMLM}
# The recurrent layer is the model's choice: the name picks the model, and with it this.
RNN_OF_MODEL = {"sharnn": "lstm", "shaq": "qrnn", "lstm": "lstm"}


def check_model_choice(name: str, config: SHARNNConfig) -> None:
    """Raise ValueError if `config.rnn` contradicts the model `name` picks (SHAQ fills in its
    own "qrnn" over the default "lstm"; a SHA-RNN or LSTM asked for QRNNs is a mistake)."""
    if name == "shaq" or config.rnn == RNN_OF_MODEL[name]:
        return
    raise ValueError(
        f"model {name!r} has {RNN_OF_MODEL[name].upper()} layers but the config asks for rnn={config.rnn!r}: the "
        "model's name picks its recurrent layer (sharnn: LSTM, shaq: QRNN, lstm: LSTM); for QRNNs use 'shaq'")


def build_model(name: str, config: SHARNNConfig) -> nn.Module:
    """A model by name: 'sharnn', 'shaq' or 'lstm'."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](config)
