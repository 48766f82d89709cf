"""The trainer: it learns, evaluates by the reference's protocol, follows its schedule, and handles
non-finite losses; plus TrainConfig validation and device selection."""

import json
import math
import os
import signal

import pytest
import torch

from shaq.checkpoint import CheckpointError, load_checkpoint
from shaq.console import ProgressBar
from shaq.device import autocast_dtype, cpu_has_bf16, pick_device, resolve_amp
from shaq.evaluate import LN2, evaluate
from shaq.models import LSTMConfig, SHARNNConfig, build_model, model_config
from shaq.train import TrainConfig, Trainer, TrainingError, TrainingInterrupted


def smoke(tmp_path, name="run", **overrides) -> TrainConfig:
    """The smoke preset with small evaluations (2 kB), writing to tmp_path/name."""
    return TrainConfig.smoke(
        out_dir=str(tmp_path / name), **{"eval_bytes": 2048, "final_bytes": 2048, **overrides}
    )


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def inject_nan(trainer: Trainer, at_step: int) -> None:
    """Make the training loss NaN on step `at_step` (1-based), as a diverging model would."""
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.model.training and trainer.progress.step + 1 == at_step:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = poisoned


def test_loss_falls_on_standin_and_the_run_folder_is_complete(tmp_path):
    seen = []
    trainer = Trainer(
        smoke(tmp_path, steps=30, eval_interval=15),
        SHARNNConfig.smoke(),
        callback=seen.append,
        verbose=False,
    )
    summary = trainer.fit()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "config.json",
        "last.pt",
        "metrics.jsonl",
        "summary.json",
    ]
    log = read_log(run)
    assert [m["step"] for m in log] == list(range(1, 31))
    assert seen == log  # the callback gets exactly what is logged
    losses = [m["loss"] for m in log]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses  # from ~ln 256 = 5.5 nats down
    assert [m["step"] for m in log if "valid_bpb" in m] == [15, 30]
    assert all(m["bytes"] == 4 * 32 * m["step"] for m in log)
    assert summary["steps"] == 30 and summary["bytes"] == 30 * 4 * 32
    assert math.isfinite(summary["valid_bpb"]) and math.isfinite(summary["test_bpb"])
    assert (
        summary["tested_step"] in (15, 30)
        and summary["valid_bytes"] == summary["test_bytes"] == 2048
    )
    assert json.loads((run / "summary.json").read_text()) == summary
    config = json.loads((run / "config.json").read_text())
    assert config["train_config"]["data"] == "standin" and config["model_config"]["rnn"] == "qrnn"


def test_warmup_is_linear_then_constant(tmp_path):
    Trainer(
        smoke(tmp_path, steps=8, warmup=4, lr=1e-3, eval_interval=0),
        SHARNNConfig.smoke(),
        verbose=False,
    ).fit()
    lrs = [m["lr"] for m in read_log(tmp_path / "run")]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])


def test_linear_decay_reaches_zero_at_the_end_of_the_budget(tmp_path):
    Trainer(
        smoke(tmp_path, steps=8, warmup=4, lr=1e-3, decay="linear", eval_interval=0),
        SHARNNConfig.smoke(),
        verbose=False,
    ).fit()
    lrs = [m["lr"] for m in read_log(tmp_path / "run")]
    warm = [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]
    assert lrs == pytest.approx([w * (1 - s / 8) for s, w in enumerate(warm)])


def test_linear_decay_by_time_follows_the_elapsed_minutes(tmp_path):
    seen = []
    Trainer(
        smoke(  # an LSTM: a QRNN's first step may build its C++ extension, longer than 3 s
            tmp_path,
            model="sharnn",
            steps=None,
            minutes=0.05,
            warmup=0,
            decay="linear",
            eval_interval=0,
        ),
        SHARNNConfig.smoke(),
        verbose=False,
        callback=seen.append,
    ).fit()
    assert len(seen) > 2 and [m["lr"] for m in seen] == sorted(m["lr"] for m in seen)[::-1]
    for m in seen:  # a step's rate is set from the time its gradient was ready (logged with it)
        assert m["lr"] == pytest.approx(2e-3 * max(0.0, 1 - m["time"] / 3), abs=1e-6)
    with pytest.raises(ValueError, match="decay must be one of"):
        smoke(tmp_path, decay="cosine")


