"""What every byte-level language model of shaq shares: its config's base, the state it carries
from segment to segment, its output, and the base module (tied embedding and softmax, the
reference's initialisation, input checks, the loss).

A model (`shaq.models`: SHARNN, SHAQ, LSTMLM) subclasses `_ByteLM`, names its config class (a
dataclass subclassing `ModelConfig`) and keeps one interface::

    model(x [B, T], state=None, targets=None, return_attention=False) -> ModelOutput
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from shaq.nn import QRNN, Linear, LSTMState, QRNNState
from shaq.nn.dropout import Dropout

# ----------------------------------------------------------------------------- config


PRESETS = ("paper", "cpu", "smoke")


class ModelConfig:
    """What every model's config offers. A config is a dataclass of everything that fixes the
    shape of its model, with the presets `paper()`, `cpu()` and `smoke()` as classmethods."""

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A preset by name: 'paper', 'cpu' or 'smoke'."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return getattr(cls, name)(**overrides)

    def to_dict(self) -> dict:
        """The fields as plain values (tuples as lists), for config.json and checkpoints."""
        return {
            f.name: list(value) if isinstance(value := getattr(self, f.name), tuple) else value
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, saved: dict) -> "ModelConfig":
        """The config that `to_dict` gave; a key that is no field is a TypeError."""
        return cls(**saved)


def common_problems(config: ModelConfig) -> list[str]:
    """What is wrong with the fields every model's config has: vocab_size, d_model, n_layers and the
    three dropouts (dropout_input, dropout_hidden, dropout_output)."""
    problems = []
    if config.vocab_size != 256:
        problems.append(f"vocab_size must be 256 (bytes), got {config.vocab_size}")
    if config.d_model < 1:
        problems.append(f"d_model must be >= 1, got {config.d_model}")
    if config.n_layers < 1:
        problems.append(f"n_layers must be >= 1, got {config.n_layers}")
    for name in ("dropout_input", "dropout_hidden", "dropout_output"):
        p = getattr(config, name)
        if not 0.0 <= p < 1.0:
            problems.append(f"{name} must be in [0, 1), got {p}")
    return problems


# ----------------------------------------------------------------------------- state and output


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
        """This state with `fn` applied to every tensor: a detach, a move, one process's rows,
        ..."""
        return State(
            rnn=[type(layer)(*map(fn, layer)) for layer in self.rnn],
            memory=[None if m is None else fn(m) for m in self.memory],
        )

    def to_dict(self) -> dict:
        """Plain dicts and lists of tensors, e.g. rnn [{"kind": "LSTMState", "h": .., "c": ..}]."""
        return {
            "rnn": [{"kind": type(layer).__name__, **layer._asdict()} for layer in self.rnn],
            "memory": list(self.memory),
        }

    @classmethod
    def from_dict(cls, saved: dict) -> "State":
        """The State that `to_dict` gave."""
        kinds = {kind.__name__: kind for kind in (LSTMState, QRNNState)}
        rnn = [
            kinds[layer["kind"]](*(layer[name] for name in kinds[layer["kind"]]._fields))
            for layer in saved["rnn"]
        ]
        return cls(rnn=rnn, memory=list(saved["memory"]))


@dataclass
class ModelOutput:
    """logits [B, T, 256]; loss: mean cross-entropy in nats per byte (None without targets);
    state: to pass to the next segment; attention: one [B, T, M + T] tensor per attention
    layer when asked for, else None."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    state: State
    attention: list[torch.Tensor] | None = None


# ----------------------------------------------------------------------------- the base module


