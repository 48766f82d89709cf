"""Train the shipped models (`shaq.pretrained.RECIPES`) and write their weights, manifests and the
scoreboard: one command for all of them, whose figures the book and the README quote.

    python tools/scoreboard.py --minutes 15            # all six, one after another (~1 h 50 min)
    python tools/scoreboard.py --minutes 15 --only shaq-cpu-standin
    python tools/scoreboard.py --table                 # the scoreboard as Markdown

Run it alone on a quiet machine from a clean checkout (it refuses a dirty one: the manifests name
the commit that trained the weights). Each model trains in a fresh process with
`python -m shaq train --preset cpu --data standin --minutes M --seed S` and its recipe's options;
then its best-validated weights are stored 16-bit where that costs under MAX_PRECISION_COST
bits per byte on the whole validation split (float32 otherwise), the shipped weights are scored
on the whole validation and test splits, and on CHECK_BYTES of the validation split for the
test that re-measures them. scoreboard.json adds the compressors' bpb on the same bytes.
"""

import argparse
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's shaq, which trains, whatever else is installed

import torch  # noqa: E402

import shaq  # noqa: E402
from shaq.checkpoint import load_checkpoint  # noqa: E402
from shaq.data import load_corpus  # noqa: E402
from shaq.device import autocast_dtype, cpu_name, resolve_amp  # noqa: E402
from shaq.evaluate import compressor_bpb, evaluate  # noqa: E402
from shaq.models import build_model, config_from_dict  # noqa: E402
from shaq.nn.forget_mult import forget_mult  # noqa: E402
from shaq.pretrained import RECIPES  # noqa: E402
from shaq.table import Table  # noqa: E402
from shaq.train_config import TrainConfig  # noqa: E402

