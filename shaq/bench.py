"""Speed benchmarks: QRNN against LSTM, the forget-mult, attention memory, training steps.

    python -m shaq.bench                       # full run: about 13 minutes on 2 CPU cores
    python -m shaq.bench --quick               # small shapes, few repeats: well under a minute
    python -m shaq.bench --json out.json       # also write every number as JSON
    python -m shaq.bench --bf16 --device cuda  # bfloat16 autocast, on a GPU
    python -m shaq.bench --compile             # a torch.compile'd SHAQ step against eager
    python -m shaq.bench --profile paper       # where a paper-shape training step's time goes

Everything runs side by side in one process on one device, each measurement after warm-up
calls, reporting the median of several timed calls (CUDA is synchronised around each).
"bytes/s" counts the bytes of text one forward+backward (or one training step) consumes,
B * T. The sections:

- matmul peak: GFLOP/s of a large square matmul, through torch.mm and (float32 on CPU)
  through oneDNN (`shaq.nn.onednn`); the best is "the peak" other rows are compared with.
- rnn: one QRNN layer (window 1 and 2) against nn.LSTM, forward+backward, B = 16.
- forget_mult: the fast forget-mult against the reference Python loop, and the share of
  the QRNN layer's time that its elementwise part (qrnn_pool) and the forget-mult take.
- attention: one SingleHeadAttention forward+backward against memory length, next to the
  reference-style attention (explicit matmuls, additive mask, dropout on probabilities).
- step: whole training steps (forward, backward, clip, LAMB) of SHAQ, shaq's SHARNN and
  `ReferenceStyleSHARNN`, a re-creation of how the original sha-rnn code computes, with
  bytes/s, peak memory and model FLOP utilisation (MFU, see `model_flops_per_byte`).
- compile (only with --compile): a torch.compile'd SHAQ step at the cpu preset against eager.
- profile (only with --profile SHAPE): one SHAQ and one SHARNN step at that shape under
  torch.profiler: time by phase and the operators that take it.

On the CPU the benchmark first makes glibc keep freed memory for reuse
(`tune_cpu_allocator`; --no-malloc-tuning leaves malloc alone): otherwise every training
step page-faults its activations in afresh, which cost a third of a step here. Training on
a CPU should do the same. All three models of the step section run under the same setting.

Timings are only meaningful on a quiet machine: other processes on the same cores slow
small-op code several times over. The benchmark measures how much CPU other processes take
(from /proc/stat, while it idles for a moment and during every section), and measures the
matmul peak again at the end (other virtual machines sharing the host's caches, memory
bandwidth and clock are invisible to /proc/stat, but move the peak). It warns when either
says the machine was not quiet.

With --bf16 the matmuls run in bfloat16 under autocast (AVX512-BF16 or AMX on a CPU); the
attention's softmax core stays in float32 (see shaq.nn.attention).
"""

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from shaq.device import pick_device
from shaq.models import SHAQ, SHARNN, SHARNNConfig, State, detach
from shaq.nn import QRNN, Overparam, SingleHeadAttention, forget_mult, forget_mult_reference
from shaq.nn.boom import gelu
# _extension_for is private; the bench only reports whether the C++ kernels are in use.
from shaq.nn.forget_mult import _extension_for, qrnn_pool
from shaq.nn.onednn import linear as onednn_linear
from shaq.nn.onednn import onednn_available
from shaq.optim import LAMB

# Throughput of the original sha-rnn code in float32 on this project's 2-core CPU, as quoted
# in the issue that asked for this benchmark (it cannot be run here). Context only.
QUOTED_ORIGINAL_BYTES_PER_S = {"paper": 228.0, "small": 1180.0}

# A run counts as quiet when other processes used less than this many cores on average
# in every section, and the matmul peak at the end is within PEAK_DRIFT of the start's.
QUIET_OTHERS_CORES = 0.1
PEAK_DRIFT = 0.1


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    return statistics.median(time_calls(fn, device, warmup, repeats))


# ----------------------------------------------------------------------------- contention


def _proc_stat() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks used by this process), or None off Linux.

    Busy includes steal: time the hypervisor gave this VM's cores to someone else.
    """
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            # Field 2 (the command) may hold spaces; utime and stime are fields 14 and 15.
            after_command = f.read().rsplit(")", 1)[1].split()
        own = int(after_command[11]) + int(after_command[12])
    except (OSError, ValueError, IndexError):
        return None
    return user + nice + system + irq + softirq + steal, own


class CpuMonitor:
    """Measures the CPU that *other* processes use, in cores, between start() and stop().

    The machine's busy time minus this process's own CPU time, per second of wall time.
    While we compute on every core, others can only run by taking cores from us, so this
    is also roughly the fraction of our compute we lost to them.
    """

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[float, tuple[int, int] | None] | None = None

    def start(self) -> None:
        self._start = (time.monotonic(), _proc_stat())

    def stop(self) -> float | None:
        t0, s0 = self._start
        t1, s1 = time.monotonic(), _proc_stat()
        if s0 is None or s1 is None or t1 <= t0:
            return None
        others = (s1[0] - s0[0]) - (s1[1] - s0[1])
        return max(others, 0) / self.hz / (t1 - t0)

    def idle_probe(self, seconds: float) -> float | None:
        """Others' CPU use while this process sleeps: how busy the machine is without us."""
        self.start()
        time.sleep(seconds)
        return self.stop()


