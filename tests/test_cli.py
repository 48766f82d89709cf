"""`python -m shaq`: train, eval and generate end to end, and mistakes that stop with exit
status 2."""

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import shaq
from shaq.__main__ import main
from shaq.checkpoint import load_model
from shaq.data import load_standin
from shaq.evaluate import DynamicEval, evaluate, evaluate_dynamic


def run_main(args) -> int:
    return main([str(arg) for arg in args])


def test_train_eval_generate_resume(tmp_path, capsysbinary):
    run = tmp_path / "run"
    assert (
        run_main(
            [
                "train",
                "--preset",
                "smoke",
                "--steps",
                6,
                "--out",
                run,
                "--d_model",
                32,
                "--attention-layers",
                "0,1",
                "--no-variable-seq-len",
                "--eval-interval",
                0,
                "--final-bytes",
                2048,
            ]
        )
        == 0
    )
    out = capsysbinary.readouterr().out.decode()
    assert (
        "done: 6 steps, 768 bytes" in out
        and "valid bpb" in out
        and "test bpb" in out
        and f"run dir: {run}" in out
    )
    saved = json.loads((run / "config.json").read_text())
    assert saved["model_config"]["d_model"] == 32 and saved["model_config"]["attention_layers"] == [
        0,
        1,
    ]
    assert saved["train_config"]["variable_seq_len"] is False

    assert run_main(["eval", run, "--split", "valid", "--bytes", 4096]) == 0
    model, _ = load_model(run)
    expected = evaluate(model, load_standin().valid, batch_size=4, bptt=32, max_bytes=4096)
    assert f"valid bpb {expected:.4f} on 4,096 bytes" in capsysbinary.readouterr().out.decode()
    assert (
        run_main(
            ["eval", run, "--split", "valid", "--bytes", 1024, "--dynamic", "--dynamic-lr", 1e-3]
        )
        == 0
    )
    dynamic = evaluate_dynamic(
        model, load_standin().valid, bptt=32, max_bytes=1024, settings=DynamicEval(lr=1e-3), rows=4
    )
    assert f"valid bpb {dynamic:.4f} on 1,024 bytes of standin-py" in (
        out := capsysbinary.readouterr().out.decode()
    )
    assert "batch 4, DYNAMIC evaluation: lr 0.001, decay 0" in out

    texts = []
    for _ in range(2):
        assert (
            run_main(["generate", run, "--prompt", "def ", "-n", 20, "--seed", 3, "--top-p", 0.98])
            == 0
        )
        texts.append(capsysbinary.readouterr().out)
    assert len(texts[0]) == 20 and texts[0] == texts[1]

    assert run_main(["train", "--resume", run, "--steps", 8, "--quiet"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["train", "--batch-size", "-4"], "batch_size must be >= 1, got -4"),
        (["train", "--preset", "huge"], "invalid choice: 'huge'"),
        (["train", "--model", "gru"], "model must be one of ['lstm', 'shaq', 'sharnn', 'shatter']"),
        (["train", "--memory-len", "-1"], "memory_len must be >= 0"),
        (
            ["train", "--model", "lstm", "--memory-len", "64"],
            "--memory-len is not an option of --model lstm (LSTMConfig: vocab_size, d_model, "
            "n_layers, dropout_input",
        ),
        (
            ["train", "--model", "lstm", "--no-overparam", "--d-model", "-3"],
            "--overparam is not an option of --model lstm",
        ),
        (
            ["train", "--model", "lstm", "--d-model", "0"],
            "invalid LSTMConfig: d_model must be >= 1, got 0",
        ),
        (
            ["train", "--model", "sharnn", "--rnn", "qrnn"],
            "--model picks the model and with it the recurrent layer",
        ),
        (["train", "--model", "shaq", "--rnn", "lstm"], "for QRNNs use --model shaq"),
        (["train", "--steps", "many"], "invalid int value: 'many'"),
        (["train", "--resume", "somewhere", "--preset", "smoke"], "drop --preset"),
        (["train", "--resume", "nowhere"], "no checkpoint at nowhere"),
        (["eval", "missing.pt"], "no checkpoint at missing.pt"),
        (["generate", "missing.pt"], "the following arguments are required: --prompt"),
    ],
)
def test_mistakes_stop_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no run folder, nothing written


def test_enwik8_without_network_says_what_to_do(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "train",
                "--preset",
                "smoke",
                "--data",
                "enwik8",
                "--data-root",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "run"),
            ]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--data standin" in err and "enwik8.zip" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()

    # 'auto' falls back to the stand-in, says so, and records what it used.
    assert (
        main(
            [
                "train",
                "--preset",
                "smoke",
                "--data",
                "auto",
                "--data-root",
                str(tmp_path / "data"),
                "--steps",
                "1",
                "--eval-interval",
                "0",
                "--final-bytes",
                "1024",
                "--out",
                str(tmp_path / "auto"),
            ]
        )
        == 0
    )
    assert "training on the offline stand-in instead" in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "auto" / "config.json").read_text())["train_config"]["data"]
        == "standin"
    )


def test_paper_preset_needs_enwik8_and_stops_before_any_work(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)  # the default run folder would be ./runs/...
    with pytest.raises(SystemExit) as stop:
        main(["train", "--preset", "paper", "--data-root", str(tmp_path / "data")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "enwik8" in err and "--data standin" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no run folder


def test_init_from_is_a_second_pass(tmp_path, capsys):
    assert (
        run_main(
            [
                "train",
                "--preset",
                "smoke",
                "--steps",
                4,
                "--eval-interval",
                2,
                "--out",
                tmp_path / "first",
                "--quiet",
            ]
        )
        == 0
    )
    for wrong, message in (
        (["--preset", "smoke"], "drop --preset"),
        (["--d-model", "32"], "drop --preset"),
        (["--resume", tmp_path / "first"], "choose one"),
    ):
        with pytest.raises(SystemExit):
            run_main(["train", "--init-from", tmp_path / "first" / "best.pt", *wrong])
        assert message in capsys.readouterr().err
    assert (
        run_main(
            [
                "train",
                "--init-from",
                tmp_path / "first" / "best.pt",
                "--lr",
                "1e-3",
                "--epochs",
                "5",
                "--seed",
                "125",
                "--steps",
                2,
                "--out",
                tmp_path / "second",
                "--quiet",
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "second" / "config.json").read_text())
    assert config["started_from"]["step"] in (2, 4) and config["train_config"]["seed"] == 125
    assert config["train_config"]["lr"] == 1e-3 and config["train_config"]["epochs"] == 5


def test_damaged_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as stop:
        main(["eval", str(tmp_path / "bad.pt")])
    assert stop.value.code == 2 and "truncated or damaged" in capsys.readouterr().err


def test_python_dash_m_exit_status_and_message():
    result = subprocess.run(
        [sys.executable, "-m", "shaq", "train", "--lr", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(shaq.__file__).parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "shaq: error: invalid TrainConfig: lr must be > 0, got -1.0"
