"""The quasi-recurrent layer (Bradbury, Merity, Xiong and Socher, 2016).

One Linear over all time steps maps x_t (and, with window 2, x_{t-1}) to a candidate z_t and
gates f_t, o_t; only an elementwise recurrence ("fo-pooling") runs step by step:

    c_t = f_t * c_{t-1} + (1 - f_t) * z_t        h_t = o_t * c_t

Built step by step in the book's chapter "QRNN".
"""

from typing import NamedTuple

import torch
from torch import nn

from shaq.nn.forget_mult import qrnn_pool
from shaq.nn.onednn import Linear


class QRNNState(NamedTuple):
    """What a QRNN layer carries to the next segment: the last cell c [B, H] and the last
    input x_prev [B, I] (a window-2 layer's x_{t-1} at the next segment's first step).
    Either may be None: zeros. Passed in and out rather than kept in the module, so that one
    module can serve several streams and a checkpoint holds it with the rest of the state."""

    c: torch.Tensor | None
    x_prev: torch.Tensor | None


class QRNN(nn.Module):
    """One QRNN layer with fo-pooling (f-pooling when output_gate=False).

    Args:
        input_size: width I of the input.
        hidden_size: width H of the cell and the output.
        window: 1 (gates see x_t) or 2 (gates see [x_t; x_{t-1}], a causal convolution).
        output_gate: multiply the cell by o_t (fo-pooling); False returns the cell (f-pooling).

    f close to 1 keeps the old cell, as in the paper (pytorch-qrnn's kernel flips this).
    """

    def __init__(
        self, input_size: int, hidden_size: int, window: int = 1, output_gate: bool = True
    ):
        super().__init__()
        if window not in (1, 2):
            raise ValueError(f"QRNN window must be 1 or 2, got {window}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.window = window
        self.output_gate = output_gate
        self.gates = Linear(window * input_size, (3 if output_gate else 2) * hidden_size)

    def forward(
        self, x: torch.Tensor, state: QRNNState | None = None
    ) -> tuple[torch.Tensor, QRNNState]:
        """x [B, T, I] and the previous segment's state (None: zeros) -> h [B, T, H] and the
        state to carry. The carried cell and input are float32 under autocast, so that a state
        carried over many segments is not rounded to 8 bits at every boundary."""
        c0, x_prev = (None, None) if state is None else state
        x_last = x[:, -1] if x.dtype in (torch.float32, torch.float64) else x[:, -1].float()
        if self.window == 2:
            if x_prev is None:
                x_prev = x.new_zeros(x.shape[0], x.shape[2])
            shifted = torch.cat([x_prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)  # x_{t-1}
            x = torch.cat([x, shifted], dim=-1)  # [B, T, 2I]
        gates = self.gates(x)  # [B, T, n_gates * H] as (z, f, o), every time step at once
        h, c_last = qrnn_pool(gates, c0, self.output_gate)  # nonlinearities, recurrence, o_t * c_t
        return h, QRNNState(c_last, x_last)
