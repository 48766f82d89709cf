"""Speed benchmarks: QRNN against LSTM, the forget-mult, attention memory, training steps, the
training loop.

    python -m shaq.bench                       # full run, the shapes of the README tables
    python -m shaq.bench --quick               # small shapes, few repeats: well under a minute
    python -m shaq.bench --json out.json       # also write every number as JSON
    python -m shaq.bench --bf16 --device cuda  # bfloat16 autocast, on a GPU
    python -m shaq.bench --compile             # a torch.compile'd SHAQ step against eager
    python -m shaq.bench --profile paper       # where a paper-shape training step's time goes
    python -m shaq.bench --step-shapes cpu small  # steps without the paper shape (less memory)

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
- step: whole training steps (forward, backward, clip, LAMB) of SHAQ, shaq's SHARNN,
  `ReferenceStyleSHARNN` (a re-creation of how the original sha-rnn code computes) and
  Shatter (`shaq.shatter`), each at the shape's preset, with bytes/s, peak memory and model
  FLOP utilisation (MFU, see `shaq.flops`).
- trainer: SHAQ's training bytes/s in `shaq.train.Trainer` against its isolated step at the
  same shape, measured in one sitting (the goal: at least 95% of the isolated step's).
- codec: `shaq.compress` and `shaq.decompress` in bytes/s with one lane and with the default
  number, SHAQ at the trainer section's preset (`shaq.bench.codec`).
- compile (only with --compile): a torch.compile'd SHAQ step at the cpu preset against eager.
- profile (only with --profile SHAPE): one SHAQ and one SHARNN step at that shape under
  torch.profiler: time by phase and the operators that take it.

On the CPU the benchmark first makes glibc keep freed memory for reuse
(`tune_cpu_allocator`; --no-malloc-tuning leaves malloc alone), so that the big activations
of a step are not page-faulted in afresh every step. All the models of the step section
(and the trainer) run under the same setting.

Timings are only meaningful on a quiet machine: other processes on the same cores slow
small-op code several times over. The benchmark measures how much CPU other processes take
(from /proc/stat, while it idles for a moment and during every section), and measures the
matmul peak again at the end (other virtual machines sharing the host's caches, memory
bandwidth and clock are invisible to /proc/stat, but move the peak). It warns when either
says the machine was not quiet.

With --bf16 the matmuls run in bfloat16 under autocast (AVX512-BF16 or AMX on a CPU); the
attention's softmax core stays in float32 (see shaq.nn.attention_core).

The package: `harness` (timing, contention, peak memory, allocator), `reference` (the
reference-style model), `sections` (the plans and the measured sections), `report` (the
tables); this module is the command line, and re-exports the names other code uses.
"""

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone

import torch

from shaq.bench.codec import bench_codec
from shaq.bench.harness import (
    QUIET_OTHERS_CORES,
    Context,
    CpuMonitor,
    PeakMemory,
    assess_contention,
    median_time,
    synchronize,
    time_calls,
    tune_cpu_allocator,
)
from shaq.bench.reference import ReferenceStyleAttention, ReferenceStyleSHARNN
from shaq.bench.report import format_section, table
from shaq.bench.sections import (
    Plan,
    StepShape,
    bench_attention,
    bench_compile,
    bench_forget_mult,
    bench_rnn,
    bench_steps,
    bench_trainer,
    full_plan,
    make_step,
    matmul_peak,
    profile_steps,
    quick_plan,
)
from shaq.device import cpu_has_bf16, cpu_name, pick_device

# _extension_for is private; the bench only reports whether the C++ kernels are in use.
from shaq.nn.forget_mult import _extension_for
from shaq.nn.onednn import onednn_available

__all__ = [
    "SECTIONS",
    "Context",
    "CpuMonitor",
    "PeakMemory",
    "Plan",
    "ReferenceStyleAttention",
    "ReferenceStyleSHARNN",
    "StepShape",
    "assess_contention",
    "bench_attention",
    "bench_codec",
    "bench_compile",
    "bench_forget_mult",
    "bench_rnn",
    "bench_steps",
    "bench_trainer",
    "format_section",
    "full_plan",
    "main",
    "make_step",
    "matmul_peak",
    "median_time",
    "parse_args",
    "profile_steps",
    "quick_plan",
    "synchronize",
    "table",
    "time_calls",
    "tune_cpu_allocator",
]

