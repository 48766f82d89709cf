"""The benchmark's printed tables: one formatter per section, looked up in FORMATTERS.

Each formatter takes the plain data its section in `shaq.bench.sections` returned (the same
data `--json` writes) and returns the text printed for it; the numbers are not recomputed.
"""

from collections.abc import Callable

from shaq.table import Table


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text `shaq.table.Table` with each float rounded to the digits its size needs."""
    return Table(headers, rows, digits=None).text()


def format_matmul_peak(data: dict) -> str:
    """GFLOP/s of each matmul backend."""
    rows = [[backend, g] for backend, g in data["gflops"].items()]
    return f"matmul peak ({data['n']}^2, {data['dtype']})\n" + table(["backend", "GFLOP/s"], rows)


def format_rnn(data: list[dict]) -> str:
    """One recurrent layer: LSTM and QRNN bytes/s, the QRNN's speed-up and share of the matmul
    peak."""
    rows = [
        [
            r["hidden"],
            r["seq_len"],
            r["lstm_bytes_per_s"],
            r["qrnn1_bytes_per_s"],
            r["qrnn1_speedup"],
            _pct(r["qrnn1_peak_fraction"]),
            r["qrnn2_bytes_per_s"],
            r["qrnn2_speedup"],
            _pct(r["qrnn2_peak_fraction"]),
        ]
        for r in data
    ]
    headers = [
        "H",
        "T",
        "LSTM B/s",
        "QRNN1 B/s",
        "x LSTM",
        "of peak",
        "QRNN2 B/s",
        "x LSTM",
        "of peak",
    ]
    return f"one layer, forward+backward, batch {data[0]['batch']}\n" + table(headers, rows)


def format_forget_mult(data: list[dict]) -> str:
    """The forget-mult against its reference loop, and its share of a QRNN layer's time."""
    rows = [
        [
            r["hidden"],
            r["seq_len"],
            r["reference_s"] * 1e3,
            r["fast_s"] * 1e3,
            r["speedup"],
            r["qrnn_pool_s"] * 1e3,
            r["qrnn1_layer_s"] * 1e3,
            _pct(r["forget_mult_share"]),
            _pct(r["qrnn_pool_share"]),
        ]
        for r in data
    ]
    headers = [
        "H",
        "T",
        "ref ms",
        "fast ms",
        "speedup",
        "pool ms",
        "QRNN1 ms",
        "fm share",
        "pool share",
    ]
    return "forget-mult, forward+backward (share = of the QRNN window-1 layer's time)\n" + table(
        headers, rows
    )


def format_attention(data: list[dict]) -> str:
    """Attention against memory length: shaq's and the reference-style, in milliseconds."""
    rows = [
        [
            r["memory"],
            r["keys"],
            r["reference_s"] * 1e3,
            r["ours_s"] * 1e3,
            r["speedup"],
            r["ours_no_dropout_s"] * 1e3,
        ]
        for r in data
    ]
    headers = ["memory", "keys", "reference ms", "ours ms", "speedup", "ours p=0 ms"]
    r0 = data[0]
    title = (
        f"attention, forward+backward, d {r0['d_model']}, T {r0['seq_len']}, B {r0['batch']}, "
        f"dropout {r0['dropout']}"
    )
    return title + "\n" + table(headers, rows)


def format_step(data: list[dict]) -> str:
    """Training steps: a row per shape and model, then each shape's ratios between the models."""
    rows = []
    for e in data:
        for kind, m in e["models"].items():
            rows.append(
                [
                    e["shape"],
                    kind,
                    m["bytes_per_s"],
                    m["step_s"],
                    _pct(m["mfu"]),
                    m["peak_memory_mb"],
                    m["params"] / 1e6,
                ]
            )
    headers = ["shape", "model", "bytes/s", "step s", "MFU", "peak MB", "params M"]
    lines = ["training step (forward, backward, clip, LAMB)", table(headers, rows)]
    for e in data:
        line = (
            f"{e['shape']} (B {e['batch']}, T {e['seq_len']}): "
            f"SHAQ / SHARNN {e['shaq_over_sharnn']:.2f}x, "
            f"SHARNN / reference-style {e['sharnn_over_reference']:.2f}x, "
            f"Shatter / SHAQ {e['shatter_over_shaq']:.2f}x"
        )
        if e["quoted_original_bytes_per_s"] is not None:
            line += (
                "; quoted original sha-rnn on this CPU: "
                f"{e['quoted_original_bytes_per_s']:.0f} bytes/s"
            )
        lines.append(line)
    return "\n".join(lines)


