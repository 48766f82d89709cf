"""Tune the `cpu` preset for time to quality: runs of equal wall-clock, one after another.

Each run trains SHAQ at the cpu preset with some settings changed, for the same number of
minutes, on the stand-in, in a fresh process, and records its summary (steps, bytes, bytes/s,
valid and test bpb over the whole splits) in a JSON-lines file; `--table` prints them as the
Markdown table the README and chapter 11 show. Run it alone on a quiet machine: the runs are
compared by what they reach in the same time.

    python tools/cpu_sweep.py --minutes 5 --out sweep.jsonl baseline n_layers=2 decay=none
    python tools/cpu_sweep.py --table sweep.jsonl
    python tools/cpu_sweep.py --minutes 5,10,15 --dynamic --out final.jsonl baseline

Several --minutes (5,10,15) train each variant once per length: the preset's learning rate
decays to 0 at the end of the run's time, so a shorter run is a run of its own, not an early part
of a longer one. With --dynamic each run also reports its bpb under dynamic evaluation
(`shaq.evaluate.evaluate_dynamic`, its lr picked from DYNAMIC_LRS on the first 128 kB of valid,
with the rows of the static figures) and zlib, bz2 and lzma at their strongest settings on the
same bytes.

A variant is space-separated key=value settings (values in JSON, or bare words for strings): any
TrainConfig or SHARNNConfig field, and `qrnn_init=reference`, which initialises the QRNN gate
Linears as the reference initialised every other Linear (N(0, 0.1/sqrt(d)), zero bias) instead of
PyTorch's default.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

from shaq.device import cpu_name
from shaq.evaluate import DynamicEval, compressor_bpb, evaluate_dynamic
from shaq.models import SHARNNConfig
from shaq.table import Table
from shaq.train import TrainConfig, Trainer


def parse_variant(text: str) -> dict:
    """'lr=4e-3 memory_len=512' -> {'lr': 0.004, 'memory_len': 512}; 'baseline' -> {}."""
    settings = {}
    for item in text.split():
        if item == "baseline":
            continue
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:  # a bare word: 'decay=linear', 'qrnn_init=reference'
            settings[key] = value
    return settings


def reference_qrnn_init(model: torch.nn.Module) -> None:
    """The reference's rule for Linears applied to the QRNN gates: N(0, 0.1/sqrt(d)), bias 0."""
    from shaq.nn import QRNN

    std = 0.1 / math.sqrt(model.config.d_model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QRNN):
                module.gates.weight.normal_(0.0, std)
                module.gates.bias.zero_()


# Dynamic evaluation's learning rates, tried on the first 128 kB of valid: wide enough on both sides
# that the chosen rate is not at an edge of the range (the README has the measurements).
DYNAMIC_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def evaluate_dynamically(model: torch.nn.Module, corpus, train: TrainConfig) -> dict:
    """bpb under dynamic evaluation over the whole valid and test splits, its lr picked on the
    first 128 kB of valid, with the rows of the static figures."""
    tune = {
        lr: evaluate_dynamic(
            model,
            corpus.valid,
            train.seq_len,
            131_072,
            DynamicEval(lr=lr),
            rows=train.eval_batch_size,
        )
        for lr in DYNAMIC_LRS
    }
    lr = min(tune, key=tune.get)
    result = {"dynamic_lr": lr, "dynamic_tuning": tune}
    for split, rows in (("valid", train.eval_batch_size), ("test", train.test_batch_size)):
        started = time.perf_counter()
        result[f"dynamic_{split}_bpb"] = evaluate_dynamic(
            model, getattr(corpus, split), train.seq_len, settings=DynamicEval(lr=lr), rows=rows
        )
        result[f"dynamic_{split}_seconds"] = time.perf_counter() - started
    return result