# The sections a run without --only measures, in the order it measures them.
SECTIONS = ("rnn", "forget_mult", "attention", "step", "trainer", "codec")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (sys.argv[1:] when argv is None)."""
    parser = argparse.ArgumentParser(
        prog="python -m shaq.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="small shapes and few repeats (under a minute)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (CPUs with AVX512-BF16/AMX, GPUs)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="time a torch.compile'd SHAQ step against eager (costs minutes of compilation "
        "on a CPU); runs alone unless --only names sections too",
    )
    parser.add_argument(
        "--profile",
        metavar="SHAPE",
        help="profile one SHAQ and one SHARNN step at this step shape (cpu, small, paper; "
        "with --quick: smoke, tiny-paper): time by phase and by operator; runs alone "
        "unless --only names sections too",
    )
    parser.add_argument(
        "--step-shapes",
        nargs="+",
        metavar="SHAPE",
        help="time the step section at only these of the plan's step shapes (full: cpu, small, "
        "paper; --quick: smoke, tiny-paper); the paper shape ran a 24 GiB CPU machine out of "
        "memory",
    )
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc's malloc as it is (see tune_cpu_allocator)",
    )
    return parser.parse_args(argv)


def _machine(device: torch.device) -> dict:
    """What the numbers were measured on: versions, CPU or GPU, which fast paths are in use."""
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if device.type == "cpu":
        info["cpu_bf16"] = {
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "amx": torch.cpu._is_amx_tile_supported(),
        }
        info["forget_mult_extension"] = _extension_for(torch.empty(0)) is not None
        info["onednn_linear"] = onednn_available()
    return info


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its tables, and return (and optionally write) the results."""
    args = parse_args(argv)
    device = pick_device(args.device)
    plan = quick_plan() if args.quick else full_plan()
    shapes = [s.name for s in plan.steps]
    which = "quick" if args.quick else "full"
    if args.profile and args.profile not in shapes:
        raise SystemExit(
            f"--profile takes one of the {which} plan's step shapes {shapes}, not {args.profile!r}"
        )
    if args.step_shapes:
        unknown = sorted(set(args.step_shapes) - set(shapes))
        if unknown:
            raise SystemExit(f"--step-shapes: {unknown} not among the {which} plan's {shapes}")
    step_plan = replace(
        plan, steps=tuple(s for s in plan.steps if s.name in (args.step_shapes or shapes))
    )
    if args.bf16 and device.type == "cpu" and not cpu_has_bf16():
        raise SystemExit(
            "--bf16 on this CPU: it has no bf16 instructions (AVX512-BF16 or AMX), so "
            "oneDNN would emulate bf16 slowly and has no bf16 LSTM at all; run the bench "
            "without --bf16"
        )
    ctx = Context(device, args.bf16, plan.repeats)
    monitor = CpuMonitor()
    # --compile or --profile alone runs only that; with --only, those sections as well.
    sections = args.only or (() if args.profile or args.compile else SECTIONS)

    malloc_tuned = device.type == "cpu" and not args.no_malloc_tuning and tune_cpu_allocator()
    results = {
        "meta": _machine(device)
        | {
            "quick": args.quick,
            "bf16": args.bf16,
            "malloc_tuned": malloc_tuned,
            "argv": sys.argv[1:] if argv is None else argv,
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    }
    idle = monitor.idle_probe(plan.idle_probe_s)
    contention = {
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "others_cores_idle": idle,
        "others_cores": {},
    }
    results["contention"] = contention
    if idle is not None and idle >= QUIET_OTHERS_CORES:
        print(
            f"WARNING: other processes already use {idle:.2f} cores: timings will be unreliable",
            file=sys.stderr,
        )
    machine = results["meta"]["cpu"] if device.type == "cpu" else results["meta"].get("gpu", device)
    options = [f"{ctx.repeats} repeats"]
    for flag, text in [
        (args.bf16, "bf16 autocast"),
        (args.quick, "quick"),
        (malloc_tuned, "malloc keeps freed memory"),
    ]:
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
    measured: dict[str, Callable[[], object]] = {
        "rnn": lambda: bench_rnn(ctx, plan, peak),
        "forget_mult": lambda: bench_forget_mult(ctx, plan),
        "attention": lambda: bench_attention(ctx, plan),
        "step": lambda: bench_steps(ctx, step_plan, peak),
        "trainer": lambda: bench_trainer(ctx, plan),
        "codec": lambda: bench_codec(ctx, plan.trainer, plan.codec_positions),
    }
    for name in SECTIONS:
        if name in sections:
            run_section(name, measured[name])
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
