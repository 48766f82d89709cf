"""Integrity: checksummed checkpoints, results that cannot be NaN, one writer per run folder,
stops that save, and failed writes that say so."""

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import shaq.runlock
import shaq.train
import shaq.train_checkpoints
from shaq.__main__ import main
from shaq.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from shaq.evaluate import NonFiniteError, evaluate
from shaq.models import SHARNNConfig, build_model
from shaq.runlock import RunLockError
from shaq.train import TrainConfig, Trainer, TrainingError, TrainingInterrupted

TRAILER = 89  # "\nshaq-checkpoint sha256 " + 64 hex digits + "\n"


def smoke(out, **overrides) -> TrainConfig:
    """The smoke preset with small evaluations, writing to `out`."""
    return TrainConfig.smoke(
        out_dir=str(out), **{"eval_bytes": 1024, "final_bytes": 1024, **overrides}
    )


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a, b) -> None:
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 6-step smoke run: best.pt and last.pt (step 6)."""
    path = tmp_path_factory.mktemp("integrity") / "run"
    Trainer(smoke(path, steps=6, eval_interval=4), SHARNNConfig.smoke(), verbose=False).fit()
    return path


@pytest.fixture
def copy(run, tmp_path) -> Path:
    """A copy of the run's folder, to damage."""
    return Path(shutil.copytree(run, tmp_path / "copy"))


# ----------------------------------------------------------------------------- checksums


def test_a_checkpoint_is_torch_save_bytes_and_their_sha256(run):
    data = (run / "last.pt").read_bytes()
    body, trailer = data[:-TRAILER], data[-TRAILER:]
    assert (
        trailer == b"\nshaq-checkpoint sha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n"
    )
    # torch.load reads the file as it is (safely: weights_only), trailer and all.
    plain = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert plain["format_version"] == 2 and plain["step"] == 6


@pytest.mark.parametrize("where", [0.05, 0.2, 0.35, 0.65, 0.8])
def test_a_damaged_byte_anywhere_is_an_error_that_names_the_other_checkpoint(copy, where):
    data = bytearray((copy / "last.pt").read_bytes())
    data[int(where * len(data))] ^= 0x01  # one flipped bit
    (copy / "last.pt").write_bytes(data)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(copy / "last.pt")
    message = str(error.value)
    assert f"{copy / 'last.pt'} is damaged (checksum mismatch)" in message
    assert f"try the run's other checkpoint, {copy / 'best.pt'}" in message
    # Every reader goes through load_checkpoint: resuming, load_model (eval, generate, the book).
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        Trainer.resume(copy, verbose=False)
    load_model(copy / "best.pt")  # the other one is fine


