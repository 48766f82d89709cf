"""Every switch of shaq's speed paths, in one place.

The models compute the same function whichever way these are set (up to rounding); the switches
only choose how. Each starts from an environment variable, read once at import, and can be set
at run time (`shaq.nn.switches.use_onednn = False`): the code reads them at every call. Measured
numbers behind the defaults are in the README's Speed section.
"""

import os

import torch

# Float32 CPU matmuls of Linear, the tied softmax and the attention core on oneDNN instead of
# MKL, where torch sends them: measured faster on AMD CPUs, where MKL keeps to its AVX2 code.
# SHAQ_NO_ONEDNN=1: off.
use_onednn: bool = os.environ.get("SHAQ_NO_ONEDNN", "0") != "1"

# The C++ forget-mult on the CPU (compiled on first use): without it the QRNN's recurrence runs
# one torch op per time step. SHAQ_NO_EXT=1: off (no compiler, or to compare).
use_extension: bool = os.environ.get("SHAQ_NO_EXT", "0") != "1"

# How the torch forget-mult (no C++ extension) runs: "steps", one op per time step, measured faster
# on the CPU; "chunked", about 2 sqrt(T) steps of bulk ops, for GPUs where every op is a kernel
# launch; "auto" picks chunked off the CPU and steps on it. SHAQ_SCAN_MODE=steps|chunked|auto.
scan_mode: str = os.environ.get("SHAQ_SCAN_MODE", "auto")

# Elements per random generator of the CPU dropout mask (tensors of at most one chunk use
# F.dropout): large enough that a chunk's set-up costs little. Changing it changes the masks a
# seed draws. SHAQ_DROPOUT_CHUNK.
dropout_chunk: int = int(os.environ.get("SHAQ_DROPOUT_CHUNK", str(1 << 20)))

# Under CPU bf16 autocast, LSTMs wider than this run in float32: oneDNN's bf16 LSTM was measured
# faster than its float32 one up to this width and slower beyond it (other CPUs may put the cliff
# elsewhere). SHAQ_CPU_BF16_LSTM_MAX_HIDDEN.
cpu_bf16_lstm_max_hidden: int = int(os.environ.get("SHAQ_CPU_BF16_LSTM_MAX_HIDDEN", "512"))


def compiling() -> bool:
    """Whether torch.compile is tracing. Every fast path then steps aside for torch's own ops:
    inductor lowers oneDNN's linear only for frozen inference weights, cannot trace thread pools,
    and generates its own fused kernels."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # PyTorch >= 2.3
    return bool(is_compiling and is_compiling())
