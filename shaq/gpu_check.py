"""A GPU check, ready to run: one command, budgeted for about four minutes on one CUDA GPU,
one table.

    python -m shaq.gpu_check                     # paper shapes on the GPU; smoke shapes without one
    python -m shaq.gpu_check --quick             # smoke shapes on whatever device is there
    python -m shaq.gpu_check --cpu --skip-tests  # smoke shapes on the CPU, under a minute:
                                                 # what CI runs
    python -m shaq.gpu_check --json out.json     # also write the table's numbers as JSON

It prints a header line (date, GPU, torch, CUDA) and one Markdown table, ready to paste into the
README, and exits 1 if any check fails. Every check runs even when an earlier one failed, so one
run shows everything that is wrong. The checks, at paper shapes on a GPU:

- CUDA tests: `python -m pytest tests -k cuda` in a subprocess (the tests named for CUDA, which
  skip themselves without a GPU), counted from its JUnit XML report. Fails on a failed test, on
  pytest failing, or when no test matches.
- one layer: nn.LSTM (cuDNN on a GPU) against a window-1 QRNN, forward+backward, H 1024,
  T 1024, B 16, in float32 and under bfloat16 autocast: `shaq.bench.bench_rnn`, the measurement
  of the README's CPU table. Fails only if it raises (bf16 is skipped on a CPU without bf16 LSTM).
- training step: SHAQ against SHA-RNN at `SHARNNConfig.paper()`, B 16 x T 1024, bf16 autocast,
  the bench's step (forward, backward, clip, LAMB, a full 5,000-position memory): bytes/s and
  peak memory (GPU: torch.cuda.max_memory_allocated; CPU: resident set, see
  `shaq.bench.PeakMemory`). Fails only if it raises.
- training: 200 steps of `shaq.train.Trainer` at `TrainConfig.paper()`, SHAQ, on the stand-in
  corpus. Fails unless the mean loss of the last 20 steps is below that of the first 20 and no
  step (nor the validation) is non-finite.

Without a CUDA device (or with --cpu) the same checks run at smoke shapes on the CPU (H 64, T 64,
B 4; `SHARNNConfig.smoke()`; 20 training steps), and the table says that the GPU figures are
absent. On a GPU every float32 matmul may use TF32, in cuBLAS as in cuDNN, as the Trainer sets it:
PyTorch's defaults differ (cuDNN allows TF32, cuBLAS does not), which would time cuDNN's LSTM in
TF32 against the QRNN's matmuls in full float32. Step timing is bounded in wall-clock time
(`CheckPlan.step_budget_s`, `CheckPlan.train_minutes`), so a slower GPU gives fewer repeats rather
than a longer run.

This module is the command: the conditions the checks run under, the table's header row, and
`main`. The checks themselves, their plans and the table's rows are in `shaq.device_checks`.
"""

import argparse
import contextlib
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from shaq.device import cpu_name
from shaq.device_checks import (
    GPU_PLAN,
    SMOKE_PLAN,
    CheckPlan,
    Row,
    check_cuda_tests,
    check_one_layer,
    check_steps,
    check_training,
    error_cell,
    free_memory,
)
from shaq.table import Table

# ----------------------------------------------------------------------------- running conditions


@contextlib.contextmanager
def trainer_float32_matmuls(device: torch.device) -> Iterator[None]:
    """TF32 for float32 matmuls in cuBLAS and cuDNN alike while inside, on a GPU (see the module
    doc)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread while inside, on the CPU: at smoke shapes every op is small, and a second
    OpenMP thread costs more in synchronisation than it gains (much more beside another busy
    process: 4x slower here). tests/conftest.py does the same for the tests."""
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# ----------------------------------------------------------------------------- report


COLUMNS = ("check", "shape", "precision", "result", "status")


def describe_machine(device: torch.device, plan: CheckPlan, cuda: bool) -> dict:
    """Date, device name, versions and shapes: what makes a pasted table say where it came from."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "shapes": plan.name,
    }


def device_row(meta: dict) -> Row:
    """The table's first row: the GPU, or a plain statement that the GPU figures are absent."""
    versions = f"torch {meta['torch']}, CUDA {meta['cuda'] or 'none'}"
    if meta["device"].startswith("cuda"):
        gpu = f"{meta['device_name']}, {versions}, cuDNN {meta['cudnn']}, {meta['date']}"
        return Row("device", "", "", gpu, "ok")
    why = f"--cpu, {meta['cuda_device']} unused" if meta["cuda_device"] else "no CUDA device"
    absent = (
        f"GPU FIGURES ABSENT ({why}): all rows ran on the CPU ({meta['device_name']}) at smoke "
        f"shapes; {versions}, {meta['date']}"
    )
    return Row("device", "", "", absent, "absent")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shaq.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke shapes (seconds), on whatever device is here"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="run on the CPU, at smoke shapes, even with a GPU"
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the table's numbers as JSON to PATH"
    )
    parser.add_argument(
        "--skip-tests",
        action="store_true",
        help="do not run the CUDA tests (e.g. in CI, which runs the whole suite anyway)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the checks and print the table; returns the exit status: 0 if every check passed,
    else 1."""
    args = parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda and not args.cpu else "cpu")
    plan = GPU_PLAN if device.type == "cuda" and not args.quick else SMOKE_PLAN
    meta = describe_machine(device, plan, cuda) | {"argv": sys.argv[1:] if argv is None else argv}
    rows, numbers = [device_row(meta)], {}

    def run(label: str, key: str, check: Callable[[], tuple[list[Row], object]]) -> None:
        # Progress on stderr, so that stdout holds only what is to be pasted.
        print(f"gpu_check: {label} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            new_rows, numbers[key] = check()
        except Exception as err:  # one broken check must not hide the others' results
            print(file=sys.stderr)
            traceback.print_exc()
            new_rows, numbers[key] = [Row(label, "", "", "", f"FAIL: {error_cell(err)}")], None
            free_memory(device)
        print(f" {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        rows.extend(new_rows)

    if args.skip_tests:
        rows.append(
            Row("CUDA tests", "`pytest tests -k cuda`", "", "not run", "skipped (--skip-tests)")
        )
    else:
        run("CUDA tests", "cuda_tests", lambda: check_cuda_tests(plan, cuda))
    with trainer_float32_matmuls(device), one_cpu_thread(device):
        run("one layer fwd+bwd", "one_layer", lambda: check_one_layer(device, plan))
        run("training step", "steps", lambda: check_steps(device, plan))
        run("training", "training", lambda: check_training(device, plan))

    seconds = time.perf_counter() - started
    checks = rows[1:]  # not the device row
    failed = [row.check for row in checks if row.failed]
    skipped = sum(row.status.startswith("skipped") for row in checks)
    verdict = (
        f"FAILED: {len(failed)} of {len(checks)} checks ({'; '.join(failed)})"
        if failed
        else f"all {len(checks) - skipped} checks that ran passed, {skipped} skipped"
    )
    print(
        f"shaq GPU check, {meta['date']}: {meta['device_name']}, torch {meta['torch']}, "
        f"CUDA {meta['cuda'] or 'none'}, {plan.name} shapes\n"
    )
    print(Table(list(COLUMNS), [[getattr(row, c) for c in COLUMNS] for row in rows]).markdown())
    print(f"\n{verdict} in {seconds:.0f} s")
    if args.json:
        report = {
            "meta": meta,
            "gpu_figures": plan is GPU_PLAN,
            "rows": [asdict(row) for row in rows],
            "checks": numbers,
            "passed": not failed,
            "seconds": seconds,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
