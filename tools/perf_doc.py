"""Write docs/performance.md, the project's measured speed, from the JSON of `python -m shaq.bench`.

    python -m shaq.bench --json runs/bench.json                              # on a quiet machine
    python -m shaq.bench --bf16 --only rnn step --json runs/bench-bf16.json  # CPUs with bf16
    python tools/perf_doc.py runs/bench.json runs/bench-bf16.json            # docs/performance.md

Each JSON file (one run of the bench) becomes one part of the document: the command that ran,
when it started (the bench records it; for an older JSON, when the file was written), the
machine, how quiet the machine was, and each section's table exactly as the bench printed it
(`shaq.bench.report`'s formatters, on the numbers of the JSON). Nothing is measured or
recomputed here. A --quick run is refused: its tiny shapes and few repeats only show that the
bench runs. --allow-quick renders it anyway, marked as a placeholder on every part, to check
this tool.
"""

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from shaq.bench.report import format_section

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "performance.md"

# A heading per section of the results, in the order the bench runs them (see shaq.bench).
TITLES = {
    "matmul_peak": "Matmul peak",
    "rnn": "One recurrent layer: QRNN against LSTM",
    "forget_mult": "The forget-mult",
    "attention": "Attention against memory length",
    "step": "Whole training steps",
    "trainer": "The training loop against its isolated step",
    "codec": "The compressor",
    "compile": "torch.compile",
    "profile": "Where a training step's time goes",
}
# What the bench writes beside the sections.
NOT_SECTIONS = ("meta", "contention")

PLACEHOLDER = (
    "> **Placeholder**: this part comes from a `--quick` run (tiny shapes, few repeats), which "
    "only shows that the bench runs. Its figures are not measurements to quote."
)


def load_run(path: Path, allow_quick: bool) -> dict:
    """The results of one bench run as its JSON holds them; SystemExit with what to do for a file
    that is not one, or for a --quick run without allow_quick."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"perf_doc: cannot read {path}: {err}") from None
    if not isinstance(results, dict) or not {"meta", "contention"} <= set(results):
        raise SystemExit(
            f"perf_doc: {path} is not the JSON of a bench run (it has no 'meta' and "
            "'contention'); write one with: python -m shaq.bench --json PATH"
        )
    if results["meta"]["quick"] and not allow_quick:
        raise SystemExit(
            f"perf_doc: {path} is a --quick run, whose figures are not measurements to publish; "
            "run the full bench on a quiet machine (python -m shaq.bench --json PATH), or pass "
            "--allow-quick to render a placeholder"
        )
    return results


def machine_lines(meta: dict) -> list[str]:
    """The machine and the settings of a run, as Markdown list items."""
    device = meta["device"] + (f" ({meta['gpu']})" if "gpu" in meta else "")
    lines = [
        f"- device: {device}; precision: {'bf16 autocast' if meta['bf16'] else 'fp32'}",
        f"- CPU: {meta['cpu']}, {meta['threads']} torch threads",
        f"- torch {meta['torch']}, Python {meta['python']}",
    ]
    if "cpu_bf16" in meta:  # a CPU run: which instructions and fast paths it had
        bf16 = [name for name, present in meta["cpu_bf16"].items() if present]
        lines.append(f"- bf16 instructions: {', '.join(bf16) if bf16 else 'none'}")
        lines.append(
            f"- forget-mult C++ extension: {'yes' if meta['forget_mult_extension'] else 'no'}; "
            f"oneDNN linear: {'yes' if meta['onednn_linear'] else 'no'}"
        )
    lines.append(
        "- glibc malloc keeps freed memory (`tune_cpu_allocator`)"
        if meta["malloc_tuned"]
        else "- glibc malloc as it is"
    )
    return lines


def render_run(results: dict, when: datetime) -> str:
    """One run of the bench (`when`: when it started, in UTC): its command, date, machine,
    quietness and every section's table."""
    meta, contention = results["meta"], results["contention"]
    command = shlex.join(["python", "-m", "shaq.bench", *meta["argv"]])
    parts = [f"## `{command}`"]
    if meta["quick"]:
        parts.append(PLACEHOLDER)
    parts.append(f"Run started {when:%Y-%m-%d %H:%M} UTC.")
    parts.append("\n".join(machine_lines(meta)))
    quiet = (
        f"Quiet: {contention['summary']}."
        if contention["quiet"]
        else f"> **Not quiet**: {contention['warning']} ({contention['summary']})."
    )
    parts.append(quiet)
    for name, data in results.items():
        if name not in NOT_SECTIONS:
            parts.append(f"### {TITLES[name]}\n\n```text\n{format_section(name, data)}\n```")
    return "\n\n".join(parts)


def render(runs: list[tuple[dict, datetime]], command: str) -> str:
    """The whole document: a header that says how it was made, then each run."""
    header = (
        "# Performance\n\n"
        "Measured by `python -m shaq.bench` (what each section measures, and how: the docstring "
        "of `shaq.bench`, and the README's Speed section). Generated by "
        f"`{command}` from the JSON the bench wrote; to update it, re-run the bench on a quiet "
        "machine and this command, rather than editing it by hand. Timings on a machine shared "
        "with other work mean little: each part says how quiet its run was."
    )
    parts = [header, *(render_run(results, when) for results, when in runs)]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/perf_doc.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files of `python -m shaq.bench`")
    parser.add_argument(
        "--out", type=Path, default=OUT, help="where to write (default: docs/performance.md)"
    )
    parser.add_argument(
        "--allow-quick", action="store_true", help="render --quick runs, marked as placeholders"
    )
    args = parser.parse_args(argv)
    runs = []
    for path in args.runs:
        results = load_run(path, args.allow_quick)
        started = results["meta"].get("started_utc")
        when = (
            datetime.fromisoformat(started)
            if started
            else datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        )
        runs.append((results, when))
    command = shlex.join(["python", "tools/perf_doc.py", *(sys.argv[1:] if argv is None else argv)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(runs, command))
    print(f"perf_doc: wrote {args.out} from {len(runs)} bench run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
