"""SHA-RNN, SHAQ, a plain LSTM baseline and Shatter: byte-level language models over 256 symbols.

One block of SHA-RNN (Merity, 2019), with every LayerNorm its own::

    u = LN_start(x)
    h = Drop(RNN(u))                            no residual around the recurrent layer
    if the block has attention:
        a = LN_mid(h); m = LN_mem(h)            m is also what enters the memory
        h = Drop(Attention(a, [memory; m])) + a
    h = LN_ff(h) + Drop(Boom(LN_xff(h)))

The residual bases are the *normalised* values (a and LN_ff(h)), exactly as in the reference:
the stream is re-normalised at every sub-layer. SHAQ is the same model with a QRNN in place of
every LSTM. All the models share one interface::

    model(x [B, T], state=None, targets=None, return_attention=False) -> ModelOutput

and carry their recurrent states and attention memories in a `State` from segment to segment.

What the models share (the config base, `State`, `ModelOutput`, the tied embedding and softmax,
the initialisation) is in `shaq.byte_lm`. Each model has its own config, a dataclass with
presets: `SHARNNConfig` (SHARNN and SHAQ), `LSTMConfig` (LSTMLM) and `ShatterConfig` (ShatterLM,
in `shaq.shatter`: attention without recurrence). The registry `MODELS` knows the models by name
('sharnn', 'shaq', 'lstm', 'shatter'); `model_config`, `config_from_dict` and `build_model` go
through it.
"""

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from shaq.byte_lm import ModelConfig, ModelOutput, State, _ByteLM, common_problems
from shaq.nn import LSTM, QRNN, Boom, SingleHeadAttention
from shaq.nn.dropout import Dropout
from shaq.shatter import ShatterLM

# ----------------------------------------------------------------------------- config


@dataclass
class SHARNNConfig(ModelConfig):
    """The shape of a SHA-RNN or a SHAQ. Presets: `paper()`, `cpu()`, `smoke()`.

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
    rnn: str = "lstm"  # filled in by the model (SHARNN: "lstm"; SHAQ: "qrnn"), never chosen apart
    qrnn_window: int = 1
    overparam: bool = True  # over-parameterised value gate in the attention
    boom_shortcut: bool = True  # Boom sums its chunks instead of a second Linear

    def __post_init__(self):
        if self.attention_layers is not None:
            self.attention_layers = tuple(int(i) for i in self.attention_layers)
        problems = common_problems(self)
        if self.boom_expansion < 1:
            problems.append(f"boom_expansion must be >= 1, got {self.boom_expansion}")
        if self.memory_len < 0:
            problems.append(
                f"memory_len must be >= 0 (0 = no memory beyond the segment), got {self.memory_len}"
            )
        if self.rnn not in ("lstm", "qrnn"):
            problems.append(f"rnn must be 'lstm' or 'qrnn', got {self.rnn!r}")
        if self.qrnn_window not in (1, 2):
            problems.append(f"qrnn_window must be 1 or 2, got {self.qrnn_window}")
        for i in self.attention_layers or ():
            if not 0 <= i < self.n_layers:
                problems.append(
                    f"attention layer {i} does not exist in a {self.n_layers}-block model"
                )
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
        """Trains meaningfully in minutes on 2 CPU cores: 2 blocks, 256 wide, memory 1024.

        The shape every model's cpu preset shares (LSTMConfig.cpu: the same width and depth;
        ShatterConfig.cpu: the same width and memory, sized to SHAQ's parameters), chosen for
        SHAQ in the sweep of TrainConfig.cpu: in equal time 2 blocks reached a lower validation
        bpb than 3, while widths 128 and 192 (of 3 blocks) and memory 512 did not beat 256 and
        1024."""
        return replace(
            cls(
                d_model=256,
                n_layers=2,
                memory_len=1024,
                dropout_input=0.0,
                dropout_hidden=0.0,
                dropout_output=0.0,
            ),
            **overrides,
        )

    @classmethod
    def smoke(cls, **overrides) -> "SHARNNConfig":
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


@dataclass
class LSTMConfig(ModelConfig):
    """The shape of an LSTMLM: d_model is the width of the embedding and of every LSTM layer.
    Presets: `paper()`, `cpu()`, `smoke()`, as wide and deep as SHARNNConfig's."""

    vocab_size: int = 256
    d_model: int = 1024
    n_layers: int = 4
    dropout_input: float = 0.1  # on the embeddings
    dropout_hidden: float = 0.1  # between LSTM layers
    dropout_output: float = 0.1  # before the tied softmax

    def __post_init__(self):
        problems = common_problems(self)
        if problems:
            raise ValueError("invalid LSTMConfig: " + "; ".join(problems))

    @classmethod
    def paper(cls, **overrides) -> "LSTMConfig":
        """SHA-RNN's paper size without attention or Boom: 4 LSTMs, 1024 wide."""
        return cls(**overrides)

    @classmethod
    def cpu(cls, **overrides) -> "LSTMConfig":
        """2 LSTMs, 256 wide, no dropout."""
        return replace(
            cls(d_model=256, n_layers=2, dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0),
            **overrides,
        )

    @classmethod
    def smoke(cls, **overrides) -> "LSTMConfig":
        """2 LSTMs, 64 wide, no dropout."""
        return replace(
            cls(d_model=64, n_layers=2, dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0),
            **overrides,
        )

    @classmethod
    def from_dict(cls, saved: dict) -> "LSTMConfig":
        """The config that `to_dict` gave. LSTMLMs saved before LSTMConfig existed have a whole
        SHARNNConfig as their config: its other fields, which LSTMLM never read, are dropped."""
        ours = {f.name for f in fields(cls)}
        extra = set(saved) - ours
        if extra and extra <= {f.name for f in fields(SHARNNConfig)}:
            saved = {key: value for key, value in saved.items() if key in ours}
        return cls(**saved)