def run_one(variant: str, minutes: float, out_dir: str, dynamic: bool = False) -> dict:
    settings = parse_variant(variant)
    qrnn_init = settings.pop("qrnn_init", "torch")
    model_names = {f.name for f in fields(SHARNNConfig)}
    model = SHARNNConfig.cpu(**{k: v for k, v in settings.items() if k in model_names})
    train = TrainConfig.cpu(
        model="shaq",
        data="standin",
        minutes=minutes,
        out_dir=out_dir,
        **{k: v for k, v in settings.items() if k not in model_names},
    )
    trainer = Trainer(train, model, verbose=False)
    if qrnn_init == "reference":
        torch.manual_seed(train.seed)
        reference_qrnn_init(trainer.model)
    summary = trainer.fit()
    result = {
        "variant": variant,
        "minutes": minutes,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **{
            k: summary[k]
            for k in (
                "params",
                "steps",
                "bytes",
                "bytes_per_second",
                "valid_bpb",
                "test_bpb",
                "valid_bytes",
                "test_bytes",
                "data",
                "tested_step",
            )
        },
    }
    if dynamic:  # the tested weights, as for the static figures
        corpus = trainer.corpus
        result["compressors"] = {
            split: compressor_bpb(bytes(getattr(corpus, split).numpy()))
            for split in ("valid", "test")
        }
        result.update(evaluate_dynamically(trainer.model, corpus, train))
    return result


def table(path: Path) -> Table:
    """The runs of a JSON-lines file, with dynamic-evaluation columns if any run has them."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    headers = ["variant", "minutes", "steps", "MB trained", "bytes/s", "valid bpb", "test bpb"]
    dynamic = any("dynamic_valid_bpb" in r for r in rows)
    if dynamic:
        headers += ["dynamic valid bpb", "dynamic test bpb"]
    body = []
    for r in rows:
        row = [r["variant"], r["minutes"], r["steps"], r["bytes"] / 1e6]
        row += [round(r["bytes_per_second"]), r["valid_bpb"], r["test_bpb"]]
        if dynamic:
            row += [r.get("dynamic_valid_bpb"), r.get("dynamic_test_bpb")]
        body.append(row)
    return Table(headers, body)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "variants", nargs="*", help="settings of each run, e.g. 'baseline' 'lr=4e-3'"
    )
    parser.add_argument(
        "--minutes",
        type=lambda text: [float(m) for m in text.split(",")],
        default=[5.0],
        help="minutes of each run; several, comma-separated (5,10,15), for one run of each",
    )
    parser.add_argument("--out", type=Path, default=Path("sweep.jsonl"))
    parser.add_argument(
        "--table", type=Path, help="print the table of a sweep's JSON-lines file and stop"
    )
    parser.add_argument(
        "--dynamic", action="store_true", help="also dynamic evaluation and the compressors"
    )
    parser.add_argument(
        "--keep", type=Path, help="keep the run folders under this folder (default: deleted)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single run, in the child process
    args = parser.parse_args()
    if args.table:
        print(table(args.table).markdown())
        return 0
    if args.one is not None:
        with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
            folder = (
                Path(tmp) / "run"
                if args.keep is None
                else args.keep / time.strftime("%Y%m%d-%H%M%S")
            )
            result = run_one(args.one, args.minutes[0], str(folder), args.dynamic)
        with args.out.open("a") as out:
            out.write(json.dumps(result) + "\n")
        return 0
    keep = ["--keep", str(args.keep)] if args.keep else []
    dynamic = ["--dynamic"] if args.dynamic else []
    for variant in args.variants:  # one process each: no run inherits another's allocator or caches
        for minutes in args.minutes:
            started = time.time()
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    variant,
                    "--minutes",
                    str(minutes),
                    "--out",
                    str(args.out),
                    *dynamic,
                    *keep,
                ],
                check=True,
            )
            print(f"{variant}, {minutes:g} min: done in {time.time() - started:.0f} s", flush=True)
    print(table(args.out).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