class _ByteLM(nn.Module):
    """Shared parts: tied embedding/softmax, initialisation, input checks, the loss.

    A model names its config class (`config_class`) and the name it goes by (`name`, as in
    `--model`); the registry, `shaq.models.MODELS`, lists the models by name."""

    name: str
    config_class: type[ModelConfig]

    def __init__(self, config: ModelConfig):
        self.check_config(config)
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.drop_input = Dropout(config.dropout_input)
        self.drop_output = Dropout(config.dropout_output)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        """Raise ValueError unless this model can be built from `config`."""
        if not isinstance(config, cls.config_class):
            wanted = cls.config_class.__name__
            raise ValueError(
                f"model {cls.name!r} ({cls.__name__}) is built from its config class {wanted}, not "
                f"{type(config).__name__}: make the config with {wanted}.smoke() (or cpu(), "
                f"paper()) or shaq.models.model_config({cls.name!r}, preset)"
            )

    def init_weights(self) -> None:
        """The reference's initialisation: every Linear and the embedding N(0, 0.1/sqrt(d)),
        biases 0, LayerNorm gains 1 and biases 0. Recurrent layers keep PyTorch's default
        (the reference never touched its LSTM; our QRNN follows the LSTM there, which trained
        better than the reference's rule applied to its gates: chapter 9 has the runs).

        Trap avoided: the reference's LayerNorms were apex modules its init rule did not
        match, so their gains stayed 1. Re-initialising torch LayerNorm gains like the
        Linears (std 0.003) would silently switch the network off.
        """
        std = 0.1 / math.sqrt(self.config.d_model)
        recurrent = {
            id(p) for m in self.modules() if isinstance(m, (nn.LSTM, QRNN)) for p in m.parameters()
        }
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in recurrent:
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def check_inputs(
        self, x: torch.Tensor, targets: torch.Tensor | None, state: State | None
    ) -> torch.Tensor:
        """Validate x (and targets, state) and return x as int64 [B, T]."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a tensor of byte values [B, T], got {type(x).__name__}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(
                f"x must hold integer byte values 0..255 (uint8 or int64), got dtype {x.dtype}"
            )
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError(
                f"x must be [B, T] with T >= 1 (batch-first), got shape {tuple(x.shape)}"
            )
        if (
            x.dtype != torch.uint8
            and x.numel()
            and (x.min() < 0 or x.max() >= self.config.vocab_size)
        ):
            raise ValueError(
                f"x must hold byte values 0..255, got values in [{int(x.min())}, {int(x.max())}]"
            )
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != x.shape:
                shape = (
                    tuple(targets.shape)
                    if isinstance(targets, torch.Tensor)
                    else type(targets).__name__
                )
                raise ValueError(f"targets must have the shape of x {tuple(x.shape)}, got {shape}")
            if targets.dtype.is_floating_point or targets.dtype == torch.bool:
                raise ValueError(
                    f"targets must hold integer byte values, got dtype {targets.dtype}"
                )
        if state is not None:
            self.check_state(state, x.shape[0])
        return x.long()

    def check_state(self, state: State, batch_size: int) -> None:
        """Raise ValueError unless `state` was made by a model of this shape for this batch size."""
        if not isinstance(state, State):
            raise ValueError(
                "state must be a shaq.models.State (from a previous output), got "
                f"{type(state).__name__}"
            )
        rnns = self.recurrent_layers()
        if len(state.rnn) != len(rnns) or len(state.memory) != len(state.rnn):
            raise ValueError(
                f"state has {len(state.rnn)} recurrent layers, this model has {len(rnns)}: "
                "it comes from another model; start with state=None"
            )
        for i, (pair, rnn) in enumerate(zip(state.rnn, rnns, strict=True)):
            kind = LSTMState if isinstance(rnn, nn.LSTM) else QRNNState
            if not isinstance(pair, kind):
                raise ValueError(
                    f"state of layer {i} is a {type(pair).__name__}, this model's layer {i} needs "
                    f"a {kind.__name__}: the state comes from another model; start with state=None"
                )
            a, b = pair
            hidden = rnn.hidden_size
            expected_b = hidden if isinstance(rnn, nn.LSTM) else rnn.input_size
            if a.shape != (batch_size, hidden) or b.shape != (batch_size, expected_b):
                raise ValueError(
                    f"state of layer {i} has shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                    f"expected ({batch_size}, {hidden}) and ({batch_size}, {expected_b}): it comes "
                    "from another batch size or model; start with state=None"
                )

    def recurrent_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def logits_and_loss(self, h: torch.Tensor, targets: torch.Tensor | None):
        """Tied softmax: logits = h E^T + b. Loss in float32, mean nats per byte."""
        logits = Linear.functional(
            self.drop_output(h), self.embedding.weight, self.decoder_bias
        )  # [B, T, 256]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.long().flatten())
        return logits, loss
