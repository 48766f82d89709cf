"""One LSTM layer with shaq's batch-first state, and the precision it runs in under CPU autocast."""

from typing import NamedTuple

import torch
from torch import nn

from shaq.device import cpu_has_bf16
from shaq.nn import switches


class LSTMState(NamedTuple):
    """What an LSTM layer carries to the next segment: h [B, H] and c [B, H]."""

    h: torch.Tensor
    c: torch.Tensor


def _widen(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors as float32; float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class LSTM(nn.LSTM):
    """`torch.nn.LSTM`, one batch-first layer (same parameters and state_dict), taking and
    returning its state as an `LSTMState` of [B, H] tensors.

    Under CPU bf16 autocast, the layer runs in float32 instead when the CPU has no bf16
    instructions (oneDNN then has no bf16 LSTM at all) or when it is wider than
    `shaq.nn.switches.cpu_bf16_lstm_max_hidden` (where bf16 was measured slower).
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size, batch_first=True)

    def forward(
        self, x: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """x [B, T, I] and the previous segment's state (None: zeros) -> out [B, T, H] and the
        state to carry, float32 under autocast (float64 stays float64), so that a state carried
        over many segments is not rounded to 8 bits at every boundary."""
        # The state in x's dtype: autocast then casts x, state and weights alike.
        hc = (
            None if state is None else tuple(t.unsqueeze(0).to(x.dtype).contiguous() for t in state)
        )
        if self._in_float32(x):
            with torch.autocast("cpu", enabled=False):
                out, (h, c) = super().forward(
                    x.float(), None if hc is None else tuple(t.float() for t in hc)
                )
        else:
            out, (h, c) = super().forward(x, hc)
        return out, LSTMState(_widen(h[0]), _widen(c[0]))

    def _in_float32(self, x: torch.Tensor) -> bool:
        """Whether this call leaves CPU bf16 autocast (see the class docstring)."""
        return (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and (self.hidden_size > switches.cpu_bf16_lstm_max_hidden or not cpu_has_bf16())
        )
