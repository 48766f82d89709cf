"""What the benchmark measures: the run plans and one function per measured section.

Each section function takes a `Context` (device, bf16, repeats) and a `Plan` (the shapes of a
full or --quick run) and returns plain data (dicts and lists of numbers) that
`shaq.bench.report` turns into a table and `--json` writes out as it is.
"""

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from shaq.bench.harness import Context, PeakMemory, median_time, synchronize, time_calls
from shaq.bench.reference import ReferenceStyleAttention, ReferenceStyleSHARNN
from shaq.byte_lm import ModelConfig, State
from shaq.flops import train_flops_per_byte
from shaq.models import build_model, detach, model_config
from shaq.nn import QRNN, SingleHeadAttention, forget_mult, forget_mult_reference
from shaq.nn.forget_mult import qrnn_pool
from shaq.nn.onednn import linear as onednn_linear
from shaq.nn.onednn import onednn_available
from shaq.optim import LAMB
from shaq.train import Trainer
from shaq.train_config import TrainConfig

# Throughput of the original sha-rnn code in float32 at two of the full plan's step shapes, as
# quoted in the issue that asked for this benchmark (measured on the CPU this project began
# on; the original cannot run here). The step table prints them next to its rows, as context.
QUOTED_ORIGINAL_BYTES_PER_S = {"paper": 228.0, "small": 1180.0}


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class StepShape:
    """One training-step comparison: a model shape, batch B and segment length T.

    The shape is a preset ('paper', 'cpu' or 'smoke') and overrides of fields that every
    model's config has (d_model, memory_len, ...): each model kind gets its own config at that
    preset (`config`), so that the models of one row are of comparable size.
    """

    name: str
    preset: str
    batch: int
    seq_len: int
    warmup: int
    repeats: int
    overrides: dict = field(default_factory=dict)

    def config(self, kind: str) -> ModelConfig:
        """The config of model `kind` (one of STEP_MODELS) at this shape. The reference-style
        SHA-RNN re-creates shaq's SHARNN, so it takes SHARNN's config."""
        name = "sharnn" if kind == "reference" else kind
        return model_config(name, self.preset, **self.overrides)


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
    trainer: StepShape  # SHAQ in the Trainer against its isolated step; repeats = timed steps
    codec_positions: int  # bytes per lane that the compressor section codes
    idle_probe_s: float


def full_plan() -> Plan:
    """The full run: the `cpu` preset, a d-256 model with the paper's memory, the paper's shape."""
    # Two or more warm-up steps: the first steps of a model also fault in the pages its
    # activations need (several GB at the paper's shape); only from about the third step on
    # does the allocator reuse memory without asking the kernel for more.
    cpu = StepShape("cpu", "cpu", 16, 256, warmup=3, repeats=5)
    # The shape of the quoted 1,180 bytes/s: emsize 256, Boom 1024, 4 blocks, bptt 256,
    # the paper's memory and dropouts.
    small = StepShape("small", "paper", 16, 256, warmup=2, repeats=3, overrides={"d_model": 256})
    paper = StepShape("paper", "paper", 16, 1024, warmup=2, repeats=2)
    return Plan(
        matmul_n=4096,
        repeats=5,
        rnn_hidden=(256, 1024),
        rnn_seq=(256, 1024),
        rnn_batch=16,
        attention_d=1024,
        attention_seq=1024,
        attention_batch=16,
        attention_memory=(0, 1000, 5000),
        attention_dropout=0.1,
        steps=(cpu, small, paper),
        compile_shape=cpu,
        trainer=replace(cpu, repeats=30),
        codec_positions=256,
        idle_probe_s=2.0,
    )


def quick_plan() -> Plan:
    """--quick: tiny shapes and few repeats, to check that every section runs."""
    smoke = StepShape("smoke", "smoke", 4, 32, warmup=1, repeats=2)
    tiny = StepShape(
        "tiny-paper",
        "paper",
        4,
        64,
        warmup=1,
        repeats=2,
        overrides={"d_model": 64, "memory_len": 192},
    )
    return Plan(
        matmul_n=512,
        repeats=3,
        rnn_hidden=(64,),
        rnn_seq=(32,),
        rnn_batch=16,
        attention_d=64,
        attention_seq=32,
        attention_batch=4,
        attention_memory=(0, 64, 256),
        attention_dropout=0.1,
        steps=(smoke, tiny),
        compile_shape=smoke,
        trainer=replace(smoke, repeats=10),
        codec_positions=16,
        idle_probe_s=0.5,
    )


# ----------------------------------------------------------------------------- sections


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