# ----------------------------------------------------------------------------- memory


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the system.

    PyTorch's CPU tensors come from malloc. glibc serves large blocks (above a threshold
    that adapts up to 32 MiB) with fresh mmap()s and unmaps them when freed, so every
    step's big activations (hundreds of MB at the paper's shape) are page-faulted and
    zeroed by the kernel again: measured here, 30% of a step's CPU time was kernel time at
    the `small` shape. With mmap off
    (M_MMAP_MAX = 0) and trimming off (M_TRIM_THRESHOLD = -1) freed memory stays in the
    heap and the next step reuses it; the cost is that the process keeps its high-water
    mark. The same as starting Python with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1.
    Returns whether it applied (glibc only).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


class PeakMemory:
    """Peak memory of what runs between reset() and peak(), above what was there before.

    CUDA: torch.cuda.max_memory_allocated, i.e. tensors only. CPU: the process's resident
    set high-water mark (VmHWM in /proc/self/status), which the kernel lets us reset by
    writing 5 to /proc/self/clear_refs. tracemalloc and resource.getrusage do not work
    here: tracemalloc does not see torch's allocator, and ru_maxrss cannot be reset, so
    every model after the biggest one would read the same. Before each reset we return
    freed heap memory to the system (malloc_trim) so the baseline is what is really held;
    the peak then covers parameters, gradients, optimizer state and activations.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.ok = True

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(f"{field} not in /proc/self/status")

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base = self._status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not Linux/glibc, or clear_refs not writable: no CPU peak
            self.ok = False

    def peak(self) -> int | None:
        """Bytes above the baseline at the high-water mark since reset(), or None."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if not self.ok:
            return None
        return self._status_kib("VmHWM") * 1024 - self.base


# ----------------------------------------------------------------------------- FLOPs


