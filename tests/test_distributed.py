"""Data-parallel training: two CPU processes (gloo) under torchrun do what one process does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shaq
from shaq.checkpoint import load_checkpoint
from shaq.models import SHARNNConfig
from shaq.train import TrainConfig, Trainer

SETTINGS = [
    "--preset",
    "smoke",
    "--variable-seq-len",
    "--eval-interval",
    "4",
    "--save-interval",
    "0",
    "--eval-bytes",
    "1024",
    "--final-bytes",
    "1024",
    "--quiet",
]


def torchrun(args: list[str], cwd) -> None:
    """`python -m shaq ARGS` in 2 processes; --standalone picks a free port for the rendezvous."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "shaq",
        *args,
    ]
    # The processes start in `cwd`, so they find shaq through PYTHONPATH whether it is installed
    # or not.
    path = os.pathsep.join(
        filter(None, [str(Path(shaq.__file__).parents[1]), os.environ.get("PYTHONPATH")])
    )
    result = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without distributed support"
)
def test_two_processes_match_one_and_resume(tmp_path):
    # One process, batch 4, 12 steps.
    single = tmp_path / "single"
    Trainer(
        TrainConfig.smoke(
            out_dir=str(single),
            steps=12,
            variable_seq_len=True,
            eval_interval=4,
            save_interval=0,
            eval_bytes=1024,
            final_bytes=1024,
        ),
        SHARNNConfig.smoke(),
        verbose=False,
    ).fit()
    # Two processes with 2 rows each: 8 steps, then resumed for 4 more (the state is gathered and
    # split).
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    torchrun(["train", *SETTINGS, "--steps", "8", "--device", "cpu", "--out", "ddp"], cwd)
    torchrun(["train", "--resume", "ddp", "--steps", "12", "--device", "cpu", "--quiet"], cwd)

    run = cwd / "ddp"
    assert sorted(p.name for p in cwd.iterdir()) == ["ddp"]  # rank 1 wrote nothing elsewhere
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "config.json",
        "last.pt",
        "metrics.jsonl",
        "summary.json",
    ]
    ddp_log, single_log = read_log(run), read_log(single)
    assert [m["step"] for m in ddp_log] == list(range(1, 13))  # one writer: no duplicate lines
    assert [m["step"] for m in single_log] == list(range(1, 13))
    # Gradients averaged over 2 x 2 rows = the gradient over 4 rows; the logged loss is the global
    # mean.
    for ours, theirs in zip(ddp_log, single_log, strict=True):
        assert ours["seq_len"] == theirs["seq_len"] and ours["bytes"] == theirs["bytes"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        # valid_bpb only on validation steps: both runs validate on the same steps, to the same
        # value. (pytest.approx(None, rel=...) is a TypeError since pytest 9.2, so None is
        # compared as None.)
        assert (ours.get("valid_bpb") is None) == (theirs.get("valid_bpb") is None), (ours, theirs)
        if theirs.get("valid_bpb") is not None:
            assert ours["valid_bpb"] == pytest.approx(theirs["valid_bpb"], rel=1e-4)
    assert [m["step"] for m in ddp_log if m.get("valid_bpb") is not None] == [
        4,
        8,
        12,
    ]  # eval_interval 4
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert all(
        t.shape[0] == 4
        for layer in checkpoint["state"]["rnn"]
        for k, t in layer.items()
        if k != "kind"
    )
    reference = load_checkpoint(single / "last.pt")["model"]
    for key, value in checkpoint["model"].items():
        torch.testing.assert_close(value, reference[key], rtol=1e-3, atol=1e-4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["test_bpb"] == pytest.approx(
        json.loads((single / "summary.json").read_text())["test_bpb"], rel=1e-4
    )
