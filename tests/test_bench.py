"""Tests of the benchmark: it runs, its baseline is the same model, its FLOP count is right.

No test here judges speed: timings on a shared CI machine mean nothing.
"""

import importlib.util
import json
import math
import os
import shlex
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import shaq.nn.switches as switches
from shaq.bench import SECTIONS, CpuMonitor, PeakMemory, ReferenceStyleSHARNN, format_section, main
from shaq.bench.report import FORMATTERS, table
from shaq.bench.sections import StepShape, quick_plan
from shaq.byte_lm import State
from shaq.flops import model_flops_per_byte, train_flops_per_byte
from shaq.models import SHAQ, SHARNN, SHARNNConfig
from shaq.shatter import ShatterConfig, ShatterLM

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_json_with_positive_numbers(tmp_path):
    path = tmp_path / "bench.json"
    results = main(["--quick", "--device", "cpu", "--no-malloc-tuning", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    for key in (
        "meta",
        "contention",
        "matmul_peak",
        "rnn",
        "forget_mult",
        "attention",
        "step",
        "trainer",
    ):
        assert key in results, key
    assert results["matmul_peak"]["peak_gflops"] > 0
    assert isinstance(results["contention"]["quiet"], bool) and results["contention"]["summary"]
    for row in results["rnn"]:
        for name in ("lstm", "qrnn1", "qrnn2"):
            assert row[f"{name}_bytes_per_s"] > 0
        assert row["qrnn1_speedup"] > 0 and row["qrnn1_peak_fraction"] > 0
    for row in results["forget_mult"]:
        assert row["reference_s"] > 0 and row["fast_s"] > 0 and 0 < row["forget_mult_share"]
    assert [row["memory"] for row in results["attention"]] == [0, 64, 256]
    assert all(row["ours_s"] > 0 and row["reference_s"] > 0 for row in results["attention"])
    for entry in results["step"]:
        assert set(entry["models"]) == {"shaq", "sharnn", "reference", "shatter"}
        for m in entry["models"].values():
            assert m["bytes_per_s"] > 0 and m["mfu"] > 0 and m["train_flops_per_byte"] > 0
            assert m["peak_memory_mb"] is None or m["peak_memory_mb"] > 0
        assert entry["shaq_over_sharnn"] > 0 and entry["sharnn_over_reference"] > 0
        m = entry["models"]
        assert entry["shatter_over_shaq"] == m["shatter"]["bytes_per_s"] / m["shaq"]["bytes_per_s"]
        assert m["shaq"]["config"]["rnn"] == "qrnn" and "n_partitions" in m["shatter"]["config"]
    trainer = results["trainer"]
    shape = quick_plan().trainer
    # SHAQ's smoke memory (128) fills in 128 / 32 steps; then the shape's warm-up.
    assert trainer["untimed_steps"] == math.ceil(128 / shape.seq_len) + shape.warmup
    assert trainer["timed_steps"] == shape.repeats
    assert trainer["trainer_bytes_per_s"] > 0 and trainer["isolated_bytes_per_s"] > 0
    assert trainer["ratio"] == trainer["trainer_bytes_per_s"] / trainer["isolated_bytes_per_s"]
    assert trainer["met"] == (trainer["ratio"] >= 0.95)
    assert "Trainer / isolated step" in format_section("trainer", trainer)


def test_a_step_shape_gives_each_model_its_config_at_the_shape_preset():
    overrides = {"d_model": 128, "memory_len": 512}
    shape = StepShape("x", "cpu", 16, 256, warmup=1, repeats=1, overrides=overrides)
    assert shape.config("shatter") == ShatterConfig.cpu(**overrides)
    assert shape.config("shaq") == shape.config("sharnn") == SHARNNConfig.cpu(**overrides)
    assert shape.config("reference") == shape.config("sharnn")  # the reference re-creates SHARNN


@pytest.mark.parametrize("attention_layers", [None, (0, 1, 2)])
def test_reference_style_model_computes_the_same_function_as_sharnn(attention_layers):
    """Eval mode, weights copied across, three segments so the memory fills and is trimmed."""
    torch.manual_seed(0)
    config = SHARNNConfig(d_model=16, n_layers=3, memory_len=12, attention_layers=attention_layers)
    model = SHARNN(config).eval()
    with torch.no_grad():  # gates away from their all-equal initial values
        for block in model.blocks:
            if block.attention is not None:
                for gate in (block.attention.qs, block.attention.ks, block.attention.vs):
                    gate.normal_()
    reference = ReferenceStyleSHARNN.from_sharnn(model).eval()
    x = torch.randint(0, 256, (2, 15))
    state, hidden, memory = None, None, None
    with torch.no_grad():
        for segment in x.split(5, dim=1):
            out = model(segment, state, targets=segment)
            logits, loss, hidden, memory = reference(
                segment.t(), hidden, memory, targets=segment.t()
            )
            assert torch.allclose(logits.transpose(0, 1), out.logits, atol=1e-5)
            assert torch.allclose(loss, out.loss, atol=1e-6)
            state = out.state
    kept = [m.shape[1] for m in state.memory if m is not None]
    assert kept == [m.shape[0] for m in memory if m is not None] == [12] * len(kept)


def test_reference_style_model_has_the_same_gradients_without_dropout():
    """A training step of either model is the same computation (dropout off)."""
    torch.manual_seed(0)
    config = SHARNNConfig.smoke(memory_len=16)
    model = SHARNN(config)
    reference = ReferenceStyleSHARNN.from_sharnn(model)
    x = torch.randint(0, 256, (2, 9))
    model(x[:, :8], targets=x[:, 1:]).loss.backward()
    reference(x[:, :8].t(), targets=x[:, 1:].t())[1].backward()
    ours = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.allclose(p.grad, ours[name].grad, atol=1e-5, rtol=1e-4), name


def test_flop_count_matches_a_hand_count():
    # d = 8, N = 3, V = 256, two blocks, attention in block 0, T = 4, M = 6.
    config = SHARNNConfig(d_model=8, n_layers=2, boom_expansion=3, attention_layers=(0,))
    lstm = 2 * (8 * 32 + 8 * 32)  # input and recurrent matmuls to the 4 gates: 1024
    boom = 2 * 8 * 24  # 384
    keys = 6 + (1 + 2 + 3 + 4) / 4  # every query sees the 6 memory positions and 1..4 of its own
    attention = 2 * 8 * 8 + 2 * (2 * 8 * keys)  # query projection, scores, weighted sum: 400
    softmax = 2 * 8 * 256  # 4096
    expected = 2 * (lstm + boom) + attention + softmax
    assert model_flops_per_byte(config, seq_len=4, memory=6) == expected == 7312
    qrnn2 = 2 * (2 * 8) * (3 * 8)  # window 2: [x_t; x_{t-1}] to z, f, o: 768
    shaq = SHARNNConfig(
        d_model=8, n_layers=2, boom_expansion=3, attention_layers=(0,), rnn="qrnn", qrnn_window=2
    )
    assert (
        model_flops_per_byte(shaq, seq_len=4, memory=6) == 2 * (qrnn2 + boom) + attention + softmax
    )


def test_flop_count_agrees_with_torch_flop_counter(monkeypatch):
    """Forward + backward = 3x the forward's matmul FLOPs, as PyTorch itself counts them."""
    monkeypatch.setattr(switches, "use_onednn", False)  # the counter knows aten's matmuls only
    config = SHARNNConfig.smoke(attention_layers=(), rnn="qrnn", qrnn_window=2)
    model = SHAQ(config)
    x = torch.randint(0, 256, (2, 8))
    with FlopCounterMode(display=False) as counter:
        model(x, targets=x).loss.backward()
    assert (
        counter.get_total_flops() == 3 * model_flops_per_byte(config, seq_len=8, memory=0) * 2 * 8
    )
    assert train_flops_per_byte(config, seq_len=8, memory=0) == 3 * model_flops_per_byte(
        config, 8, 0
    )


def test_shatter_flop_count_matches_a_hand_count():
    # d = 8, N = 2, K = 3 partitions, V = 256, two blocks (both attend), T = 4, M = 6.
    config = ShatterConfig(d_model=8, n_layers=2, n_partitions=3, ff_expansion=2, memory_len=10)
    keys = 6 + (1 + 2 + 3 + 4) / 4  # every query sees the 6 memory positions and 1..4 of its own
    query = 2 * 8 * 8  # 128
    scores = 2 * 8 * keys  # 136
    sums = 3 * 2 * 8 * keys  # the three partition-weighted sums, 8 wide: 408
    values = 2 * 24 * 8  # the stacked value matrices, 3 * 8 -> 8: 384
    mlp = 2 * 8 * 16 + 2 * 16 * 8  # 512
    softmax = 2 * 8 * 256  # 4096
    expected = 2 * (query + scores + sums + values + mlp) + softmax
    assert model_flops_per_byte(config, seq_len=4, memory=6) == expected == 7232
    boom = replace(config, ff="boom")
    assert model_flops_per_byte(boom, seq_len=4, memory=6) == expected - 2 * (2 * 16 * 8)
    assert train_flops_per_byte(config, seq_len=4, memory=6) == 3 * expected


def test_shatter_flop_count_agrees_with_torch_flop_counter(monkeypatch):
    """3x the forward as PyTorch counts it, less what the code spends on masked future keys.

    The attention multiplies every query with all M + T keys and zeroes the future afterwards;
    the FLOP model counts the M + (T + 1) / 2 keys a query sees on average.
    """
    monkeypatch.setattr(switches, "use_onednn", False)  # the counter knows aten's matmuls only
    d, B, T = 16, 2, 8
    config = ShatterConfig.smoke(d_model=d, ff_expansion=2, memory_len=20)
    model = ShatterLM(config)
    memory = [torch.randn(B, config.memory_len, d) for _ in range(config.n_layers)]
    x = torch.randint(0, 256, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(x, State(rnn=[], memory=memory), targets=x).loss.backward()
    M = config.memory_len - T  # what a block keeps of a full memory
    future = (T - 1) / 2  # keys after a query, on average
    masked = config.n_layers * (2 * d + 2 * config.n_partitions * d) * future  # scores and sums
    assert counter.get_total_flops() == 3 * B * T * (model_flops_per_byte(config, T, M) + masked)


def test_every_section_has_a_formatter():
    assert set(FORMATTERS) == {"matmul_peak", *SECTIONS, "compile", "profile"}
    with pytest.raises(ValueError, match="no table"):
        format_section("nonsense", {})


def test_bench_tables_round_by_size_and_align_numbers_right():
    rows = [["paper", 123456.7, 0.01234, "8%"], ["cpu", 99.5, 1.5, "13%"]]
    text = table(["shape", "B/s", "ms", "MFU"], rows)
    assert text.splitlines() == [
        "shape      B/s      ms  MFU",
        "-----  -------  ------  ---",
        "paper  123,457  0.0123   8%",
        "cpu      99.50    1.50  13%",
    ]


def test_cpu_monitor_and_peak_memory_measure_something():
    others = CpuMonitor().idle_probe(0.05)
    assert others is None or others >= 0
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    block = torch.ones(64, 2**20 // 4)  # 64 MiB, touched
    peak = memory.peak()
    del block
    assert peak is None or peak >= 60 * 2**20


def test_profile_splits_a_step_into_phases_and_operators():
    results = main(["--quick", "--device", "cpu", "--no-malloc-tuning", "--profile", "smoke"])
    assert (
        set(results) >= {"matmul_peak", "profile"} and "rnn" not in results
    )  # --profile runs alone
    assert [r["model"] for r in results["profile"]] == ["shaq", "sharnn"]
    for r in results["profile"]:
        assert set(r["phases_s"]) == {"forward", "backward", "clip", "optimizer"}
        assert r["step_s"] == pytest.approx(sum(r["phases_s"].values())) and r["step_s"] > 0
        shares = [op["share"] for op in r["top_ops"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0 + 1e-6


def test_profile_of_an_unknown_shape_fails_before_any_work():
    with pytest.raises(SystemExit, match="smoke"):
        main(["--quick", "--device", "cpu", "--profile", "paper"])


def test_step_shapes_picks_the_step_sections_shapes_and_refuses_unknown_ones():
    argv = ["--quick", "--device", "cpu", "--no-malloc-tuning", "--only", "step"]
    results = main([*argv, "--step-shapes", "smoke"])
    assert [entry["shape"] for entry in results["step"]] == ["smoke"]
    with pytest.raises(SystemExit, match=r"\['paper'\] not among the quick plan's"):
        main([*argv, "--step-shapes", "smoke", "paper"])


def _perf_doc():
    """tools/perf_doc.py as a module (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location("perf_doc", ROOT / "tools" / "perf_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_perf_doc_renders_the_bench_json_and_marks_a_quick_run_as_a_placeholder(tmp_path):
    perf_doc = _perf_doc()
    assert set(perf_doc.TITLES) == set(FORMATTERS)  # a heading for every section there is
    path = tmp_path / "bench.json"
    argv = "--quick --device cpu --no-malloc-tuning --only rnn".split() + ["--json", str(path)]
    results = main(argv)
    started = datetime.fromisoformat(results["meta"]["started_utc"])
    assert abs(datetime.now(timezone.utc) - started) < timedelta(hours=1)  # the bench's own date
    out = tmp_path / "docs" / "performance.md"
    with pytest.raises(SystemExit, match="is a --quick run"):
        perf_doc.main([str(path), "--out", str(out)])
    assert not out.exists()

    tool_argv = [str(path), "--allow-quick", "--out", str(out)]
    assert perf_doc.main(tool_argv) == 0
    doc = out.read_text()
    assert doc.startswith("# Performance\n") and doc.count(perf_doc.PLACEHOLDER) == 1
    assert f"`python tools/perf_doc.py {shlex.join(tool_argv)}`" in doc
    assert f"## `python -m shaq.bench {shlex.join(argv)}`" in doc
    assert f"Run started {started:%Y-%m-%d %H:%M} UTC." in doc
    older = tmp_path / "older.json"  # a JSON from before the bench recorded its start: its mtime
    older.write_text(json.dumps(results | {"meta": results["meta"] | {"started_utc": None}}))
    os.utime(older, (1_780_000_000, 1_780_000_000))
    perf_doc.main([str(older), "--allow-quick", "--out", str(tmp_path / "older.md")])
    assert "Run started 2026-05-28 20:26 UTC." in (tmp_path / "older.md").read_text()
    meta = results["meta"]
    assert f"- CPU: {meta['cpu']}, {meta['threads']} torch threads" in doc
    assert f"- torch {torch.__version__}, Python " in doc
    assert results["contention"]["summary"] in doc
    # Each section under its heading, the table as the bench printed it, in the bench's order.
    sections = [
        f"### {perf_doc.TITLES[name]}\n\n```text\n{format_section(name, results[name])}\n```"
        for name in ("matmul_peak", "rnn")
    ]
    assert doc.index(sections[0]) < doc.index(sections[1])
    assert "### The forget-mult" not in doc  # --only rnn: no other section

    path.write_text(json.dumps({"rnn": results["rnn"]}))
    with pytest.raises(SystemExit, match="not the JSON of a bench run"):
        perf_doc.main([str(path), "--out", str(out)])