def model_flops_per_byte(config: SHARNNConfig, seq_len: int, memory: int) -> float:
    """Matmul FLOPs of one *forward* pass per byte of text (a training step costs 3x this).

    With d = d_model, N = boom_expansion, V = vocab_size, T = seq_len, M = memory positions
    each query sees besides its own segment, a multiply-add counted as 2 FLOPs:

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


# ----------------------------------------------------------------------------- reference style


class ReferenceStyleAttention(nn.Module):
    """SHA-RNN's attention computed the way the original code does, time-major.

    Explicit matmuls; the additive mask [T, M + T] (zeros over the memory, -inf above the
    diagonal of the segment) is added to the full score matrix; dropout on q, on v and on
    the whole [T, M + T] probability matrix; q is projected, cast to float32 and
    layer-normalised. Parameter names follow shaq's SingleHeadAttention so weights copy over.
    """

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.query = nn.Linear(d_model, d_model)
        self.query_norm = nn.LayerNorm(d_model, eps=1e-12)
        self.qs = nn.Parameter(torch.zeros(d_model))
        self.ks = nn.Parameter(torch.zeros(d_model))
        self.vs = nn.Parameter(torch.zeros(d_model))
        self.value_gate = Overparam(d_model)

    def forward(self, query: torch.Tensor, keys_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query [T, B, d], keys_values [S, B, d], mask [T, S] additive -> [T, B, d]."""
        d = query.shape[-1]
        q = self.query_norm(self.query(query).float()) * torch.sigmoid(self.qs)
        k = keys_values * torch.sigmoid(self.ks)
        v = keys_values * self.value_gate(torch.sigmoid(self.vs))
        q = F.dropout(q, self.dropout, self.training)
        v = F.dropout(v, self.dropout, self.training)
        scores = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)) / math.sqrt(d)  # [B, T, S]
        weights = F.softmax(scores + mask, dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return torch.matmul(weights, v.transpose(0, 1)).transpose(0, 1)  # [T, B, d]


class ReferenceStyleBoom(nn.Module):
    """Boom as the original computes it: Linear, x * sigmoid(1.702 x), dropout, chunk sum."""

    def __init__(self, d_model: int, expansion: int, dropout: float):
        super().__init__()
        self.d_model, self.dropout = d_model, dropout
        self.up = nn.Linear(d_model, expansion * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.dropout(gelu(self.up(x)), self.dropout, self.training)
        return u.view(*u.shape[:-1], -1, self.d_model).sum(dim=-2)


class ReferenceStyleBlock(nn.Module):
    """One time-major SHA-RNN block (LSTM, optional attention, Boom); see shaq.models."""

    def __init__(self, config: SHARNNConfig, use_attention: bool):
        super().__init__()
        d, p = config.d_model, config.dropout_hidden
        self.dropout = p
        self.ln_start = nn.LayerNorm(d, eps=1e-12)
        self.rnn = nn.LSTM(d, d)
        self.attention = None
        if use_attention:
            self.ln_mid = nn.LayerNorm(d, eps=1e-12)
            self.ln_mem = nn.LayerNorm(d, eps=1e-12)
            self.attention = ReferenceStyleAttention(d, p)
        self.ln_xff = nn.LayerNorm(d, eps=1e-12)
        self.ln_ff = nn.LayerNorm(d, eps=1e-12)
        self.boom = ReferenceStyleBoom(d, config.boom_expansion, p)

    def forward(self, x, hidden, memory, mask):
        """x [T, B, d] -> (y [T, B, d], hidden, memory [M', B, d] or None)."""
        h, hidden = self.rnn(self.ln_start(x), hidden)
        h = F.dropout(h, self.dropout, self.training)
        if self.attention is not None:
            a, m = self.ln_mid(h), self.ln_mem(h)
            memory = m if memory is None else torch.cat([memory, m], dim=0)
            y = self.attention(a, memory, mask)
            h = F.dropout(y, self.dropout, self.training) + a
        h = self.ln_ff(h) + F.dropout(self.boom(self.ln_xff(h)), self.dropout, self.training)
        return h, hidden, memory


class ReferenceStyleSHARNN(nn.Module):
    """A re-creation, from the architecture description alone, of how the original sha-rnn
    code computes a training step: the baseline that shaq's SHARNN is measured against.

    Same function as `shaq.models.SHARNN` (a test checks it, weights copied across), but
    computed as the original does: time-major [T, B, d] tensors throughout, nn.LSTM without
    batch_first, the attention of `ReferenceStyleAttention` with an additive mask built for
    the full memory span, plain nn.LayerNorm (the original used apex's), plain float32
    matmuls. LSTM only (the original had no QRNN).

    forward(x [T, B], hidden, memory, targets [T, B]) -> (logits [T, B, V], loss, hidden, memory)
    where hidden is a list of (h, c) pairs [1, B, d] and memory a list of [M, B, d] or None.
    """

    def __init__(self, config: SHARNNConfig):
        super().__init__()
        if config.rnn != "lstm" or not config.overparam or not config.boom_shortcut:
            raise ValueError("ReferenceStyleSHARNN re-creates the original: LSTM, Overparam, Boom shortcut")
        self.config = config
        attention = set(config.attention_blocks)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.blocks = nn.ModuleList(ReferenceStyleBlock(config, i in attention) for i in range(config.n_layers))
        self.init_weights()

    def init_weights(self) -> None:
        """The original's rule: Linear and Embedding weights N(0, 0.1 / sqrt(d)), biases 0;
        the LSTM keeps PyTorch's default; LayerNorms keep gain 1 and bias 0."""
        std = 0.1 / math.sqrt(self.config.d_model)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @classmethod
    def from_sharnn(cls, model: SHARNN) -> "ReferenceStyleSHARNN":
        """A reference-style model holding a copy of `model`'s weights."""
        ref = cls(model.config)
        ref.load_state_dict(model.state_dict())
        return ref.to(next(model.parameters()).device)

    def forward(self, x, hidden=None, memory=None, targets=None):
        c = self.config
        T = x.shape[0]
        hidden = hidden or [None] * len(self.blocks)
        memory = memory or [None] * len(self.blocks)
        # Before the segment, keep the last memory_len - T positions of each memory.
        keep = max(c.memory_len - T, 0)
        memory = [m[-keep:] if m is not None and keep > 0 else None for m in memory]
        M = max((m.shape[0] for m in memory if m is not None), default=0)
        causal = torch.full((T, T), float("-inf"), device=x.device).triu(diagonal=1)
        mask = torch.cat([torch.zeros(T, M, device=x.device), causal], dim=1)  # [T, M + T]
        h = F.dropout(self.embedding(x), c.dropout_input, self.training)
        new_hidden, new_memory = [], []
        for block, hid, mem in zip(self.blocks, hidden, memory):
            h, hid, mem = block(h, hid, mem, mask)
            new_hidden.append(hid)
            new_memory.append(mem[-c.memory_len:] if mem is not None and c.memory_len > 0 else None)
        h = F.dropout(h, c.dropout_output, self.training)
        logits = F.linear(h, self.embedding.weight, self.decoder_bias)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, c.vocab_size).float(), targets.reshape(-1))
        return logits, loss, new_hidden, new_memory


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class StepShape:
    """One training-step comparison: a model shape, batch B and segment length T."""

    name: str
    config: SHARNNConfig
    batch: int
    seq_len: int
    warmup: int
    repeats: int


