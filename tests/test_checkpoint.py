"""Checkpoints: exact resume, crash-safe saving (SIGKILL mid-save), and clear errors for bad
files."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from shaq.checkpoint import (
    KEYS,
    CheckpointError,
    check_model,
    find_checkpoint,
    load_checkpoint,
    load_model,
    load_weights,
    remove_temp_files,
    save_checkpoint,
    state_from_dict,
    state_to_dict,
)
from shaq.models import LSTMLM, LSTMConfig, SHARNNConfig, build_model, model_config
from shaq.nn import LSTMState, QRNNState
from shaq.train import TrainConfig, Trainer

# Dropout on and variable segment lengths, so the RNG states must be restored too.
MODEL = SHARNNConfig.smoke(dropout_input=0.1, dropout_hidden=0.1, dropout_output=0.1)


def config(tmp_path, name, **overrides) -> TrainConfig:
    return TrainConfig.smoke(
        out_dir=str(tmp_path / name),
        variable_seq_len=True,
        eval_interval=4,
        save_interval=5,
        eval_bytes=1024,
        final_bytes=1024,
        **overrides,
    )


def losses(run_dir) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def assert_same_weights(a, b):
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", ["shaq", "sharnn", "shatter"])
def test_resume_is_exact(tmp_path, model):
    shape = model_config(
        model,
        "smoke",
        **{name: 0.1 for name in ("dropout_input", "dropout_hidden", "dropout_output")},
    )
    Trainer(config(tmp_path, "straight", model=model, steps=12), shape, verbose=False).fit()
    Trainer(config(tmp_path, "split", model=model, steps=6), shape, verbose=False).fit()
    resumed = Trainer.resume(tmp_path / "split", steps=12, verbose=False)
    assert resumed.progress.step == 6 and resumed.carried is not None  # the carried state came back
    resumed.fit()
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(split) == 12
    assert split == pytest.approx(straight, rel=1e-6, abs=1e-6)
    assert_same_weights(tmp_path / "straight" / "last.pt", tmp_path / "split" / "last.pt")


def test_resume_after_a_crash_drops_the_steps_it_did_not_save(tmp_path):
    class Crash(Exception):
        pass

    def crash_at_7(metrics):
        if metrics["step"] == 7:
            raise Crash

    Trainer(config(tmp_path, "straight", steps=10), MODEL, verbose=False).fit()
    with pytest.raises(Crash):
        Trainer(
            config(tmp_path, "crashed", steps=10), MODEL, callback=crash_at_7, verbose=False
        ).fit()
    assert (
        len(losses(tmp_path / "crashed")) == 7
        and load_checkpoint(tmp_path / "crashed" / "last.pt")["step"] == 5
    )
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as log:
        log.write('{"step": 8, "lo')  # a line the crash cut short
    Trainer.resume(tmp_path / "crashed", verbose=False).fit()
    assert losses(tmp_path / "crashed") == pytest.approx(
        losses(tmp_path / "straight"), rel=1e-6, abs=1e-6
    )


# A child process that saves a 32 MB checkpoint over and over, printing each number once saved.
SAVER = """
import sys, torch
from shaq.checkpoint import KEYS, save_checkpoint
weights = torch.empty(8_000_000)
step = 0
while True:
    step += 1
    weights.fill_(step)
    save_checkpoint({**dict.fromkeys(KEYS, 0), "step": step, "model": {"w": weights}}, sys.argv[1])
    print(step, flush=True)
"""


def test_sigkill_during_save_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    rng = random.Random(0)
    leftovers = 0
    for _ in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True
        )
        first = child.stdout.readline()  # one save done: from here on a good file must always exist
        assert first.strip().isdigit()
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        printed = [int(first)] + [int(line) for line in child.stdout.read().split()]
        child.wait()
        checkpoint = load_checkpoint(path)
        weights = checkpoint["model"]["w"]
        assert weights.numel() == 8_000_000
        assert (weights == checkpoint["step"]).all()  # complete and consistent
        assert checkpoint["step"] >= printed[-1]  # nothing reported saved was lost
        leftovers += len(list(tmp_path.glob(".last.pt.*.tmp")))
        remove_temp_files(tmp_path)
        assert list(tmp_path.iterdir()) == [path]
    assert leftovers > 0  # at least one kill really landed inside a save


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({**dict.fromkeys(KEYS, 0), "step": 1}, path)
    # A local lambda cannot be pickled: AttributeError before Python 3.14, PicklingError since.
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint({**dict.fromkeys(KEYS, 0), "step": 2, "bad": lambda: None}, path)
    assert load_checkpoint(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step smoke run."""
    path = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(
        TrainConfig.smoke(out_dir=str(path), steps=4, eval_interval=0, final_bytes=1024),
        SHARNNConfig.smoke(),
        verbose=False,
    ).fit()
    return path


