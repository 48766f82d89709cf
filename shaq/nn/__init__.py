"""The building blocks of SHA-RNN and SHAQ."""

from shaq.nn.activation import gelu
from shaq.nn.attention import Overparam, SingleHeadAttention
from shaq.nn.boom import Boom
from shaq.nn.forget_mult import forget_mult, forget_mult_reference, qrnn_pool, qrnn_pool_reference
from shaq.nn.lstm import LSTM, LSTMState
from shaq.nn.onednn import Linear
from shaq.nn.qrnn import QRNN, QRNNState
from shaq.nn.shatter import ShatterAttention

__all__ = [
    "LSTM",
    "QRNN",
    "Boom",
    "LSTMState",
    "Linear",
    "Overparam",
    "QRNNState",
    "ShatterAttention",
    "SingleHeadAttention",
    "forget_mult",
    "forget_mult_reference",
    "gelu",
    "qrnn_pool",
    "qrnn_pool_reference",
]