@dataclass(frozen=True)
class Plan:
    """The shapes and repeat counts of a run (full or --quick)."""

    matmul_n: int
    repeats: int
    rnn_hidden: tuple[int, ...]
    rnn_seq: tuple[int, ...]
    rnn_batch: int
    attention_d: int
    attention_seq: int
    attention_batch: int
    attention_memory: tuple[int, ...]
    attention_dropout: float
    steps: tuple[StepShape, ...]
    compile_shape: StepShape
    idle_probe_s: float


def full_plan() -> Plan:
    # Two or more warm-up steps: the first steps of a model also fault in the pages its
    # activations need (several GB at the paper's shape); only from about the third step on
    # does the allocator reuse memory without asking the kernel for more.
    cpu = StepShape("cpu", SHARNNConfig.cpu(), 16, 256, warmup=3, repeats=5)
    # The shape of the quoted 1,180 bytes/s: emsize 256, Boom 1024, 4 blocks, bptt 256,
    # the paper's memory and dropouts.
    small = StepShape("small", SHARNNConfig.paper(d_model=256), 16, 256, warmup=2, repeats=3)
    paper = StepShape("paper", SHARNNConfig.paper(), 16, 1024, warmup=2, repeats=2)
    return Plan(
        matmul_n=4096, repeats=5, rnn_hidden=(256, 1024), rnn_seq=(256, 1024), rnn_batch=16,
        attention_d=1024, attention_seq=1024, attention_batch=16, attention_memory=(0, 1000, 5000),
        attention_dropout=0.1, steps=(cpu, small, paper), compile_shape=cpu, idle_probe_s=2.0,
    )


def quick_plan() -> Plan:
    smoke = StepShape("smoke", SHARNNConfig.smoke(), 4, 32, warmup=1, repeats=2)
    tiny = StepShape("tiny-paper", SHARNNConfig.paper(d_model=64, memory_len=192), 4, 64, warmup=1, repeats=2)
    return Plan(
        matmul_n=512, repeats=3, rnn_hidden=(64,), rnn_seq=(32,), rnn_batch=16,
        attention_d=64, attention_seq=32, attention_batch=4, attention_memory=(0, 64, 256),
        attention_dropout=0.1, steps=(smoke, tiny), compile_shape=smoke, idle_probe_s=0.5,
    )


# ----------------------------------------------------------------------------- sections


@dataclass
class Context:
    """What every section needs: where to run, how, and how many times."""

    device: torch.device
    bf16: bool
    repeats: int

    def autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def matmul_peak(ctx: Context, n: int) -> dict:
    """GFLOP/s of an n x n @ n x n matmul through each available backend; the best is the peak."""
    dtype = torch.bfloat16 if ctx.bf16 else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    flops = 2 * n**3
    backends = {"torch.mm": lambda: a @ b}
    if ctx.device.type == "cpu" and dtype == torch.float32 and onednn_available():
        backends["onednn"] = lambda: onednn_linear(a, b)
    gflops = {name: flops / median_time(fn, ctx.device, 1, ctx.repeats) / 1e9 for name, fn in backends.items()}
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "gflops": gflops, "peak_gflops": max(gflops.values())}


def _forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, ctx: Context) -> Callable[[], None]:
    def run():
        with ctx.autocast():
            out = layer(x)[0]
        out.backward(grad.to(out.dtype))

    return run


def bench_rnn(ctx: Context, plan: Plan, peak_gflops: float) -> list[dict]:
    """QRNN (window 1, 2) against nn.LSTM, forward+backward of one layer, batch-first."""
    rows = []
    B = plan.rnn_batch
    for H in plan.rnn_hidden:
        for T in plan.rnn_seq:
            x = torch.randn(B, T, H, device=ctx.device, requires_grad=True)
            grad = torch.randn(B, T, H, device=ctx.device)
            layers = {
                "lstm": nn.LSTM(H, H, batch_first=True),
                "qrnn1": QRNN(H, H, window=1),
                "qrnn2": QRNN(H, H, window=2),
            }
            row = {"hidden": H, "seq_len": T, "batch": B}
            for name, layer in layers.items():
                seconds = median_time(_forward_backward(layer.to(ctx.device), x, grad, ctx), ctx.device, 1, ctx.repeats)
                row[f"{name}_s"] = seconds
                row[f"{name}_bytes_per_s"] = B * T / seconds
            for w in (1, 2):
                name = f"qrnn{w}"
                gflops = 3 * 2 * B * T * (w * H) * (3 * H) / row[f"{name}_s"] / 1e9
                row[f"{name}_speedup"] = row["lstm_s"] / row[f"{name}_s"]
                row[f"{name}_gflops"] = gflops
                row[f"{name}_peak_fraction"] = gflops / peak_gflops
            rows.append(row)
    return rows