def test_a_decaying_run_stopped_and_resumed_computes_what_a_straight_run_does(tmp_path):
    def stop_after_5(metrics):
        if metrics["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    settings = dict(steps=12, warmup=2, decay="linear", eval_interval=4, save_interval=3)
    Trainer(smoke(tmp_path, "straight", **settings), SHARNNConfig.smoke(), verbose=False).fit()
    stopped = Trainer(
        smoke(tmp_path, "stopped", **settings),
        SHARNNConfig.smoke(),
        callback=stop_after_5,
        verbose=False,
    )
    with pytest.raises(TrainingInterrupted):
        stopped.fit()
    Trainer.resume(tmp_path / "stopped", verbose=False).fit()
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "stopped")
    assert [m["lr"] for m in resumed] == [m["lr"] for m in straight]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]


def test_variable_lengths_and_epochs_wrap_with_adam_and_the_lstm(tmp_path):
    # 2,000 bytes in 4 rows: an epoch is 499 input columns, so 40 steps of ~32 wrap around twice.
    config = smoke(
        tmp_path,
        model="lstm",
        optimizer="adam",
        max_bytes=2000,
        steps=40,
        variable_seq_len=True,
        eval_interval=0,
        save_interval=0,
    )
    trainer = Trainer(config, LSTMConfig.smoke(), verbose=False)
    trainer.fit()
    log = read_log(tmp_path / "run")
    lengths = [m["seq_len"] for m in log]
    assert len(set(lengths)) > 3 and all(1 <= n <= 32 for n in lengths)
    assert log[-1]["bytes"] == 4 * sum(lengths)
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["epoch"] >= 2 and 0 < checkpoint["cursor"] <= 499
    assert checkpoint["optimizer"]["param_groups"][0].get("min_trust") is None  # really Adam


@pytest.mark.parametrize("name", ["sharnn", "shaq", "lstm", "shatter"])
def test_evaluate_carries_state_like_one_long_call(name):
    torch.manual_seed(0)
    model = build_model(
        name, model_config(name, "smoke", **({} if name == "lstm" else {"memory_len": 64}))
    )
    data = torch.randint(0, 256, (2 * 41 + 1,), dtype=torch.uint8)  # batchify drops the last byte
    rows = data[: 2 * 41].view(2, 41).long()
    model.eval()
    with torch.no_grad():
        whole = (
            model(rows[:, :-1], targets=rows[:, 1:]).loss.item() / LN2
        )  # every byte sees all before it
    model.train()
    # Segments of 7 (the last one 5 long) with state and memory carried: the same numbers.
    assert evaluate(model, data, batch_size=2, bptt=7) == pytest.approx(whole, abs=1e-5)
    assert model.training  # evaluate restores the mode
    assert evaluate(model, data, batch_size=2, bptt=7, max_bytes=50) == pytest.approx(
        evaluate(model, data[:50], batch_size=2, bptt=7), abs=1e-7
    )


def test_evaluate_depends_on_the_memory():
    """The check above can fail: with a memory shorter than the text, segments see less."""
    torch.manual_seed(0)
    model = build_model("sharnn", SHARNNConfig.smoke(memory_len=8)).eval()
    with torch.no_grad():  # make the attention matter
        for p_name, p in model.named_parameters():
            if p_name.endswith((".qs", ".ks", ".vs")):
                p.normal_()
    data = torch.randint(0, 256, (82,), dtype=torch.uint8)
    rows = data.view(2, 41).long()
    with torch.no_grad():
        whole = model(rows[:, :-1], targets=rows[:, 1:]).loss.item() / LN2
    assert abs(evaluate(model, data, batch_size=2, bptt=7) - whole) > 1e-4


