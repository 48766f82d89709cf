"""The FLOP models of `shaq.models.SHARNNConfig` and `shaq.shatter.ShatterConfig`: matmul FLOPs
per byte of text.

A model's FLOP count follows from its config alone, so it lives next to the config rather
than in the code that times the model: the benchmark (`shaq.bench`) divides it by measured
time to get model FLOP utilisation (MFU), and its tests check it against PyTorch's own
FLOP counter.
"""

from shaq.models import SHARNNConfig
from shaq.shatter import ShatterConfig

# Forward + backward costs three forwards: the backward of each matmul computes two products
# of the forward's size, one for the input's gradient and one for the weight's.
TRAIN_OVER_FORWARD = 3


def model_flops_per_byte(config: SHARNNConfig | ShatterConfig, seq_len: int, memory: int) -> float:
    """Matmul FLOPs of one *forward* pass per byte of text (a training step costs 3x this).

    T = seq_len, M = memory positions each query sees besides its own segment; a causal query
    sees on average M + (T + 1) / 2 keys. Counted as the model needs them: the future keys that
    the attention masks out cost no FLOPs here, whether or not the code multiplies by them.
    See `sharnn_flops_per_byte` and `shatter_flops_per_byte` for the counts.
    """
    if isinstance(config, SHARNNConfig):
        return sharnn_flops_per_byte(config, seq_len, memory)
    if isinstance(config, ShatterConfig):
        return shatter_flops_per_byte(config, seq_len, memory)
    raise TypeError(
        f"no FLOP model for {type(config).__name__}: expected a SHARNNConfig "
        "(SHA-RNN, SHAQ) or a ShatterConfig"
    )


def sharnn_flops_per_byte(config: SHARNNConfig, seq_len: int, memory: int) -> float:
    """`model_flops_per_byte` of a SHA-RNN or SHAQ.

    With d = d_model, N = boom_expansion, V = vocab_size, T = seq_len, M = memory, a
    multiply-add counted as 2 FLOPs:

        recurrent layer, per block:  LSTM 2 * (d * 4d + d * 4d) = 16 d^2   (input + recurrent)
                                     QRNN 2 * (w * d) * 3d      = 6 w d^2  (window w; z, f, o)
        Boom, per block:             2 * d * N d                (+ 2 * N d * d without the shortcut)
        attention, per attention:    2 d^2 (query)  +  2 * 2 d * K  (scores and weighted sum)
                                     with K = M + (T + 1) / 2 keys visible on average (causal)
        tied softmax:                2 * d * V

    Forward + backward = 3x forward: the backward of each matmul computes two products of
    the same size, one for the input's gradient and one for the weight's (or, inside the
    attention, for the keys' and values'). Not counted: elementwise work, LayerNorm, the
    embedding lookup, the Overparam gate (per step, not per byte), the optimizer.
    """
    d, N = config.d_model, config.boom_expansion
    if config.rnn == "lstm":
        recurrent = 16 * d * d
    else:
        recurrent = 6 * config.qrnn_window * d * d
    boom = 2 * d * N * d + (0 if config.boom_shortcut else 2 * N * d * d)
    keys = memory + (seq_len + 1) / 2
    attention = 2 * d * d + 4 * d * keys
    return (
        config.n_layers * (recurrent + boom)
        + len(config.attention_blocks) * attention
        + 2 * d * config.vocab_size
    )


def shatter_flops_per_byte(config: ShatterConfig, seq_len: int, memory: int) -> float:
    """`model_flops_per_byte` of a ShatterLM (`shaq.nn.shatter` has the attention's equations).

    With d = d_model, N = ff_expansion, K = n_partitions (as in shaq.nn.shatter), V = vocab_size,
    and S = M + (T + 1) / 2 keys visible on average, per block (every block attends):

        query projection:                           2 d^2
        scores q . h_j:                             2 d S
        the K partition-weighted sums (A * Pi_k) H, each d wide over the visible keys:
                                                    2 K d S
        the stacked value matrices, K d -> d:       2 K d^2
        feed-forward:                               MLP 2 * d * N d + 2 * N d * d;  Boom 2 * d * N d

    and once, the tied softmax 2 d V. The weights a_ij pi_k(i - j) are elementwise work and not
    counted, nor are LayerNorm, the embedding lookup and the optimizer.
    """
    d, N, K = config.d_model, config.ff_expansion, config.n_partitions
    keys = memory + (seq_len + 1) / 2
    attention = 2 * d * d + 2 * d * keys + 2 * K * d * keys + 2 * K * d * d
    ff = 2 * d * N * d + (2 * N * d * d if config.ff == "mlp" else 0)
    return config.n_layers * (attention + ff) + 2 * d * config.vocab_size


def train_flops_per_byte(config: SHARNNConfig | ShatterConfig, seq_len: int, memory: int) -> float:
    """Matmul FLOPs of one forward + backward per byte of text: 3x `model_flops_per_byte`."""
    return TRAIN_OVER_FORWARD * model_flops_per_byte(config, seq_len, memory)