def bench_forget_mult(ctx: Context, plan: Plan) -> list[dict]:
    """Fast against reference forget-mult (forward+backward), and shares of the QRNN layer."""
    rows = []
    B = plan.rnn_batch
    for H in plan.rnn_hidden:
        for T in plan.rnn_seq:
            f = torch.sigmoid(torch.randn(B, T, H, device=ctx.device)).requires_grad_()
            z = torch.randn(B, T, H, device=ctx.device, requires_grad=True)
            gates = torch.randn(B, T, 3 * H, device=ctx.device, requires_grad=True)
            grad = torch.randn(B, T, H, device=ctx.device)

            def run_forget_mult(fn=forget_mult):
                fn(f, z).backward(grad)

            def run_pool():
                qrnn_pool(gates)[0].backward(grad)

            x = torch.randn(B, T, H, device=ctx.device, requires_grad=True)
            layer = QRNN(H, H).to(ctx.device)
            fast = median_time(run_forget_mult, ctx.device, 1, ctx.repeats)
            reference = median_time(lambda: run_forget_mult(forget_mult_reference), ctx.device, 1, ctx.repeats)
            pool = median_time(run_pool, ctx.device, 1, ctx.repeats)
            qrnn = median_time(_forward_backward(layer, x, grad, ctx), ctx.device, 1, ctx.repeats)
            rows.append({
                "hidden": H, "seq_len": T, "batch": B, "reference_s": reference, "fast_s": fast,
                "speedup": reference / fast, "qrnn_pool_s": pool, "qrnn1_layer_s": qrnn,
                "forget_mult_share": fast / qrnn, "qrnn_pool_share": pool / qrnn,
            })
    return rows


def bench_attention(ctx: Context, plan: Plan) -> list[dict]:
    """One attention forward+backward (training mode) against the number of memory positions."""
    d, T, B, p = plan.attention_d, plan.attention_seq, plan.attention_batch, plan.attention_dropout
    ours = {rate: SingleHeadAttention(d, dropout=rate).to(ctx.device).train() for rate in (p, 0.0)}
    ref = ReferenceStyleAttention(d, p).to(ctx.device).train()
    rows = []
    for M in plan.attention_memory:
        S = M + T
        query = torch.randn(B, T, d, device=ctx.device, requires_grad=True)
        kv = torch.randn(B, S, d, device=ctx.device, requires_grad=True)
        grad = torch.randn(B, T, d, device=ctx.device)
        causal = torch.full((T, T), float("-inf"), device=ctx.device).triu(diagonal=1)
        mask = torch.cat([torch.zeros(T, M, device=ctx.device), causal], dim=1)
        query_tm, kv_tm = query.detach().transpose(0, 1).requires_grad_(), kv.detach().transpose(0, 1).requires_grad_()

        def run_ours(attention):
            def run():
                with ctx.autocast():
                    # The memory is detached in training: frozen=M, as the model passes it.
                    y = attention(query, kv, frozen=M)[0]
                y.backward(grad.to(y.dtype))
            return run

        def run_ref():
            with ctx.autocast():
                y = ref(query_tm, kv_tm, mask)
            y.backward(grad.transpose(0, 1).to(y.dtype))

        row = {"memory": M, "keys": S, "seq_len": T, "batch": B, "d_model": d, "dropout": p}
        row["ours_s"] = median_time(run_ours(ours[p]), ctx.device, 1, ctx.repeats)
        row["ours_no_dropout_s"] = median_time(run_ours(ours[0.0]), ctx.device, 1, ctx.repeats)
        row["reference_s"] = median_time(run_ref, ctx.device, 1, ctx.repeats)
        row["speedup"] = row["reference_s"] / row["ours_s"]
        rows.append(row)
    return rows


def _initial_state(model: nn.Module, x: torch.Tensor) -> State:
    """A state as after many segments: real recurrent states, memories filled to memory_len.

    Memories are random (their content does not matter for speed), so the first timed step
    already attends over the steady-state number of positions.
    """
    c = model.config
    with torch.no_grad():
        state = model(x[:, :1]).state
    memory = [
        torch.randn(x.shape[0], c.memory_len, c.d_model, device=x.device) if m is not None else None
        for m in state.memory
    ]
    return State(state.rnn, memory)