# ----------------------------------------------------------------------------- state


def detach(state: State | None) -> State | None:
    """Cut the autograd graph of a state (truncated backpropagation through time)."""
    return None if state is None else state.map(torch.Tensor.detach)


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
            self.attention = SingleHeadAttention(
                d, dropout=config.dropout_hidden, overparam=config.overparam
            )
        self.ln_xff = nn.LayerNorm(d, eps=1e-12)
        self.ln_ff = nn.LayerNorm(d, eps=1e-12)
        self.boom = Boom(
            d, config.boom_expansion, dropout=config.dropout_hidden, shortcut=config.boom_shortcut
        )

    def forward(self, x, rnn_state, memory, return_attention):
        """x [B, T, d] -> (y [B, T, d], new rnn_state, new memory [B, M', d] or None, weights or
        None)."""
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
            memory = kv[:, -self.config.memory_len :] if self.config.memory_len > 0 else kv[:, :0]
        h = self.ln_ff(h) + self.drop(self.boom(self.ln_xff(h)))
        return h, rnn_state, memory, weights


# ----------------------------------------------------------------------------- models


class SHARNN(_ByteLM):
    """SHA-RNN (Merity, 2019): blocks of [LSTM, optional single-head attention, Boom]."""

    name = "sharnn"
    config_class = SHARNNConfig

    def __init__(self, config: SHARNNConfig):
        super().__init__(config)
        attention = set(config.attention_blocks)
        self.blocks = nn.ModuleList(
            SHABlock(config, i in attention) for i in range(config.n_layers)
        )
        self.init_weights()

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        super().check_config(config)
        check_model_choice(cls.name, config)

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
        return ModelOutput(
            logits, loss, State(rnn_states, memories), attention if return_attention else None
        )


class SHAQ(SHARNN):
    """SHAQ (Bharwani et al., 2021): SHA-RNN with a QRNN in place of every LSTM."""

    name = "shaq"

    def __init__(self, config: SHARNNConfig):
        self.check_config(config)
        super().__init__(replace(config, rnn="qrnn"))


class LSTMLM(_ByteLM):
    """A plain byte-level LSTM language model: embedding, n_layers LSTMs, tied softmax.

    Uses d_model as the hidden width and dropout_hidden between layers; no attention, no Boom.
    """

    name = "lstm"
    config_class = LSTMConfig

    def __init__(self, config: LSTMConfig):
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


# ----------------------------------------------------------------------------- the registry

# Every model by the name it goes by. A new model is its class (naming its config class) and a
# line here.
MODELS: dict[str, type[_ByteLM]] = {
    model.name: model
    for model in (
        SHARNN,
        SHAQ,
        LSTMLM,
        ShatterLM,
    )
}
# The recurrent layer is the model's choice: the name picks the model, and with it this.
RNN_OF_MODEL = {"sharnn": "lstm", "shaq": "qrnn", "lstm": "lstm"}


def check_model_choice(name: str, config: SHARNNConfig) -> None:
    """Raise ValueError if `config.rnn` contradicts the model `name` picks (SHAQ fills in its
    own "qrnn" over the default "lstm"; a SHA-RNN or LSTM asked for QRNNs is a mistake)."""
    if name == "shaq" or config.rnn == RNN_OF_MODEL[name]:
        return
    raise ValueError(
        f"model {name!r} has {RNN_OF_MODEL[name].upper()} layers but the config asks for "
        f"rnn={config.rnn!r}: the model's name picks its recurrent layer (sharnn: LSTM, shaq: "
        "QRNN, lstm: LSTM); for QRNNs use 'shaq'"
    )


def model_class(name: str) -> type[_ByteLM]:
    """The class of the model `name`: 'sharnn', 'shaq', 'lstm' or 'shatter'."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def model_config(name: str, preset: str, **overrides) -> ModelConfig:
    """The `preset` ('paper', 'cpu' or 'smoke') of model `name`'s config, with `overrides`."""
    config_class = model_class(name).config_class
    unknown = sorted(set(overrides) - {f.name for f in fields(config_class)})
    if unknown:
        raise ValueError(
            f"{config_class.__name__}, the config of model {name!r}, has no field "
            f"{', '.join(unknown)}; its fields: {', '.join(f.name for f in fields(config_class))}"
        )
    return config_class.preset(preset, **overrides)


def config_from_dict(name: str, saved: dict) -> ModelConfig:
    """Model `name`'s config from the dict its `to_dict` gave (a checkpoint's model_config)."""
    return model_class(name).config_class.from_dict(saved)


def build_model(name: str, config: ModelConfig) -> nn.Module:
    """A model by name: 'sharnn', 'shaq', 'lstm' or 'shatter'; ValueError if `config` is of
    another class."""
    return model_class(name)(config)
