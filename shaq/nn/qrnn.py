"""The quasi-recurrent layer (Bradbury, Merity, Xiong and Socher, 2016).

All the matrix work of a QRNN happens in one Linear over every time step at once: it maps
the input at t (and, with window 2, the input at t-1) to a candidate z_t, a forget gate f_t
and an output gate o_t. The only sequential part is elementwise ("fo-pooling"):

    c_t = f_t * c_{t-1} + (1 - f_t) * z_t        h_t = o_t * c_t

so, unlike an LSTM, no matmul waits on the previous step. Built step by step in the book's
chapter "QRNN".
"""

import torch
from torch import nn

from shaq.nn.forget_mult import qrnn_pool
from shaq.nn.onednn import linear


class QRNN(nn.Module):
    """One QRNN layer with fo-pooling (f-pooling when output_gate=False).

    Args:
        input_size: width I of the input.
        hidden_size: width H of the cell and the output.
        window: 1 (gates see x_t) or 2 (gates see x_{t-1} and x_t, a width-2 causal convolution).
        output_gate: multiply the cell by o_t (fo-pooling); False returns the cell (f-pooling).

    The gate convention is the paper's: f close to 1 keeps the old cell. (pytorch-qrnn's
    kernel uses the flipped convention, f close to 1 takes the new candidate.)
    """

    def __init__(self, input_size: int, hidden_size: int, window: int = 1, output_gate: bool = True):
        super().__init__()
        if window not in (1, 2):
            raise ValueError(f"QRNN window must be 1 or 2, got {window}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.window = window
        self.output_gate = output_gate
        n_gates = 3 if output_gate else 2
        self.gates = nn.Linear(window * input_size, n_gates * hidden_size)

    def forward(
        self, x: torch.Tensor, c0: torch.Tensor | None = None, x_prev: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the layer over a segment.

        Args:
            x: [B, T, I] input.
            c0: [B, H] cell carried from the previous segment, or None for zeros.
            x_prev: [B, I] last input of the previous segment (window 2 only), or None for
                zeros. It is passed explicitly, not kept inside the module, so one module can
                serve several streams and a checkpoint captures it with the rest of the state.

        Returns:
            h [B, T, H] and the last cell c_last [B, H] (the state to carry: the cell, not h).
        """
        if self.window == 2:
            if x_prev is None:
                x_prev = x.new_zeros(x.shape[0], x.shape[2])
            shifted = torch.cat([x_prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)  # x_{t-1}: [B, T, I]
            x = torch.cat([x, shifted], dim=-1)  # [B, T, 2I]
        # One matmul for all gates of all time steps: this is where the FLOPs are.
        gates = linear(x, self.gates.weight, self.gates.bias)  # [B, T, n_gates * H] as (z, f, o)
        # tanh/sigmoid, the forget-mult and the output gate in one pass over time (and one
        # backward pass) instead of five elementwise ops, each reading and writing [B, T, H].
        return qrnn_pool(gates, c0, self.output_gate)