SHIPPED = Path(shaq.pretrained.__file__).parent
MAX_PRECISION_COST = 0.005  # bpb a 16-bit copy of the weights may cost on the validation split
CHECK_BYTES = 32_768  # the slice of the validation split that tests re-measure
CHECK_BATCH = 4
CURVE_POINTS = 120  # training-loss points kept in a manifest


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def train_curve(metrics: list[dict]) -> list[list[float]]:
    """[seconds, bytes, mean training bpb] over CURVE_POINTS equal runs of steps."""
    steps = [m for m in metrics if m.get("bpb") is not None]
    size = max(1, len(steps) // CURVE_POINTS)
    curve = []
    for i in range(0, len(steps) - size + 1, size):
        chunk = steps[i : i + size]
        mean = sum(m["bpb"] for m in chunk) / len(chunk)
        curve.append([chunk[-1]["time"], chunk[-1]["bytes"], round(mean, 4)])
    return curve


def rounded(weights: dict, dtype: torch.dtype) -> dict:
    return {key: tensor.to(dtype) for key, tensor in weights.items()}


def score(model_name: str, model_config: dict, weights: dict, split, config, n=None) -> float:
    """Static bpb of `weights` (any float dtype, computed in float32) on `split`."""
    model = build_model(model_name, config_from_dict(model_name, model_config))
    model.load_state_dict({key: tensor.float() for key, tensor in weights.items()})
    amp = autocast_dtype(resolve_amp(config.amp, torch.device("cpu")))
    batch = config.eval_batch_size if n is None else CHECK_BATCH
    return evaluate(model.eval(), split, batch, config.seq_len, n, amp)


def train_one(name: str, args: argparse.Namespace, commit: str, corpus) -> dict:
    out = Path(args.runs) / name  # relative to ROOT, so that no machine's path is recorded
    command = [
        "python", "-m", "shaq", "train", "--preset", "cpu", "--data", "standin",
        "--minutes", f"{args.minutes:g}", "--seed", str(args.seed), *RECIPES[name],
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(command)}", flush=True)
    subprocess.run([sys.executable, *command[1:]], cwd=ROOT, check=True)
    out = ROOT / out
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = load_checkpoint(out / "best.pt")
    model_name, model_config = best["model_name"], best["model_config"]
    config = TrainConfig(**best["train_config"])
    weights = best["model"]

    # 16-bit where it costs under MAX_PRECISION_COST on the whole validation split.
    # (The trainer scored the float32 weights by the same protocol: summary["valid_bpb"].)
    shipped, dtype, valid = weights, "float32", summary["valid_bpb"]
    for candidate in (torch.float16, torch.bfloat16):
        small = rounded(weights, candidate)
        small_valid = score(model_name, model_config, small, corpus.valid, config)
        cost = small_valid - summary["valid_bpb"]
        print(f"  {candidate}: valid bpb {cost:+.5f} against float32", flush=True)
        if abs(cost) < MAX_PRECISION_COST:
            shipped, dtype, valid = small, str(candidate).removeprefix("torch."), small_valid
            break
    buffer = io.BytesIO()
    torch.save(shipped, buffer)
    data = buffer.getvalue()
    (SHIPPED / f"{name}.pt").write_bytes(data)

    test = score(model_name, model_config, shipped, corpus.test, config)
    check = corpus.valid[:CHECK_BYTES]
    manifest = {
        "name": name,
        "command": shlex.join(command),
        "commit": commit,
        "model": model_name,
        "model_config": model_config,
        "train_config": best["train_config"],
        "data": {
            "name": corpus.name,
            "train_bytes": corpus.train.numel(),
            "valid_bytes": corpus.valid.numel(),
            "test_bytes": corpus.test.numel(),
        },
        "machine": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "params": summary["params"],
        "seconds": summary["seconds"],
        "steps": summary["steps"],
        "bytes": summary["bytes"],
        "bytes_per_second": round(summary["bytes_per_second"], 1),
        "tested_step": summary["tested_step"],
        "float32_valid_bpb": summary["valid_bpb"],
        "float32_test_bpb": summary["test_bpb"],
        "valid_bpb": valid,
        "test_bpb": test,
        "weights": {
            "file": f"{name}.pt",
            "dtype": dtype,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },  # fmt: skip
        "check": {
            "split": "valid",
            "bytes": check.numel(),
            "batch_size": CHECK_BATCH,
            "sha256": hashlib.sha256(check.numpy().tobytes()).hexdigest(),
            "bpb": score(model_name, model_config, shipped, corpus.valid, config, CHECK_BYTES),
        },
        "valid_curve": [
            [m["time"], m["step"], m["bytes"], m["valid_bpb"]] for m in metrics if "valid_bpb" in m
        ],
        "train_curve": train_curve(metrics),
    }
    (SHIPPED / f"{name}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"  {name}: valid {valid:.4f} test {test:.4f} ({dtype}, {len(data):,} bytes)")
    return manifest


def scoreboard(corpus) -> dict:
    """The shipped models' figures next to the compressors' on the same splits."""
    rows = []
    for name in shaq.pretrained.names():
        m = shaq.pretrained.manifest(name)
        keys = ("params", "seconds", "steps", "bytes", "bytes_per_second", "valid_bpb", "test_bpb")
        rows.append({"name": name, **{key: m[key] for key in keys}})
    compressors = {
        split: compressor_bpb(getattr(corpus, split).numpy().tobytes())
        for split in ("valid", "test")
    }
    return {"data": corpus.name, "machine": cpu_name(), "models": rows, "compressors": compressors}


def table(board: dict) -> Table:
    rows = []
    for row in board["models"]:
        rows.append(
            [
                row["name"],
                f"{row['params'] / 1e6:.2f} M",
                f"{row['bytes_per_second']:,.0f}",
                f"{row['bytes'] / 1e6:.2f}",
                f"{row['valid_bpb']:.3f}",
                f"{row['test_bpb']:.3f}",
            ]
        )
    for name in board["compressors"]["valid"]:
        valid, test = board["compressors"]["valid"][name], board["compressors"]["test"][name]
        rows.append([name, "", "", "", f"{valid:.3f}", f"{test:.3f}"])
    headers = ["model", "params", "bytes/s", "MB trained", "valid bpb", "test bpb"]
    return Table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--runs", default="runs/scoreboard", help="relative to the checkout")
    parser.add_argument("--table", action="store_true", help="print the scoreboard and stop")
    args = parser.parse_args()
    board_file = SHIPPED / "scoreboard.json"
    if args.table:
        print(table(json.loads(board_file.read_text())).markdown())
        return
    if git("status", "--porcelain"):
        sys.exit("the checkout has uncommitted changes: commit them, then train (the manifests "
                 "name the commit)")  # fmt: skip
    commit = git("rev-parse", "HEAD")
    # Build the QRNN's C++ forget-mult now, before any run's clock starts (torch caches the build;
    # a cold cache once cost the first QRNN run about a minute of its budget).
    forget_mult(torch.rand(1, 2, 4), torch.rand(1, 2, 4))
    corpus = load_corpus("standin", verbose=False)
    for name in args.only:
        train_one(name, args, commit, corpus)
    board = scoreboard(corpus)
    board_file.write_text(json.dumps(board, indent=1) + "\n")
    print(table(board).markdown())


if __name__ == "__main__":
    main()