def format_trainer(data: dict) -> str:
    """The Trainer's bytes/s against the isolated step's, their ratio, and if it meets the goal."""
    rows = [
        ["Trainer", data["trainer_bytes_per_s"]],
        ["isolated step", data["isolated_bytes_per_s"]],
        ["  before the Trainer", data["isolated_before_bytes_per_s"]],
        ["  after the Trainer", data["isolated_after_bytes_per_s"]],
    ]
    verdict = "met" if data["met"] else "NOT met"
    title = (
        f"training loop: {data['model'].upper()} at {data['shape']} (B {data['batch']}, "
        f"T {data['seq_len']}), {data['timed_steps']} timed steps after "
        f"{data['untimed_steps']} (eval_interval {data['eval_interval']}, "
        f"save_interval {data['save_interval']})"
    )
    ratio = f"Trainer / isolated step {data['ratio']:.3f} (goal >= {data['target']}: {verdict})"
    return "\n".join([title, table(["run", "bytes/s"], rows), ratio])


def format_profile(data: list[dict]) -> str:
    """Per profiled step: time by phase, then the operators that take the most of it."""
    blocks = []
    for r in data:
        phases = ", ".join(f"{k} {_pct(v / r['step_s'])}" for k, v in r["phases_s"].items())
        rows = [
            [o["op"][:48], o["calls"], o["self_s"] * 1e3, _pct(o["share"])] for o in r["top_ops"]
        ]
        blocks.append(
            f"profile of one {r['model']} step at {r['shape']}: {r['step_s']:.2f} s ({phases})\n"
            + table(["operator", "calls", "self ms", "of step"], rows)
        )
    return "\n\n".join(blocks)


def format_compile(data: dict) -> str:
    """One line: eager against torch.compile'd bytes/s, and the first (compiling) call's time."""
    return (
        f"torch.compile, SHAQ step at {data['shape']}: eager {data['eager_bytes_per_s']:.0f} "
        f"bytes/s, compiled {data['compiled_bytes_per_s']:.0f} bytes/s ({data['speedup']:.2f}x), "
        f"first call {data['first_call_s']:.0f} s"
    )


def format_codec(data: list[dict]) -> str:
    """shaq.compress and shaq.decompress in bytes/s, by lanes."""
    rows = [
        [
            e["lanes"],
            e["bytes"],
            e["method"],
            e["compress_bytes_per_s"],
            e["decompress_bytes_per_s"],
        ]
        for e in data
    ]
    title = f"compressor: {data[0]['model'].upper()} at {data[0]['shape']} (untrained weights)"
    return title + "\n" + table(["lanes", "bytes", "file", "compress B/s", "decompress B/s"], rows)


# Section name (as in the results and the JSON) -> its formatter.
FORMATTERS: dict[str, Callable] = {
    "matmul_peak": format_matmul_peak,
    "rnn": format_rnn,
    "forget_mult": format_forget_mult,
    "attention": format_attention,
    "step": format_step,
    "trainer": format_trainer,
    "codec": format_codec,
    "profile": format_profile,
    "compile": format_compile,
}


def format_section(name: str, data: dict | list[dict]) -> str:
    """The human-readable table of one section of the results."""
    try:
        formatter = FORMATTERS[name]
    except KeyError:
        raise ValueError(f"no table for section {name!r}") from None
    return formatter(data)
