"""The checks that `python -m shaq.gpu_check` runs (see there for what each one checks and
why), the plans they run at, and the table row each check returns.

Each check returns its rows of the table and its numbers, which --json writes out.
"""

import gc
import math
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from shaq import bench
from shaq.device import cpu_has_bf16
from shaq.train import Trainer, TrainingError
from shaq.train_config import TrainConfig

# The tests of a checkout; an installed shaq has none (then run with --skip-tests).
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"


@dataclass(frozen=True)
class CheckPlan:
    """The shapes, repeat counts and time limits of one run."""

    name: str  # 'paper' or 'smoke', shown in the table
    rnn_hidden: int  # one-layer comparison: H, T and B
    rnn_seq: int
    rnn_batch: int
    rnn_repeats: int  # timed calls per layer (after one warm-up call)
    matmul_n: int  # side of the square matmul whose speed is the "peak" of the one-layer rows
    step: bench.StepShape  # the step comparison: preset, B, T, warm-up, at most `repeats` timed
    step_budget_s: float  # stop timing a model once its timed steps have taken this long
    train_preset: str  # TrainConfig preset of the training check; its model is step.config("shaq")
    train_steps: int
    loss_window: (
        int  # the loss must fall from the mean of the first to the mean of the last this many steps
    )
    train_minutes: float  # the Trainer stops here even before train_steps
    eval_bytes: int  # valid and test prefix the Trainer evaluates at the end
    tests_timeout_s: float


# An H200 runs a paper-shape step in well under a second; these limits keep a slower GPU at
# about 4 minutes too: tests <= 150 s (a fresh machine first compiles the CPU forget-mult for
# the test that compares against it), steps <= 2 x (3 warm-up + 15 s), training <= 2 minutes.
GPU_PLAN = CheckPlan(
    name="paper",
    rnn_hidden=1024,
    rnn_seq=1024,
    rnn_batch=16,
    rnn_repeats=10,
    matmul_n=8192,
    step=bench.StepShape("paper", "paper", 16, 1024, warmup=3, repeats=20),
    step_budget_s=15.0,
    train_preset="paper",
    train_steps=200,
    loss_window=20,
    train_minutes=2.0,
    eval_bytes=131_072,
    tests_timeout_s=150.0,
)

SMOKE_PLAN = CheckPlan(
    name="smoke",
    rnn_hidden=64,
    rnn_seq=64,
    rnn_batch=4,
    rnn_repeats=3,
    matmul_n=256,
    step=bench.StepShape("smoke", "smoke", 4, 64, warmup=1, repeats=3),
    step_budget_s=5.0,
    train_preset="smoke",
    train_steps=20,
    loss_window=5,
    train_minutes=1.0,
    eval_bytes=4096,
    tests_timeout_s=150.0,
)


@dataclass
class Row:
    """One line of the table. status: 'ok', 'FAIL: why', or a word saying why it did not run."""

    check: str
    shape: str
    precision: str
    result: str
    status: str

    @property
    def failed(self) -> bool:
        return self.status.startswith("FAIL")


# ----------------------------------------------------------------------------- helpers


def time_within(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, budget_s: float
) -> list[float]:
    """Seconds of each of up to `repeats` timed calls of fn after `warmup` untimed ones, stopping
    early once the timed calls have taken `budget_s` (at least one call is timed)."""
    bench.time_calls(fn, device, warmup, 0)
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        times += bench.time_calls(fn, device, 0, 1)
    return times


