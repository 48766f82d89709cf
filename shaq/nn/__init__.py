"""The building blocks of SHA-RNN and SHAQ."""

from shaq.nn.attention import Overparam, SingleHeadAttention
from shaq.nn.boom import Boom, gelu
from shaq.nn.forget_mult import forget_mult, forget_mult_reference, qrnn_pool, qrnn_pool_reference
from shaq.nn.qrnn import QRNN

__all__ = ["Boom", "Overparam", "QRNN", "SingleHeadAttention", "forget_mult", "forget_mult_reference", "gelu", "qrnn_pool", "qrnn_pool_reference"]