def test_nonfinite_loss_stops_and_keeps_the_last_good_state(tmp_path):
    trainer = Trainer(
        smoke(tmp_path, steps=10, eval_interval=0, save_interval=3),
        SHARNNConfig.smoke(),
        verbose=False,
    )
    inject_nan(trainer, at_step=6)
    with pytest.raises(TrainingError, match="step 6"):
        trainer.fit()
    run = tmp_path / "run"
    assert [m["step"] for m in read_log(run)] == [1, 2, 3, 4, 5]
    saved = load_checkpoint(run / "last.pt")
    assert saved["step"] == 5 and saved["cursor"] == 5 * 32
    # The saved weights are those after step 5 (not step 3's save, not poisoned).
    Trainer(
        smoke(tmp_path, "five", steps=5, eval_interval=0), SHARNNConfig.smoke(), verbose=False
    ).fit()
    reference = load_checkpoint(tmp_path / "five" / "last.pt")["model"]
    for key, value in saved["model"].items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_nonfinite_loss_can_be_skipped(tmp_path):
    sums = []
    trainer = Trainer(
        smoke(tmp_path, steps=8, eval_interval=0, on_nonfinite="skip"),
        SHARNNConfig.smoke(),
        callback=lambda m: sums.append(sum(p.sum().item() for p in trainer.model.parameters())),
        verbose=False,
    )
    inject_nan(trainer, at_step=4)
    summary = trainer.fit()
    log = read_log(tmp_path / "run")
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 8
    assert log[3]["skipped"] is True and log[3]["loss"] is None
    assert not any("skipped" in m for m in log[:3] + log[4:])
    assert sums[3] == sums[2]  # step 4 changed no weight
    assert sums[4] != sums[3] and sums[2] != sums[1]  # the others did
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert load_checkpoint(tmp_path / "run" / "last.pt")["nonfinite_steps"] == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(seq_len=-5), "seq_len must be >= 1"),
        (dict(model="gru"), "model must be one of"),
        (dict(data="wiki"), "data must be"),
        (dict(optimizer="sgd"), "optimizer must be"),
        (dict(epochs=None, steps=None, minutes=None), "set epochs, steps or minutes"),
        (dict(epochs=0), "epochs must be > 0"),
        (dict(lr=0), "lr must be > 0"),
        (dict(on_nonfinite="ignore"), "on_nonfinite must be"),
        (dict(eval_bytes=1), "eval_bytes must be >= 2"),
        (dict(device="tpu"), "device must be one of"),
        (dict(seq_len=4, variable_seq_len=True), "variable_seq_len needs seq_len >= 5"),
    ],
)
def test_train_config_rejects_impossible_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.paper(**overrides)


def test_train_config_presets():
    assert TrainConfig.preset("paper") == TrainConfig()
    paper = TrainConfig.paper()
    assert (paper.optimizer, paper.lr, paper.warmup, paper.clip, paper.weight_decay) == (
        "lamb",
        2e-3,
        800,
        0.25,
        1.2e-6,
    )
    assert (paper.batch_size, paper.seq_len, paper.variable_seq_len) == (16, 1024, True)
    assert (paper.eval_batch_size, paper.test_batch_size, paper.seed) == (16, 8, 5512)
    # The reference's length and validation: 32 epochs, validated once per epoch; enwik8 only.
    assert (paper.epochs, paper.steps, paper.minutes) == (32, None, None)
    assert (paper.eval_interval, paper.eval_each_epoch, paper.data) == (0, True, "enwik8")
    assert TrainConfig.preset("smoke", steps=3).steps == 3
    assert TrainConfig.cpu().minutes is not None
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        TrainConfig.preset("huge")


def test_an_existing_run_is_not_overwritten(tmp_path):
    Trainer(smoke(tmp_path, steps=1, eval_interval=0), SHARNNConfig.smoke(), verbose=False).fit()
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(smoke(tmp_path, steps=1), SHARNNConfig.smoke(), verbose=False)


def test_device_selection():
    assert pick_device("cpu") == torch.device("cpu")
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else "mps"
        if torch.backends.mps.is_available()
        else "cpu"
    )
    assert pick_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


def test_amp_auto_uses_bf16_only_where_the_cpu_has_it():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == ("bf16" if cpu_has_bf16() else "off")
    assert resolve_amp("on", cpu) == "bf16" and resolve_amp("off", cpu) == "off"
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("off") is None
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp("yes", cpu)
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainConfig.smoke(amp="bfloat16")


def test_bf16_autocast_trains_like_float32_and_the_choice_is_recorded(tmp_path):
    """CPU bf16 autocast (the matmuls in bf16, states and gates in float32) gives the float32
    losses to within 0.02 nats over the first steps; the run records the resolved choice and a
    resumed run keeps it."""
    losses = {}
    for amp in ("off", "on"):
        Trainer(
            smoke(tmp_path, amp, model="shaq", amp=amp, steps=6, eval_interval=0),
            SHARNNConfig.smoke(),
            verbose=False,
        ).fit()
        losses[amp] = [m["loss"] for m in read_log(tmp_path / amp)]
    assert losses["on"] != losses["off"]  # bf16 really ran
    assert losses["on"] == pytest.approx(losses["off"], abs=0.02)
    assert (
        json.loads((tmp_path / "on" / "config.json").read_text())["train_config"]["amp"] == "bf16"
    )
    assert load_checkpoint(tmp_path / "on" / "last.pt")["train_config"]["amp"] == "bf16"
    resumed = Trainer.resume(tmp_path / "on", steps=7, verbose=False)
    assert resumed.amp_dtype is torch.bfloat16
    resumed.close()