def make_step(
    kind: str, shape: StepShape, ctx: Context, compile: bool = False
) -> tuple[nn.Module, Callable[[], None]]:
    """A model of `kind` (one of STEP_MODELS) and a closure running one training step on random
    bytes.

    The step is what a trainer does per segment: forward, backward, clip the gradient norm,
    a LAMB step (clip and LAMB as TrainConfig's defaults set them), and carry the detached
    state (recurrent states and memories) on.
    """
    c, B, T, device = shape.config(kind), shape.batch, shape.seq_len, ctx.device
    torch.manual_seed(0)
    x = torch.randint(0, c.vocab_size, (B, T + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    if kind == "reference":
        model = ReferenceStyleSHARNN(c).to(device)
        inputs, targets = inputs.t().contiguous(), targets.t().contiguous()  # time-major
        with torch.no_grad():
            hidden = model(inputs[:1])[2]
        memory = [
            torch.randn(c.memory_len, B, c.d_model, device=device)
            if i in c.attention_blocks
            else None
            for i in range(c.n_layers)
        ]
        carried = (hidden, memory)

        def forward(carry):
            _, loss, hidden, memory = model(inputs, *carry, targets=targets)
            hidden = [tuple(t.detach() for t in pair) for pair in hidden]
            return loss, (hidden, [m.detach() if m is not None else None for m in memory])
    else:
        model = build_model(kind, c).to(device)
        carried = _initial_state(model, inputs)
        run = torch.compile(model) if compile else model

        def forward(carry):
            out = run(inputs, carry, targets)
            return out.loss, detach(out.state)

    model.train()
    optimizer = LAMB(
        model.parameters(),
        lr=TrainConfig.lr,
        weight_decay=TrainConfig.weight_decay,
        min_trust=TrainConfig.min_trust,
    )
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
            torch.nn.utils.clip_grad_norm_(params, TrainConfig.clip)
        with record_function("optimizer"):
            optimizer.step()
        carried = new_carried

    return model, step


# The models of the step section: shaq's three (by their names in shaq.models.MODELS) and the
# reference-style SHA-RNN.
STEP_MODELS = ("shaq", "sharnn", "reference", "shatter")


def bench_steps(ctx: Context, plan: Plan, peak_gflops: float) -> list[dict]:
    """Training steps of SHAQ, SHARNN, ReferenceStyleSHARNN and ShatterLM at each plan shape."""
    results = []
    memory = PeakMemory(ctx.device)
    for shape in plan.steps:
        B, T = shape.batch, shape.seq_len
        entry = {
            "shape": shape.name,
            "batch": B,
            "seq_len": T,
            "preset": shape.preset,
            "overrides": shape.overrides,
            "models": {},
        }
        for kind in STEP_MODELS:
            memory.reset()
            model, step = make_step(kind, shape, ctx)
            times = time_calls(step, ctx.device, shape.warmup, shape.repeats)
            peak = memory.peak()
            # The model's own config: SHAQ's has its QRNNs filled in.
            c = model.config
            flops = train_flops_per_byte(c, T, max(c.memory_len - T, 0))
            seconds = statistics.median(times)
            entry["models"][kind] = {
                "step_s": seconds,
                "bytes_per_s": B * T / seconds,
                "peak_memory_mb": peak / 2**20 if peak is not None else None,
                "params": sum(p.numel() for p in model.parameters()),
                "train_flops_per_byte": flops,
                "mfu": flops * B * T / seconds / (peak_gflops * 1e9),
                "config": c.to_dict(),
            }
            del model, step
        m = entry["models"]
        entry["shaq_over_sharnn"] = m["shaq"]["bytes_per_s"] / m["sharnn"]["bytes_per_s"]
        entry["sharnn_over_reference"] = m["sharnn"]["bytes_per_s"] / m["reference"]["bytes_per_s"]
        entry["shatter_over_shaq"] = m["shatter"]["bytes_per_s"] / m["shaq"]["bytes_per_s"]
        entry["quoted_original_bytes_per_s"] = QUOTED_ORIGINAL_BYTES_PER_S.get(shape.name)
        results.append(entry)
    return results


# The goal of the trainer section: the training loop runs at >= 95% of the isolated step's speed.
TRAINER_TARGET = 0.95


def bench_trainer(ctx: Context, plan: Plan) -> dict:
    """SHAQ's training bytes/s in `shaq.train.Trainer` against its isolated step, in one sitting.

    The isolated step is `make_step`'s (memory full from the start), timed once before and once
    after the Trainer runs: a machine whose speed drifts during the section moves both alike.
    Its rate is the mean over those steps, as the Trainer's is. The Trainer trains the same
    model at the same B and T on the stand-in data, with a fixed segment length and no
    validation or checkpoint between steps (eval_interval=0, save_interval=0: both only at the
    end), in a temporary folder. Its rate is bytes / wall-clock seconds between the metrics of
    the last untimed and the last step, so all the loop does between steps counts (the log line,
    the callback, the progress bar, the position kept in case a step is non-finite), and the
    validation and test after the last step do not. Its memory starts empty and is full after
    memory_len / T steps: those and the shape's warm-up steps are not timed.
    """
    shape = plan.trainer
    B, T = shape.batch, shape.seq_len
    shaq_config = shape.config("shaq")
    untimed = math.ceil(shaq_config.memory_len / T) + shape.warmup
    steps = untimed + shape.repeats
    metrics: list[dict] = []
    # The Trainer makes float32 matmuls use TF32 on CUDA, process-wide: built first, so that both
    # measurements run under its setting; the sections after this one get theirs back.
    precision = torch.get_float32_matmul_precision()
    try:
        with tempfile.TemporaryDirectory(prefix="shaq-bench-") as tmp:
            config = TrainConfig.preset(
                shape.preset,
                model="shaq",
                data="standin",
                batch_size=B,
                seq_len=T,
                # Bytes for every step and more (training gets 90% of them): an epoch that ended
                # would start the next step with an empty memory.
                max_bytes=2 * B * (steps * T + 2),
                variable_seq_len=False,
                epochs=None,
                steps=steps,
                minutes=None,
                eval_interval=0,
                eval_each_epoch=False,
                save_interval=0,
                device=str(ctx.device),
                amp="bf16" if ctx.bf16 else "off",
                out_dir=str(Path(tmp) / "run"),
            )
            trainer = Trainer(config, shaq_config, callback=metrics.append, verbose=False)
            _, step = make_step("shaq", shape, ctx)
            before = time_calls(step, ctx.device, shape.warmup, shape.repeats)
            trainer.fit()
            after = time_calls(step, ctx.device, shape.warmup, shape.repeats)
    finally:
        torch.set_float32_matmul_precision(precision)
    first, last = metrics[untimed - 1], metrics[-1]
    trainer_rate = (last["bytes"] - first["bytes"]) / (last["time"] - first["time"])

    def rate(times: list[float]) -> float:
        return B * T * len(times) / sum(times)

    isolated_rate = rate(before + after)
    ratio = trainer_rate / isolated_rate
    return {
        "shape": shape.name,
        "model": "shaq",
        "batch": B,
        "seq_len": T,
        "preset": shape.preset,
        "untimed_steps": untimed,
        "timed_steps": shape.repeats,
        "eval_interval": config.eval_interval,
        "save_interval": config.save_interval,
        "trainer_bytes_per_s": trainer_rate,
        "isolated_bytes_per_s": isolated_rate,
        "isolated_before_bytes_per_s": rate(before),
        "isolated_after_bytes_per_s": rate(after),
        "ratio": ratio,
        "target": TRAINER_TARGET,
        "met": ratio >= TRAINER_TARGET,
    }


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
        _, step = make_step(kind, shape, ctx)
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
        results.append(
            {
                "shape": shape.name,
                "model": kind,
                "step_s": step_s,
                "phases_s": phases,
                "top_ops": [
                    {
                        "op": e.key,
                        "calls": e.count,
                        "self_s": self_s(e),
                        "share": self_s(e) / step_s,
                    }
                    for e in ops[:top]
                ],
            }
        )
        del step
    return results


def bench_compile(ctx: Context, plan: Plan) -> dict:
    """SHAQ training step at the plan's compile shape: eager against torch.compile."""
    shape = plan.compile_shape
    bytes_per_step = shape.batch * shape.seq_len
    _, eager_step = make_step("shaq", shape, ctx)
    eager = statistics.median(time_calls(eager_step, ctx.device, shape.warmup, shape.repeats))
    _, compiled_step = make_step("shaq", shape, ctx, compile=True)
    start = time.perf_counter()
    compiled_step()  # compiles forward and backward
    synchronize(ctx.device)
    first_call = time.perf_counter() - start
    compiled = statistics.median(time_calls(compiled_step, ctx.device, shape.warmup, shape.repeats))
    return {
        "shape": shape.name,
        "eager_bytes_per_s": bytes_per_step / eager,
        "compiled_bytes_per_s": bytes_per_step / compiled,
        "speedup": eager / compiled,
        "first_call_s": first_call,
    }