def test_damage_to_best_names_last_and_a_lone_file_says_what_to_do(copy, tmp_path):
    data = bytearray((copy / "best.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "best.pt").write_bytes(data)
    with pytest.raises(CheckpointError, match=f"other checkpoint, {copy / 'last.pt'}"):
        load_model(copy)  # a run folder means its best.pt
    (tmp_path / "lone.pt").write_bytes(data)
    with pytest.raises(
        CheckpointError, match="checksum mismatch.*use a good copy of it .* or retrain"
    ):
        load_checkpoint(tmp_path / "lone.pt")


def test_a_damaged_or_missing_trailer_is_an_error(copy):
    good = (copy / "last.pt").read_bytes()
    digit = bytearray(good)
    digit[-2] = ord("0") if digit[-2] != ord("0") else ord("1")  # the digest's last hex digit
    marker = bytearray(good)
    marker[-TRAILER + 3] ^= 0x20  # "shaq" -> "shAq": no trailer any more
    missing = "checksum that ends a format 2 file is missing or garbled"
    for name, data, message in (
        ("digit.pt", digit, "checksum mismatch"),
        ("marker.pt", marker, missing),
        ("cut.pt", good[:-TRAILER], missing),
        ("half.pt", good[: len(good) // 2], "cannot be read .* truncated"),
    ):
        (copy / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(copy / name)


def test_format_1_without_a_checksum_loads_with_a_warning_and_resumes_into_format_2(run, tmp_path):
    checkpoint = load_checkpoint(run / "last.pt")
    old = tmp_path / "old"
    old.mkdir()
    torch.save({**checkpoint, "format_version": 1}, old / "last.pt")  # what shaq 0.1.0 wrote
    with pytest.warns(UserWarning, match=f"{old / 'last.pt'} has no checksum") as caught:
        loaded = load_checkpoint(old / "last.pt")
    assert "damage to it cannot be detected" in str(caught[0].message)
    assert all(
        torch.equal(loaded["model"][key], value) for key, value in checkpoint["model"].items()
    )
    with pytest.warns(UserWarning, match="no checksum"):
        resumed = Trainer.resume(old, steps=7, verbose=False)
    resumed.fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(old / "last.pt")["step"] == 7


# ----------------------------------------------------------------------------- non-finite results


def test_evaluate_refuses_a_nonfinite_result():
    model = build_model("shaq", SHARNNConfig.smoke())
    data = torch.randint(0, 256, (200,), dtype=torch.uint8)
    assert evaluate(model, data, batch_size=2, bptt=16) > 0
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite loss .* damaged or diverged"):
        evaluate(model, data, batch_size=2, bptt=16)
    assert issubclass(NonFiniteError, ValueError)


def test_eval_of_nan_weights_exits_non_zero_and_prints_no_number(run, tmp_path, capsys):
    checkpoint = load_checkpoint(run / "best.pt")
    for tensor in checkpoint["model"].values():
        tensor.fill_(float("nan"))
    save_checkpoint(
        checkpoint, tmp_path / "nan.pt"
    )  # a good file of bad weights: the checksum holds
    with pytest.raises(SystemExit) as stop:
        main(["eval", str(tmp_path / "nan.pt"), "--bytes", "2048"])
    assert stop.value.code == 2
    out, err = capsys.readouterr()
    assert "nan" not in out.lower() and "bpb" not in out
    assert (
        f"{tmp_path / 'nan.pt'}: the weights give a non-finite loss" in err
        and "Traceback" not in err
    )


def test_a_run_whose_weights_test_nonfinite_reports_no_result(tmp_path):
    trainer = Trainer(
        smoke(tmp_path / "run", steps=4, eval_interval=2), SHARNNConfig.smoke(), verbose=False
    )
    forward = trainer.model.forward

    def nan_when_evaluating(*args, **kwargs):
        out = forward(*args, **kwargs)
        if not trainer.model.training:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = nan_when_evaluating
    with pytest.raises(
        TrainingError, match="weights of step 4 give a non-finite valid loss .* no result"
    ):
        trainer.fit()
    log = read_log(tmp_path / "run")
    assert len(log) == 4 and all(
        math.isnan(m["valid_bpb"]) for m in log if "valid_bpb" in m
    )  # logged
    assert (
        not (tmp_path / "run" / "best.pt").exists()
        and not (tmp_path / "run" / "summary.json").exists()
    )
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4


# ------------------------------------------------------------------------ one writer per run folder

# Holds a RunLock on argv[2] until killed; runlock.py is loaded alone, without torch, to start fast.
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("runlock", sys.argv[1])
runlock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runlock)
lock = runlock.RunLock(sys.argv[2])
print("held", flush=True)
time.sleep(120)
"""


def test_a_held_folder_is_refused_before_any_work_and_a_killed_holder_leaves_no_lock(
    copy, monkeypatch
):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, shaq.runlock.__file__, str(copy)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"

        def no_work(*args, **kwargs):
            raise AssertionError("the folder is held: nothing should be loaded")

        monkeypatch.setattr(shaq.train_checkpoints, "load_checkpoint", no_work)
        monkeypatch.setattr(shaq.train, "load_corpus", no_work)
        with pytest.raises(
            RunLockError, match=f"{copy} is being written by process {holder.pid} on "
        ):
            Trainer.resume(copy, verbose=False)
        with pytest.raises(RunLockError, match=f"kill -TERM {holder.pid} saves last.pt"):
            Trainer(smoke(copy), SHARNNConfig.smoke(), verbose=False)
    finally:
        holder.kill()  # SIGKILL: no clean-up at all
        holder.communicate()
    assert (
        copy / ".lock"
    ).exists()  # the file stays, but the kernel dropped the lock with the process
    monkeypatch.undo()
    Trainer.resume(copy, steps=7, verbose=False).fit()
    assert not (copy / ".lock").exists() and load_checkpoint(copy / "last.pt")["step"] == 7


def test_trainers_of_one_folder_in_one_process_take_turns(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    first = Trainer(smoke(folder, steps=3, eval_interval=0), SHARNNConfig.smoke(), verbose=False)
    holder = json.loads((folder / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["command"]
    with pytest.raises(
        RunLockError, match="held by another Trainer in this process .* call its close"
    ):
        Trainer(smoke(folder, steps=3), SHARNNConfig.smoke(), verbose=False)
    first.fit()  # fit lets the folder go when it ends, as a notebook needs for resuming next
    assert not (folder / ".lock").exists()
    with Trainer.resume(folder, steps=4, verbose=False):
        pass  # built, never fitted: the with block releases it

    # A Trainer that fails to start does not keep the folder either.
    def unfit(self, checkpoint):
        raise CheckpointError("the optimizer state does not fit")

    monkeypatch.setattr(Trainer, "_restore", unfit)
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer.resume(folder, steps=4, verbose=False)
    monkeypatch.undo()
    second = Trainer.resume(folder, steps=4, verbose=False)
    second.fit()
    second.fit()  # again, after the first fit let go: it takes the folder again
    assert len(read_log(folder)) == 4 and not (folder / ".lock").exists()


def shaq_command(*args) -> list[str]:
    return [sys.executable, "-m", "shaq", "train", *map(str, args)]


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Poll `condition` until it holds; fail if `process` ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended (status {process.returncode}) before {what}: "
                + process.stderr.read()
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.02)


def logged_steps(folder: Path) -> int:
    """How many steps a running run has logged (complete lines only)."""
    try:
        return (folder / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def lock_taken(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / ".lock").read_text()))
    except (OSError, ValueError):
        return False


def test_a_second_process_is_refused_while_a_run_writes(tmp_path):
    folder = tmp_path / "run"
    command = shaq_command(
        "--preset", "smoke", "--steps", 100_000, "--eval-interval", 0, "--out", folder, "--quiet"
    )
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as first:
        try:
            wait_for(lambda: lock_taken(folder), first, "its lock")
            started = time.monotonic()
            commands = [
                shaq_command("--resume", folder),
                shaq_command("--preset", "smoke", "--out", folder),
            ]
            others = [
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for command in commands
            ]
            results = [(other.communicate(timeout=120)[1], other.returncode) for other in others]
            took = time.monotonic() - started
            for err, status in results:
                assert status == 2, err
                assert f"{folder} is being written by process {first.pid}" in err, err
                assert err.count("\n") == 1, err  # one line, no traceback
            assert took < 60  # the time to import torch: they stop before loading anything
            assert first.poll() is None  # the first run went on undisturbed
        finally:
            first.send_signal(signal.SIGTERM)
            status = first.wait(timeout=120)
    assert status == 128 + signal.SIGTERM
    assert load_checkpoint(folder / "last.pt")["step"] == len(read_log(folder))


# ----------------------------------------------------------------------------- stops save


def test_sigterm_stops_after_a_step_with_last_saved_and_the_resumed_run_is_exact(tmp_path, capsys):
    """`kill -TERM` on a real `python -m shaq train`, then --resume: the same numbers as a run
    left alone. (On the CPU, which computes bit for bit the same each time; GPU kernels need
    not.)"""
    args = [
        "--preset",
        "smoke",
        "--data",
        "standin",
        "--steps",
        60,
        "--final-bytes",
        2048,
        "--device",
        "cpu",
        "--quiet",
    ]
    stopped = tmp_path / "stopped"
    command = shaq_command(*args, "--out", stopped)
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
        wait_for(lambda: logged_steps(stopped) >= 3, process, "3 steps")
        process.send_signal(signal.SIGTERM)
        err = process.communicate(timeout=120)[1]
        status = process.returncode
    assert status == 128 + signal.SIGTERM, err
    saved = load_checkpoint(stopped / "last.pt")["step"]
    assert 3 <= saved < 60 and len(read_log(stopped)) == saved  # no step lost, none logged unsaved
    assert f"stopped by SIGTERM after step {saved}" in err and f"--resume {stopped}" in err
    assert not (stopped / "summary.json").exists() and not (stopped / ".lock").exists()

    assert main(["train", "--resume", str(stopped), "--quiet"]) == 0
    assert main(["train", *map(str, args), "--out", str(tmp_path / "straight")]) == 0
    capsys.readouterr()
    straight = tmp_path / "straight"
    untimed = [
        [
            {key: value for key, value in m.items() if key not in ("time", "valid_seconds")}
            for m in read_log(folder)
        ]
        for folder in (straight, stopped)
    ]
    assert (
        len(untimed[1]) == 60 and untimed[0] == untimed[1]
    )  # every loss, bpb, lr, valid_bpb, exactly
    assert_same_weights(straight / "last.pt", stopped / "last.pt")
    summaries = [
        json.loads((folder / "summary.json").read_text()) for folder in (straight, stopped)
    ]
    assert summaries[0]["test_bpb"] == summaries[1]["test_bpb"]


def test_sigint_in_a_notebook_saves_then_raises_keyboard_interrupt(tmp_path, monkeypatch):
    """Jupyter's stop button is a SIGINT: the step ends, last.pt is saved (a second SIGINT meanwhile
    is ignored), the cell stops with a KeyboardInterrupt, and the run resumes exactly."""

    def previous(signum, frame):  # the handler a notebook has; back in place after fit
        raise AssertionError("fit's own handler should have caught this")

    pressed = []

    def interrupt(metrics):
        if metrics["step"] == 5:
            pressed.append(metrics["step"])
            os.kill(os.getpid(), signal.SIGINT)

    save = shaq.train_checkpoints.save_checkpoint

    def save_interrupted(payload, path):  # the impatient second press, in the middle of the save
        if pressed:
            os.kill(os.getpid(), signal.SIGINT)
        save(payload, path)

    # On the CPU, which computes bit for bit the same each time.
    config = dict(steps=12, eval_interval=4, save_interval=3, variable_seq_len=True, device="cpu")
    model = SHARNNConfig.smoke(dropout_hidden=0.1)
    Trainer(smoke(tmp_path / "straight", **config), model, verbose=False).fit()
    original = signal.signal(signal.SIGINT, previous)
    try:
        trainer = Trainer(
            smoke(tmp_path / "stopped", **config), model, callback=interrupt, verbose=False
        )
        with monkeypatch.context() as patch:
            patch.setattr(shaq.train_checkpoints, "save_checkpoint", save_interrupted)
            with pytest.raises(KeyboardInterrupt) as stop:
                trainer.fit()
        assert signal.getsignal(signal.SIGINT) is previous
    finally:
        signal.signal(signal.SIGINT, original)
    assert isinstance(stop.value, TrainingInterrupted) and stop.value.signum == signal.SIGINT
    assert stop.value.step == 5 and "stopped by SIGINT after step 5" in str(stop.value)
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["step"] == 5
    Trainer.resume(tmp_path / "stopped", verbose=False).fit()  # same process: the folder was let go
    straight, stopped = read_log(tmp_path / "straight"), read_log(tmp_path / "stopped")
    assert [m["loss"] for m in stopped] == [m["loss"] for m in straight]
    assert_same_weights(tmp_path / "straight" / "last.pt", tmp_path / "stopped" / "last.pt")


def test_fit_in_a_thread_or_with_sigint_ignored_leaves_the_handlers_alone(tmp_path):
    seen = []

    def record(metrics):
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    errors = []
    thread = threading.Thread(target=lambda: _fit_or_record(tmp_path / "thread", record, errors))
    thread.start()
    thread.join()
    assert not errors and seen[-1] == before  # only the main thread may set handlers

    original = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a job a shell started with &
    try:
        _fit_or_record(tmp_path / "ignored", record, errors)
        assert not errors and seen[-1][0] == signal.SIG_IGN and seen[-1][1] != before[1]
        assert signal.getsignal(signal.SIGTERM) == before[1]
    finally:
        signal.signal(signal.SIGINT, original)


def _fit_or_record(out: Path, callback, errors: list) -> None:
    try:
        config = smoke(out, steps=2, eval_interval=0)
        Trainer(config, SHARNNConfig.smoke(), callback=callback, verbose=False).fit()
    except Exception as err:  # a thread's exception would not reach the test
        errors.append(err)


# ----------------------------------------------------------------------------- failed writes


def test_a_failed_write_keeps_the_previous_checkpoint_and_names_the_error(
    run, tmp_path, monkeypatch
):
    path = tmp_path / "last.pt"
    checkpoint = load_checkpoint(run / "last.pt")
    save_checkpoint(checkpoint, path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    for target, name, failure, message in (
        (os, "replace", full, "No space left on device"),
        (torch, "save", full, "No space left on device"),
        (tempfile, "mkstemp", denied, "Permission denied"),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, failure)
            with pytest.raises(CheckpointError) as error:
                save_checkpoint({**checkpoint, "step": 99}, path)
        assert f"cannot write the checkpoint {path}: " in str(error.value) and message in str(
            error.value
        )
        assert "previous last.pt there, if any, is untouched" in str(error.value)
        assert load_checkpoint(path)["step"] == 6
        assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_failed_save_stops_the_run_and_the_command_exits_1(tmp_path, monkeypatch, capsys):
    replace, saves = os.replace, []

    def disk_fills_up(source, target):
        saves.append(target)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(source, target)

    monkeypatch.setattr(os, "replace", disk_fills_up)
    folder = tmp_path / "run"
    status = main(
        [
            "train",
            "--preset",
            "smoke",
            "--steps",
            "9",
            "--eval-interval",
            "0",
            "--save-interval",
            "3",
            "--out",
            str(folder),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert status == 1
    assert (
        f"cannot write the checkpoint {folder / 'last.pt'}: [Errno 28] No space left on device"
        in err
    )
    assert "Training stopped at step 6" in err and f"--resume {folder}" in err
    assert load_checkpoint(folder / "last.pt")["step"] == 3 and not (folder / ".lock").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", str(folder), "--quiet"]) == 0  # once there is room again
    assert [m["step"] for m in read_log(folder)] == list(range(1, 10))