def test_epochs_bound_a_run_and_each_epoch_end_is_validated(tmp_path):
    # 2,000 bytes in 4 rows: an epoch is 499 input columns, i.e. 15 full segments of 32 and one of
    # 19.
    config = smoke(
        tmp_path,
        max_bytes=2000,
        epochs=2,
        steps=None,
        eval_interval=0,
        eval_each_epoch=True,
        save_interval=0,
    )
    trainer = Trainer(config, SHARNNConfig.smoke(), verbose=False)
    trainer.fit()
    log = read_log(tmp_path / "run")
    assert len(log) == 32 and [m["seq_len"] for m in log[14:17]] == [32, 19, 32]
    assert [m["step"] for m in log if "valid_bpb" in m] == [16, 32]  # the two epoch ends
    assert trainer.epochs_done == 2.0 and trainer.progress.step == 32

    half = Trainer(
        smoke(tmp_path, "half", max_bytes=2000, epochs=0.5, steps=None, eval_interval=0),
        SHARNNConfig.smoke(),
        verbose=False,
    )
    half.fit()
    assert half.progress.step == 8 and 0.5 <= half.epochs_done < 0.6  # 8 x 32 = 256 of 499 columns


def test_start_from_loads_weights_with_a_fresh_optimizer_and_records_where(tmp_path):
    first = Trainer(
        smoke(tmp_path, "first", steps=6, eval_interval=3), SHARNNConfig.smoke(), verbose=False
    )
    first.fit()
    best = load_checkpoint(tmp_path / "first" / "best.pt")
    second = Trainer.start_from(
        tmp_path / "first" / "best.pt",
        lr=1e-3,
        epochs=5,
        steps=4,
        seed=125,
        out_dir=str(tmp_path / "second"),
        verbose=False,
    )
    # The weights are the checkpoint's; optimizer, schedule and counters start afresh.
    for name, tensor in second.model.state_dict().items():
        assert torch.equal(tensor, best["model"][name]), name
    assert second.progress.step == 0 and second.optimizer.state_dict()["state"] == {}
    assert second.scheduler.last_epoch == 0
    assert (second.config.lr, second.config.epochs, second.config.seed) == (1e-3, 5, 125)
    assert second.config.batch_size == first.config.batch_size  # the rest is the first run's
    second.fit()
    started = json.loads((tmp_path / "second" / "config.json").read_text())["started_from"]
    assert started["checkpoint"] == str((tmp_path / "first" / "best.pt").resolve())
    assert started["step"] == best["step"] and started["model"] == "shaq"
    assert [m["lr"] for m in read_log(tmp_path / "second")] == pytest.approx(
        [2e-4, 4e-4, 6e-4, 8e-4]
    )  # warmup again
    # A resumed second pass keeps the record of where its first session started.
    Trainer.resume(tmp_path / "second", steps=5, verbose=False).fit()
    assert json.loads((tmp_path / "second" / "config.json").read_text())["started_from"] == started


def test_start_from_refuses_another_model(tmp_path):
    Trainer(
        smoke(tmp_path, "first", steps=2, eval_interval=0), SHARNNConfig.smoke(), verbose=False
    ).fit()
    config = smoke(tmp_path, "other", model="sharnn", init_from=str(tmp_path / "first" / "last.pt"))
    with pytest.raises(CheckpointError, match="another model: model 'shaq'"):
        Trainer(config, SHARNNConfig.smoke(), verbose=False)


@pytest.mark.parametrize(
    "bounds, measure, total",
    [
        (dict(minutes=2, steps=None), "time", 120),
        (dict(steps=7), "step", 7),
        (dict(steps=None, epochs=3), "epoch", 3),
    ],
)
def test_progress_is_measured_in_what_bounds_the_run(tmp_path, bounds, measure, total):
    progress = ProgressBar(
        smoke(tmp_path, **bounds), {"time": 0.0, "step": 0, "epoch": 0.0}, disable=True
    )
    assert (progress.measure, progress.bar.total) == (measure, total)
    at = {"time": 30.0, "step": 3, "epoch": 0.0}
    progress.update("loss 1.000", at)
    text = progress.bar.desc
    assert {"time": "1 min 30 s left", "step": "step 3/7", "epoch": "epoch 0.000/3"}[
        measure
    ] in text
    assert progress._position(at) == at[measure]


def test_a_contradictory_model_choice_stops_before_any_work(tmp_path):
    with pytest.raises(
        ValueError, match="model 'sharnn' has LSTM layers but the config asks for rnn='qrnn'"
    ):
        Trainer(smoke(tmp_path, model="sharnn"), SHARNNConfig.smoke(rnn="qrnn"), verbose=False)
    with pytest.raises(
        ValueError, match="model 'lstm' .* config class LSTMConfig, not SHARNNConfig"
    ):
        Trainer(smoke(tmp_path, model="lstm"), SHARNNConfig.smoke(), verbose=False)
    assert not (tmp_path / "run").exists()