def free_memory(device: torch.device) -> None:
    """Give back what the last check held, so the next one's peak memory starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s:,.0f} B/s"


def _memory(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "n/a"
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def error_cell(err: BaseException) -> str:
    """An exception as one short table cell (no pipes or newlines, which would break the table)."""
    text = f"{type(err).__name__}: {err}".replace("|", "/").replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


# ----------------------------------------------------------------------------- the checks


def run_tests(tests_dir: Path, keyword: str, timeout_s: float) -> dict:
    """Run `python -m pytest tests_dir -k keyword` in a subprocess; its counts and exit status.

    Returns passed, failed, errors, skipped, returncode, seconds and output (pytest's stdout and
    stderr). Raises FileNotFoundError without tests_dir, subprocess.TimeoutExpired past timeout_s.
    """
    if not tests_dir.is_dir():
        raise FileNotFoundError(
            f"no tests at {tests_dir}: run from a checkout of shaq, or pass --skip-tests"
        )
    with tempfile.TemporaryDirectory(prefix="shaq-gpu-check-") as tmp:
        report = Path(tmp) / "report.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(tests_dir),
            "-k",
            keyword,
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
        ]
        start = time.perf_counter()
        # From the checkout's root, so that its pytest settings and conftest apply.
        done = subprocess.run(
            command, cwd=tests_dir.parent, capture_output=True, text=True, timeout=timeout_s
        )
        counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        if report.exists():  # absent when pytest could not start
            for suite in ElementTree.parse(report).getroot().iter("testsuite"):
                tests, failed, errors, skipped = (
                    int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")
                )
                counts["passed"] += tests - failed - errors - skipped
                counts["failed"] += failed
                counts["errors"] += errors
                counts["skipped"] += skipped
    return counts | {
        "returncode": done.returncode,
        "seconds": time.perf_counter() - start,
        "output": done.stdout + done.stderr,
    }


def check_cuda_tests(plan: CheckPlan, cuda: bool) -> tuple[list[Row], dict]:
    """The CUDA tests of tests/ (see run_tests); without a GPU they report themselves skipped."""
    result = run_tests(TESTS_DIR, "cuda", plan.tests_timeout_s)
    failed = result["failed"] + result["errors"]
    counts = f"{result['passed']} passed, {failed} failed, {result['skipped']} skipped"
    status = "ok"
    if failed:
        status = f"FAIL: {failed} failed"
    elif result["returncode"] == 5:  # pytest's "no tests collected"
        status = "FAIL: no test matches -k cuda"
    elif result["returncode"]:
        status = f"FAIL: pytest exited with status {result['returncode']}"
    elif not cuda:
        status = "ok (skipped: no CUDA device)"
    if status.startswith("FAIL"):
        print(result["output"][-4000:], file=sys.stderr)
    row = Row(
        "CUDA tests", "`pytest tests -k cuda`", "", f"{counts} ({result['seconds']:.0f} s)", status
    )
    return [row], {k: v for k, v in result.items() if k != "output"}


def check_one_layer(device: torch.device, plan: CheckPlan) -> tuple[list[Row], list[dict]]:
    """nn.LSTM against a window-1 QRNN, one layer forward+backward, float32 and bf16 autocast.

    The "of peak" figure is the QRNN's matmul rate against a plain matmul's in the same dtype.
    """
    bench_plan = replace(
        bench.quick_plan(),
        rnn_hidden=(plan.rnn_hidden,),
        rnn_seq=(plan.rnn_seq,),
        rnn_batch=plan.rnn_batch,
    )
    lstm = "cuDNN LSTM" if device.type == "cuda" else "nn.LSTM"
    shape = f"H {plan.rnn_hidden}, T {plan.rnn_seq}, B {plan.rnn_batch}"
    check = f"one layer fwd+bwd: {lstm} vs QRNN"
    rows, numbers = [], []
    for bf16 in (False, True):
        precision = "bf16 autocast" if bf16 else "fp32 (TF32)" if device.type == "cuda" else "fp32"
        if bf16 and device.type == "cpu" and not cpu_has_bf16():
            # (shaq's models keep such LSTMs in float32 under autocast; a bare nn.LSTM raises)
            rows.append(
                Row(
                    check,
                    shape,
                    precision,
                    "not run",
                    "skipped: oneDNN has no bf16 LSTM on a CPU without AVX512-BF16 or AMX",
                )
            )
            continue
        ctx = bench.Context(device, bf16, plan.rnn_repeats)
        peak = bench.matmul_peak(ctx, plan.matmul_n)["peak_gflops"]
        r = bench.bench_rnn(ctx, bench_plan, peak)[0]
        numbers.append({"precision": precision, "matmul_peak_gflops": peak} | r)
        result = (
            f"LSTM {_rate(r['lstm_bytes_per_s'])}, QRNN {_rate(r['qrnn1_bytes_per_s'])}: QRNN "
            f"{r['qrnn1_speedup']:.2f}x ({100 * r['qrnn1_peak_fraction']:.0f}% of matmul peak)"
        )
        rows.append(Row(check, shape, precision, result, "ok"))
        free_memory(device)
    return rows, numbers


def check_steps(device: torch.device, plan: CheckPlan) -> tuple[list[Row], dict]:
    """Whole training steps of SHAQ and SHA-RNN under bf16 autocast: bytes/s and peak memory."""
    shape = plan.step
    ctx = bench.Context(device, bf16=True, repeats=shape.repeats)
    memory = bench.PeakMemory(device)
    numbers: dict = {
        "shape": shape.name,
        "batch": shape.batch,
        "seq_len": shape.seq_len,
        "models": {},
    }
    for kind in ("shaq", "sharnn"):
        memory.reset()
        # The bench's step builder: the same step as its step table, so the figures compare
        # with the README's.
        _, step = bench.make_step(kind, shape, ctx)
        times = time_within(step, device, shape.warmup, shape.repeats, plan.step_budget_s)
        seconds = statistics.median(times)
        numbers["models"][kind] = {
            "step_s": seconds,
            "timed_steps": len(times),
            "bytes_per_s": shape.batch * shape.seq_len / seconds,
            "peak_memory_bytes": memory.peak(),
        }
        del step
        free_memory(device)
    m = numbers["models"]
    numbers["shaq_over_sharnn"] = m["shaq"]["bytes_per_s"] / m["sharnn"]["bytes_per_s"]
    where = f"{shape.name}, B {shape.batch} x T {shape.seq_len}"
    rows = [
        Row(
            "training step: SHAQ",
            where,
            "bf16 autocast",
            f"{_rate(m['shaq']['bytes_per_s'])} ({numbers['shaq_over_sharnn']:.2f}x SHA-RNN), "
            f"peak {_memory(m['shaq']['peak_memory_bytes'])}",
            "ok",
        ),
        Row(
            "training step: SHA-RNN",
            where,
            "bf16 autocast",
            f"{_rate(m['sharnn']['bytes_per_s'])}, peak "
            f"{_memory(m['sharnn']['peak_memory_bytes'])}",
            "ok",
        ),
    ]
    return rows, numbers


def check_training(device: torch.device, plan: CheckPlan) -> tuple[list[Row], dict]:
    """train_steps steps of the Trainer (SHAQ, stand-in): the loss falls, every step is finite.

    Non-finite steps are skipped and counted (on_nonfinite='skip'), not stopped at, so that the
    row can say how many there were. A TrainingError from fit() (such as weights that evaluate
    non-finite at the end) fails the check, and the row still reports the steps it saw.
    """
    losses: list[float | None] = []  # the Trainer logs a skipped (non-finite) step's loss as None
    summary, problems = None, []
    with tempfile.TemporaryDirectory(prefix="shaq-gpu-check-") as tmp:
        config = TrainConfig.preset(
            plan.train_preset,
            model="shaq",
            data="standin",
            steps=plan.train_steps,
            minutes=plan.train_minutes,
            eval_interval=0,
            save_interval=0,
            eval_bytes=plan.eval_bytes,
            final_bytes=plan.eval_bytes,
            on_nonfinite="skip",
            device=str(device),
            out_dir=str(Path(tmp) / "run"),
        )
        trainer = Trainer(
            config,
            plan.step.config("shaq"),
            callback=lambda m: losses.append(m["loss"]),
            verbose=False,
        )
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[
            trainer.amp_dtype
        ]
        data = trainer.corpus.name
        try:
            summary = trainer.fit()
        except TrainingError as err:
            problems.append(error_cell(err))
        del trainer
    free_memory(device)
    w = plan.loss_window
    finite = [loss for loss in losses if loss is not None]
    nonfinite = len(losses) - len(finite)
    numbers = {
        "steps": len(losses),
        "nonfinite_steps": nonfinite,
        "loss_window": w,
        "losses": losses,
        "data": data,
        "precision": precision,
        "bytes_per_s": summary["bytes_per_second"] if summary else None,
        "valid_bpb": summary["valid_bpb"] if summary else None,
        "valid_bytes": summary["valid_bytes"] if summary else None,
    }
    if summary and not math.isfinite(summary["valid_bpb"]):
        problems.insert(0, "non-finite validation")
    if len(finite) < 2 * w:
        problems.insert(0, f"{len(finite)} finite steps, too few to compare the first and last {w}")
        loss_text = "loss n/a"
    else:
        first, last = statistics.mean(finite[:w]), statistics.mean(finite[-w:])
        numbers |= {"loss_first": first, "loss_last": last}
        loss_text = f"loss {first:.2f} -> {last:.2f} (means of first, last {w})"
        if last >= first:
            problems.insert(0, "the loss did not fall")
    if nonfinite:
        problems.insert(0, f"{nonfinite} non-finite steps")
    result = f"{loss_text}, {nonfinite} non-finite, {len(losses)} steps"
    if summary:
        if len(losses) < plan.train_steps:
            result += f" (stopped by the {plan.train_minutes:g} min cap)"
        result += f", {_rate(summary['bytes_per_second'])}, valid {summary['valid_bpb']:.2f} bpb"
    row = Row(
        f"{plan.train_steps} training steps (Trainer, {data})",
        f"{plan.name} SHAQ, B {config.batch_size} x T {config.seq_len}",
        precision,
        result,
        "FAIL: " + "; ".join(problems) if problems else "ok",
    )
    return [row], numbers
