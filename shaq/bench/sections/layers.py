"""The sections that time one piece of a model: the matmul peak, one recurrent layer (QRNN
against LSTM), the forget-mult, and attention against memory length.
"""

from collections.abc import Callable

import torch
from torch import nn

from shaq.bench.harness import Context, median_time
from shaq.bench.reference import ReferenceStyleAttention
from shaq.bench.sections.plan import Plan
from shaq.nn import QRNN, SingleHeadAttention, forget_mult, forget_mult_reference
from shaq.nn.forget_mult import qrnn_pool
from shaq.nn.onednn import linear as onednn_linear
from shaq.nn.onednn import onednn_available


def matmul_peak(ctx: Context, n: int) -> dict:
    """GFLOP/s of an n x n @ n x n matmul through each available backend; the best is the peak."""
    dtype = torch.bfloat16 if ctx.bf16 else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    flops = 2 * n**3
    backends = {"torch.mm": lambda: a @ b}
    if ctx.device.type == "cpu" and dtype == torch.float32 and onednn_available():
        backends["onednn"] = lambda: onednn_linear(a, b)
    gflops = {
        name: flops / median_time(fn, ctx.device, 1, ctx.repeats) / 1e9
        for name, fn in backends.items()
    }
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "gflops": gflops,
        "peak_gflops": max(gflops.values()),
    }


def _forward_backward(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, ctx: Context
) -> Callable[[], None]:
    """A closure running layer(x) (its first output) forward and backward, under ctx's autocast."""

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
                run = _forward_backward(layer.to(ctx.device), x, grad, ctx)
                seconds = median_time(run, ctx.device, 1, ctx.repeats)
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

            # Defaults bind this iteration's tensors: a closure reads loop variables when called.
            def run_forget_mult(fn=forget_mult, f=f, z=z, grad=grad):
                fn(f, z).backward(grad)

            def run_pool(gates=gates, grad=grad):
                qrnn_pool(gates)[0].backward(grad)

            x = torch.randn(B, T, H, device=ctx.device, requires_grad=True)
            layer = QRNN(H, H).to(ctx.device)
            fast = median_time(run_forget_mult, ctx.device, 1, ctx.repeats)
            reference = median_time(
                lambda: run_forget_mult(forget_mult_reference), ctx.device, 1, ctx.repeats
            )
            pool = median_time(run_pool, ctx.device, 1, ctx.repeats)
            qrnn = median_time(_forward_backward(layer, x, grad, ctx), ctx.device, 1, ctx.repeats)
            rows.append(
                {
                    "hidden": H,
                    "seq_len": T,
                    "batch": B,
                    "reference_s": reference,
                    "fast_s": fast,
                    "speedup": reference / fast,
                    "qrnn_pool_s": pool,
                    "qrnn1_layer_s": qrnn,
                    "forget_mult_share": fast / qrnn,
                    "qrnn_pool_share": pool / qrnn,
                }
            )
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
        query_tm = query.detach().transpose(0, 1).requires_grad_()
        kv_tm = kv.detach().transpose(0, 1).requires_grad_()

        # Defaults bind this iteration's tensors: a closure reads loop variables when called.
        def run_ours(attention, query=query, kv=kv, M=M, grad=grad):
            def run():
                with ctx.autocast():
                    # The memory is detached in training: frozen=M, as the model passes it.
                    y = attention(query, kv, frozen=M)[0]
                y.backward(grad.to(y.dtype))

            return run

        def run_ref(query_tm=query_tm, kv_tm=kv_tm, mask=mask, grad=grad):
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
