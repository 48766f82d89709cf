"""`python -m shaq.gpu_check` on the CPU: the smoke path that CI runs, and failures that must
fail it.

The paper-shape GPU path needs a GPU; these tests cover what a CPU can: the table, the JSON, the
statement that the GPU figures are absent, the exit status, and how each check decides.
"""

import json
import textwrap
from dataclasses import replace

import torch

from shaq import device_checks, gpu_check
from shaq.device import cpu_has_bf16
from shaq.models import SHAQ


def table_rows(out: str) -> dict[str, list[str]]:
    """The printed Markdown table as {check: [shape, precision, result, status]} (later rows of
    the same check under 'check #2')."""
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith(("| check ", "| ---")):
            check, *cells = (cell.strip() for cell in line.strip("|").split("|"))
            rows[check if check not in rows else f"{check} #2"] = cells
    return rows


def test_cpu_smoke_run_passes_and_says_the_gpu_figures_are_absent(tmp_path, capsys):
    path = tmp_path / "check.json"
    assert gpu_check.main(["--cpu", "--skip-tests", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("shaq GPU check, ") and "torch " in out.splitlines()[0]
    rows = table_rows(out)
    assert list(rows)[0] == "device" and rows["device"][2].startswith("GPU FIGURES ABSENT")
    assert rows["CUDA tests"][3] == "skipped (--skip-tests)"
    layer = "one layer fwd+bwd: nn.LSTM vs QRNN"
    assert [rows[layer][1], rows[f"{layer} #2"][1]] == ["fp32", "bf16 autocast"]
    assert (
        rows["training step: SHAQ"][0] == "smoke, B 4 x T 64" and "training step: SHA-RNN" in rows
    )
    training = next(
        check for check in rows if check.startswith("20 training steps (Trainer, standin")
    )
    assert not any(cells[3].startswith("FAIL") for cells in rows.values())
    assert "0 non-finite" in rows[training][2]
    skipped = 1 if cpu_has_bf16() else 2  # --skip-tests, and a bf16 LSTM where oneDNN has none
    verdict = out.rstrip().splitlines()[-1]
    assert verdict.startswith(f"all {6 - skipped} checks that ran passed, {skipped} skipped in ")

    report = json.loads(path.read_text())
    assert report["passed"] and report["gpu_figures"] is False and report["meta"]["device"] == "cpu"
    assert [row["check"] for row in report["rows"]] == [check.removesuffix(" #2") for check in rows]
    for numbers in report["checks"]["one_layer"]:
        assert numbers["lstm_bytes_per_s"] > 0 and numbers["qrnn1_bytes_per_s"] > 0
    for numbers in report["checks"]["steps"]["models"].values():
        assert numbers["bytes_per_s"] > 0 and numbers["timed_steps"] >= 1
    trained = report["checks"]["training"]
    assert (
        trained["steps"] == 20 and trained["nonfinite_steps"] == 0 and len(trained["losses"]) == 20
    )
    assert trained["loss_last"] < trained["loss_first"]


def test_a_non_finite_loss_fails_the_run(monkeypatch, capsys):
    forward = SHAQ.forward

    def nan_loss(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out if out.loss is None else replace(out, loss=out.loss * float("nan"))

    monkeypatch.setattr(SHAQ, "forward", nan_loss)
    assert gpu_check.main(["--cpu", "--skip-tests"]) == 1
    out = capsys.readouterr().out
    failed = [
        (check, cells[3]) for check, cells in table_rows(out).items() if cells[3].startswith("FAIL")
    ]
    assert len(failed) == 1
    check, status = failed[0]
    assert check.startswith("20 training steps") and status.startswith("FAIL: 20 non-finite steps")
    assert out.rstrip().splitlines()[-1].startswith("FAILED: 1 of 6 checks")


def test_a_loss_that_does_not_fall_fails_the_training_check(monkeypatch):
    forward = SHAQ.forward
    calls = []

    def rising_loss(self, *args, **kwargs):
        # Zero gradients, and a loss that grows by one per call.
        out = forward(self, *args, **kwargs)
        calls.append(1)
        return out if out.loss is None else replace(out, loss=out.loss * 0 + len(calls))

    monkeypatch.setattr(SHAQ, "forward", rising_loss)
    rows, numbers = device_checks.check_training(torch.device("cpu"), device_checks.SMOKE_PLAN)
    assert rows[0].status == "FAIL: the loss did not fall" and rows[0].failed
    assert numbers["nonfinite_steps"] == 0 and numbers["loss_last"] > numbers["loss_first"]


# Named without "cuda": `pytest tests -k cuda`, which the GPU check runs, would select it.
def test_the_selected_tests_are_counted_from_pytest_and_failures_fail_the_check(
    tmp_path, monkeypatch
):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_sample.py").write_text(
        textwrap.dedent("""
        import pytest

        def test_cuda_passes():
            pass

        def test_cuda_fails():
            assert False

        @pytest.mark.skip(reason="no GPU here")
        def test_cuda_skips():
            pass

        def test_other_is_not_selected():
            assert False
    """)
    )
    monkeypatch.setattr(device_checks, "TESTS_DIR", tests)
    rows, counts = device_checks.check_cuda_tests(device_checks.SMOKE_PLAN, cuda=False)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 0, 1)
    assert counts["returncode"] == 1 and rows[0].status == "FAIL: 1 failed"
    assert rows[0].result.startswith("1 passed, 1 failed, 1 skipped")

    (tests / "test_sample.py").write_text("def test_other():\n    pass\n")
    rows, counts = device_checks.check_cuda_tests(device_checks.SMOKE_PLAN, cuda=False)
    assert counts["returncode"] == 5 and rows[0].status == "FAIL: no test matches -k cuda"


def test_device_row_names_the_gpu_or_says_why_its_figures_are_absent():
    meta = {
        "device": "cuda",
        "device_name": "NVIDIA H200",
        "cuda_device": "NVIDIA H200",
        "torch": "2.13.0",
        "cuda": "12.8",
        "cudnn": 91002,
        "date": "2026-12-01 12:00 UTC",
    }
    row = gpu_check.device_row(meta)
    assert row.status == "ok" and row.result.startswith(
        "NVIDIA H200, torch 2.13.0, CUDA 12.8, cuDNN 91002"
    )
    row = gpu_check.device_row(meta | {"device": "cpu", "device_name": "Some CPU"})
    assert row.status == "absent" and row.result.startswith(
        "GPU FIGURES ABSENT (--cpu, NVIDIA H200 unused)"
    )
    row = gpu_check.device_row(
        meta | {"device": "cpu", "device_name": "Some CPU", "cuda_device": None}
    )
    assert row.result.startswith(
        "GPU FIGURES ABSENT (no CUDA device): all rows ran on the CPU (Some CPU)"
    )