def test_damaged_files_give_clear_errors(run, tmp_path):
    good = (run / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(CheckpointError, match="truncated or damaged"):
            load_checkpoint(tmp_path / name)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a shaq checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_code_in_a_checkpoint_is_never_run(tmp_path):
    torch.save(
        {"format": "shaq-checkpoint", "payload": TrainConfig.smoke()}, tmp_path / "pickled.pt"
    )
    with pytest.raises(
        CheckpointError, match="truncated or damaged"
    ):  # weights_only refuses the object
        load_checkpoint(tmp_path / "pickled.pt")


def test_other_versions_and_incomplete_checkpoints_are_refused(run, tmp_path):
    checkpoint = load_checkpoint(run / "last.pt")
    torch.save({**checkpoint, "format_version": 0, "shaq_version": "0.0.1"}, tmp_path / "old.pt")
    with pytest.raises(
        CheckpointError, match=r"format 0 \(written by shaq 0.0.1\).*reads only formats 1 and 2"
    ):
        load_checkpoint(tmp_path / "old.pt")
    del checkpoint["optimizer"]
    save_checkpoint(
        checkpoint, tmp_path / "partial.pt"
    )  # with its checksum: a plain torch.save would lack it
    with pytest.raises(CheckpointError, match="lacks optimizer"):
        load_checkpoint(tmp_path / "partial.pt")


def test_a_checkpoint_of_another_model_is_refused(run):
    checkpoint = load_checkpoint(run / "last.pt")
    with pytest.raises(CheckpointError, match="model 'shaq' \\(checkpoint\\) vs 'sharnn'"):
        check_model(checkpoint, "sharnn", SHARNNConfig.smoke(rnn="qrnn"))
    with pytest.raises(CheckpointError, match="d_model 64 \\(checkpoint\\) vs 32"):
        check_model(checkpoint, "shaq", SHARNNConfig.smoke(d_model=32, rnn="qrnn"))
    other = build_model("shaq", SHARNNConfig.smoke(n_layers=3))
    with pytest.raises(CheckpointError, match="blocks.2"):  # strict: the missing block is named
        load_weights(other, checkpoint)
    with pytest.raises(CheckpointError, match="d_model 64 \\(checkpoint\\) vs 128"):
        Trainer.resume(run, model_overrides={"d_model": 128}, verbose=False)
    with pytest.raises(CheckpointError, match="lr 0.002 \\(checkpoint\\) vs 0.1"):
        Trainer.resume(run, lr=0.1, verbose=False)


def test_load_model_and_find_checkpoint(run):
    assert find_checkpoint(run) == run / "best.pt"
    assert find_checkpoint(run, prefer="last.pt") == run / "last.pt"
    model, checkpoint = load_model(run)
    assert not model.training and checkpoint["model_name"] == "shaq"
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["model"][name])


def test_an_lstm_checkpoint_of_the_old_layout_loads_and_resumes(tmp_path):
    """LSTMLM runs from before LSTMConfig saved a whole SHARNNConfig (attention and Boom fields
    and all) as their model_config: such a checkpoint still loads, and its run resumes."""
    legacy_config = SHARNNConfig.smoke().to_dict()  # as the old code saved an LSTMLM's config
    torch.manual_seed(0)
    weights = LSTMLM(LSTMConfig.smoke()).state_dict()
    save_checkpoint(
        {
            **dict.fromkeys(KEYS, 0),
            "model_name": "lstm",
            "model_config": legacy_config,
            "model": weights,
        },
        tmp_path / "old.pt",
    )
    model, _ = load_model(tmp_path / "old.pt")
    assert isinstance(model, LSTMLM) and model.config == LSTMConfig.smoke()
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())

    run = tmp_path / "run"
    Trainer(config(tmp_path, "run", model="lstm", steps=2), LSTMConfig.smoke(), verbose=False).fit()
    checkpoint = load_checkpoint(run / "last.pt")
    save_checkpoint({**checkpoint, "model_config": legacy_config}, run / "last.pt")
    resumed = Trainer.resume(run, steps=3, verbose=False)
    assert resumed.model_config == LSTMConfig.smoke() and resumed.progress.step == 2
    resumed.fit()
    assert load_checkpoint(run / "last.pt")["step"] == 3


def test_state_round_trip_keeps_kinds_and_stores_no_more_than_the_state():
    torch.manual_seed(0)
    for name, kind in (("sharnn", LSTMState), ("shaq", QRNNState)):
        model = build_model(name, SHARNNConfig.smoke(memory_len=8)).eval()
        state = model(torch.randint(0, 256, (2, 20))).state
        restored = state_from_dict(state_to_dict(state), torch.device("cpu"))
        assert all(type(layer) is kind for layer in restored.rnn)
        for before, after in zip(state.rnn, restored.rnn, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        memory = [m for m in restored.memory if m is not None]
        assert memory and all(m.shape == (2, 8, 64) for m in memory)
        # The memory is a view of a [2, 20, 64] tensor; the saved copy holds just its 8 positions.
        assert all(m.untyped_storage().nbytes() == m.numel() * m.element_size() for m in memory)
    assert state_to_dict(None) is None and state_from_dict(None, torch.device("cpu")) is None