def _make_step(
    kind: str, shape: StepShape, ctx: Context, compile: bool = False
) -> tuple[nn.Module, Callable[[], None]]:
    """A model of `kind` and a closure running one training step on random bytes.

    The step is what a trainer does per segment: forward, backward, clip the gradient norm
    to 0.25, a LAMB step, and carry the detached state (recurrent states and memories) on.
    """
    c, B, T, device = shape.config, shape.batch, shape.seq_len, ctx.device
    torch.manual_seed(0)
    x = torch.randint(0, c.vocab_size, (B, T + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    if kind == "reference":
        model = ReferenceStyleSHARNN(c).to(device)
        inputs, targets = inputs.t().contiguous(), targets.t().contiguous()  # time-major
        with torch.no_grad():
            hidden = model(inputs[:1])[2]
        memory = [torch.randn(c.memory_len, B, c.d_model, device=device) if i in c.attention_blocks else None
                  for i in range(c.n_layers)]
        carried = (hidden, memory)

        def forward(carry):
            _, loss, hidden, memory = model(inputs, *carry, targets=targets)
            hidden = [tuple(t.detach() for t in pair) for pair in hidden]
            return loss, (hidden, [m.detach() if m is not None else None for m in memory])
    else:
        model = (SHAQ if kind == "shaq" else SHARNN)(c).to(device)
        carried = _initial_state(model, inputs)
        run = torch.compile(model) if compile else model

        def forward(carry):
            out = run(inputs, carry, targets)
            return out.loss, detach(out.state)

    model.train()
    optimizer = LAMB(model.parameters(), lr=1e-3)
    params = list(model.parameters())

    def step():
        # The labels cost nothing unless a profiler runs (see profile_steps).
        nonlocal carried
        with record_function("forward"), ctx.autocast():
            loss, new_carried = forward(carried)
        optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(params, 0.25)
        with record_function("optimizer"):
            optimizer.step()
        carried = new_carried

    return model, step


STEP_MODELS = ("shaq", "sharnn", "reference")


def bench_steps(ctx: Context, plan: Plan, peak_gflops: float) -> list[dict]:
    """Training steps of SHAQ, SHARNN and ReferenceStyleSHARNN at each shape of the plan."""
    results = []
    memory = PeakMemory(ctx.device)
    for shape in plan.steps:
        B, T, c = shape.batch, shape.seq_len, shape.config
        visible_memory = max(c.memory_len - T, 0)
        entry = {"shape": shape.name, "batch": B, "seq_len": T, "config": c.to_dict(), "models": {}}
        for kind in STEP_MODELS:
            memory.reset()
            model, step = _make_step(kind, shape, ctx)
            times = time_calls(step, ctx.device, shape.warmup, shape.repeats)
            peak = memory.peak()
            config = replace(c, rnn="qrnn") if kind == "shaq" else c
            flops = 3 * model_flops_per_byte(config, T, visible_memory)
            seconds = statistics.median(times)
            entry["models"][kind] = {
                "step_s": seconds,
                "bytes_per_s": B * T / seconds,
                "peak_memory_mb": peak / 2**20 if peak is not None else None,
                "params": sum(p.numel() for p in model.parameters()),
                "train_flops_per_byte": flops,
                "mfu": flops * B * T / seconds / (peak_gflops * 1e9),
            }
            del model, step
        m = entry["models"]
        entry["shaq_over_sharnn"] = m["shaq"]["bytes_per_s"] / m["sharnn"]["bytes_per_s"]
        entry["sharnn_over_reference"] = m["sharnn"]["bytes_per_s"] / m["reference"]["bytes_per_s"]
        entry["quoted_original_bytes_per_s"] = QUOTED_ORIGINAL_BYTES_PER_S.get(shape.name)
        results.append(entry)
    return results


PHASES = ("forward", "backward", "clip", "optimizer")


def profile_steps(ctx: Context, plan: Plan, shape_name: str, top: int = 12) -> list[dict]:
    """Where one training step's time goes, for SHAQ and SHARNN at one shape of the plan.

    After the shape's warm-up steps, one step runs under torch.profiler. Reported per model:
    the wall time of each phase (forward, backward, clip, optimizer) and the `top` operators
    by self time (time inside the operator itself, not in operators it calls), each with its
    share of the step. On CUDA, self time is device time.
    """
    shape = next(s for s in plan.steps if s.name == shape_name)
    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    results = []
    for kind in ("shaq", "sharnn"):
        _, step = _make_step(kind, shape, ctx)
        time_calls(step, ctx.device, shape.warmup, 0)
        with profile(activities=activities) as prof:
            step()
            synchronize(ctx.device)
        events = prof.key_averages()
        phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
        step_s = sum(phases.values())

        def self_s(e) -> float:
            return (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6

        ops = sorted((e for e in events if e.key not in PHASES), key=self_s, reverse=True)
        results.append({
            "shape": shape.name, "model": kind, "step_s": step_s, "phases_s": phases,
            "top_ops": [{"op": e.key, "calls": e.count, "self_s": self_s(e), "share": self_s(e) / step_s}
                        for e in ops[:top]],
        })
        del step
    return results


def bench_compile(ctx: Context, plan: Plan) -> dict:
    """SHAQ training step at the plan's compile shape: eager against torch.compile."""
    shape = plan.compile_shape
    bytes_per_step = shape.batch * shape.seq_len
    _, eager_step = _make_step("shaq", shape, ctx)
    eager = statistics.median(time_calls(eager_step, ctx.device, shape.warmup, shape.repeats))
    _, compiled_step = _make_step("shaq", shape, ctx, compile=True)
    start = time.perf_counter()
    compiled_step()  # compiles forward and backward
    synchronize(ctx.device)
    first_call = time.perf_counter() - start
    compiled = statistics.median(time_calls(compiled_step, ctx.device, shape.warmup, shape.repeats))
    return {
        "shape": shape.name, "eager_bytes_per_s": bytes_per_step / eager,
        "compiled_bytes_per_s": bytes_per_step / compiled, "speedup": eager / compiled,
        "first_call_s": first_call,
    }


def assess_contention(contention: dict) -> dict:
    """quiet (bool), summary and warning from what CpuMonitor and the two peaks measured."""
    idle = contention["others_cores_idle"]
    measured = [v for v in [idle, *contention["others_cores"].values()] if v is not None]
    start, end = contention["peak_gflops_start_end"]
    drift = abs(end - start) / start
    problems = []
    if measured and max(measured) >= QUIET_OTHERS_CORES:
        problems.append(f"other processes used up to {max(measured):.2f} cores while this ran")
    if drift >= PEAK_DRIFT:
        problems.append(f"the matmul peak moved by {100 * drift:.0f}% during the run")
    others = f"{max(measured):.2f} cores at most" if measured else "unknown (no /proc/stat)"
    summary = (f"other processes used {others}; matmul peak {start:.0f} GFLOP/s at the start, "
               f"{end:.0f} at the end")
    warning = "; ".join(problems) + ": timings are unreliable, re-run on a quiet machine" if problems else None
    return {"quiet": not problems, "summary": summary, "warning": warning}


# ----------------------------------------------------------------------------- report


def _fmt(value) -> str:
    """Numbers as people read them: 12,345 / 123 / 1.23 / 0.0123."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value)


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [headers] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_section(name: str, data) -> str:
    """The human-readable table of one section of the results."""
    if name == "matmul_peak":
        rows = [[backend, g] for backend, g in data["gflops"].items()]
        return f"matmul peak ({data['n']}^2, {data['dtype']})\n" + table(["backend", "GFLOP/s"], rows)
    if name == "rnn":
        rows = [[r["hidden"], r["seq_len"], r["lstm_bytes_per_s"], r["qrnn1_bytes_per_s"], r["qrnn1_speedup"],
                 _pct(r["qrnn1_peak_fraction"]), r["qrnn2_bytes_per_s"], r["qrnn2_speedup"],
                 _pct(r["qrnn2_peak_fraction"])]
                for r in data]
        headers = ["H", "T", "LSTM B/s", "QRNN1 B/s", "x LSTM", "of peak", "QRNN2 B/s", "x LSTM", "of peak"]
        return f"one layer, forward+backward, batch {data[0]['batch']}\n" + table(headers, rows)
    if name == "forget_mult":
        rows = [[r["hidden"], r["seq_len"], r["reference_s"] * 1e3, r["fast_s"] * 1e3, r["speedup"],
                 r["qrnn_pool_s"] * 1e3, r["qrnn1_layer_s"] * 1e3, _pct(r["forget_mult_share"]),
                 _pct(r["qrnn_pool_share"])] for r in data]
        headers = ["H", "T", "ref ms", "fast ms", "speedup", "pool ms", "QRNN1 ms", "fm share", "pool share"]
        return "forget-mult, forward+backward (share = of the QRNN window-1 layer's time)\n" + table(headers, rows)
    if name == "attention":
        rows = [[r["memory"], r["keys"], r["reference_s"] * 1e3, r["ours_s"] * 1e3, r["speedup"],
                 r["ours_no_dropout_s"] * 1e3] for r in data]
        headers = ["memory", "keys", "reference ms", "ours ms", "speedup", "ours p=0 ms"]
        r0 = data[0]
        title = (f"attention, forward+backward, d {r0['d_model']}, T {r0['seq_len']}, B {r0['batch']}, "
                 f"dropout {r0['dropout']}")
        return title + "\n" + table(headers, rows)
    if name == "step":
        rows = []
        for e in data:
            for kind, m in e["models"].items():
                rows.append([e["shape"], kind, m["bytes_per_s"], m["step_s"], _pct(m["mfu"]), m["peak_memory_mb"],
                             m["params"] / 1e6])
        headers = ["shape", "model", "bytes/s", "step s", "MFU", "peak MB", "params M"]
        lines = ["training step (forward, backward, clip, LAMB)", table(headers, rows)]
        for e in data:
            line = (f"{e['shape']} (B {e['batch']}, T {e['seq_len']}): SHAQ / SHARNN {e['shaq_over_sharnn']:.2f}x, "
                    f"SHARNN / reference-style {e['sharnn_over_reference']:.2f}x")
            if e["quoted_original_bytes_per_s"] is not None:
                line += f"; quoted original sha-rnn on this CPU: {e['quoted_original_bytes_per_s']:.0f} bytes/s"
            lines.append(line)
        return "\n".join(lines)
    if name == "profile":
        blocks = []
        for r in data:
            phases = ", ".join(f"{k} {_pct(v / r['step_s'])}" for k, v in r["phases_s"].items())
            rows = [[o["op"][:48], o["calls"], o["self_s"] * 1e3, _pct(o["share"])] for o in r["top_ops"]]
            blocks.append(f"profile of one {r['model']} step at {r['shape']}: {r['step_s']:.2f} s ({phases})\n"
                          + table(["operator", "calls", "self ms", "of step"], rows))
        return "\n\n".join(blocks)
    if name == "compile":
        return (f"torch.compile, SHAQ step at {data['shape']}: eager {data['eager_bytes_per_s']:.0f} bytes/s, "
                f"compiled {data['compiled_bytes_per_s']:.0f} bytes/s ({data['speedup']:.2f}x), "
                f"first call {data['first_call_s']:.0f} s")
    raise ValueError(f"no table for section {name!r}")


# ----------------------------------------------------------------------------- main


SECTIONS = ("rnn", "forget_mult", "attention", "step")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shaq.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (under a minute)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPUs with AVX512-BF16/AMX, GPUs)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--compile", action="store_true",
                        help="time a torch.compile'd SHAQ step against eager (costs minutes of compilation on "
                             "a CPU); runs alone unless --only names sections too")
    parser.add_argument("--profile", metavar="SHAPE",
                        help="profile one SHAQ and one SHARNN step at this step shape (cpu, small, paper; with "
                             "--quick: smoke, tiny-paper): time by phase and by operator; runs alone unless "
                             "--only names sections too")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's malloc as it is (see tune_cpu_allocator)")
    return parser.parse_args(argv)


def _machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if device.type == "cpu":
        info["cpu_bf16"] = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                            "amx": torch.cpu._is_amx_tile_supported()}
        info["forget_mult_extension"] = _extension_for(torch.empty(0)) is not None
        info["onednn_linear"] = onednn_available()
    return info


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its tables, and return (and optionally write) the results."""
    args = parse_args(argv)
    device = pick_device(args.device)
    plan = quick_plan() if args.quick else full_plan()
    shapes = [s.name for s in plan.steps]
    if args.profile and args.profile not in shapes:
        raise SystemExit(f"--profile takes one of the {'quick' if args.quick else 'full'} plan's step shapes "
                         f"{shapes}, not {args.profile!r}")
    ctx = Context(device, args.bf16, plan.repeats)
    monitor = CpuMonitor()
    # --compile or --profile alone runs only that; with --only, those sections as well.
    sections = args.only or (() if args.profile or args.compile else SECTIONS)

    malloc_tuned = device.type == "cpu" and not args.no_malloc_tuning and tune_cpu_allocator()
    results = {"meta": _machine(device) | {
        "quick": args.quick, "bf16": args.bf16, "malloc_tuned": malloc_tuned,
        "argv": sys.argv[1:] if argv is None else argv}}
    idle = monitor.idle_probe(plan.idle_probe_s)
    contention = {"loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                  "others_cores_idle": idle, "others_cores": {}}
    results["contention"] = contention
    if idle is not None and idle >= QUIET_OTHERS_CORES:
        print(f"WARNING: other processes already use {idle:.2f} cores: timings will be unreliable",
              file=sys.stderr)
    machine = results["meta"]["cpu"] if device.type == "cpu" else results["meta"].get("gpu", device)
    options = [f"{ctx.repeats} repeats"]
    for flag, text in [(args.bf16, "bf16 autocast"), (args.quick, "quick"), (malloc_tuned, "malloc keeps freed memory")]:
        if flag:
            options.append(text)
    print(f"shaq.bench on {machine} ({device}; {', '.join(options)})")

    def run_section(name: str, fn: Callable[[], object]) -> None:
        monitor.start()
        data = fn()
        contention["others_cores"][name] = monitor.stop()
        results[name] = data
        print("\n" + format_section(name, data), flush=True)

    run_section("matmul_peak", lambda: matmul_peak(ctx, plan.matmul_n))
    peak = results["matmul_peak"]["peak_gflops"]
    if "rnn" in sections:
        run_section("rnn", lambda: bench_rnn(ctx, plan, peak))
    if "forget_mult" in sections:
        run_section("forget_mult", lambda: bench_forget_mult(ctx, plan))
    if "attention" in sections:
        run_section("attention", lambda: bench_attention(ctx, plan))
    if "step" in sections:
        run_section("step", lambda: bench_steps(ctx, plan, peak))
    if args.compile:
        run_section("compile", lambda: bench_compile(ctx, plan))
    if args.profile:
        run_section("profile", lambda: profile_steps(ctx, plan, args.profile))

    # Load that /proc/stat cannot see (other VMs on the same host sharing its caches, memory
    # bandwidth and clock) still shows as a matmul peak that moved during the run.
    contention["peak_gflops_start_end"] = [peak, matmul_peak(ctx, plan.matmul_n)["peak_gflops"]]
    contention.update(assess_contention(contention))
    print(f"\ncontention: {contention['summary']}")
    if not contention["quiet"]:
        print("WARNING: CPU NOT QUIET: " + contention["warning"], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
