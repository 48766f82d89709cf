"""What every chapter of the book calls: the setup cell, run levels, a live plot, provenance.

The first code cell of each chapter is::

    level = shaq.notebook.setup(seed=0)

which reads the run level from the environment, picks the device, seeds every random number
generator, prints one line per fact (versions, device, level, data) and shows a provenance line
that the chapter's last cell completes with ``level.finish()``. Three run levels exist::

    smoke  seconds on a CPU; what pytest --nbmake book/ runs; the first 1 MB of the stand-in
    demo   minutes on a CPU or a Colab GPU; produced the outputs committed in the book; the stand-in
    full   hours on a GPU; enwik8

``SHAQ_RUN=smoke|demo|full`` picks one; without it the level is ``demo`` on any machine (``full``
means hours of GPU time, so it is only ever asked for, never chosen by the hardware).
``SHAQ_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``) overrides the device,
``SHAQ_THREADS`` the number of CPU threads and ``SHAQ_DATA`` the folder that holds enwik8.
Chapters choose their sizes with ``level.pick(smoke=..., demo=..., full=...)`` and their data
with ``level.load_corpus()``.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

import shaq
from shaq.device import pick_device
from shaq.train import TrainConfig, format_duration

LEVELS = ("smoke", "demo", "full")
LEVEL_ENV = "SHAQ_RUN"
DEVICE_ENV = "SHAQ_DEVICE"
THREADS_ENV = "SHAQ_THREADS"
DATA_ENV = "SHAQ_DATA"
# The smoke level reads only this many bytes of the stand-in: enough for every split to hold real
# text, small enough that each chapter's smoke run takes seconds.
SMOKE_MAX_BYTES = 1_000_000
# A stable id for the provenance output, so that finish() can rewrite the line setup() showed.
_PROVENANCE_ID = "shaq-provenance"

T = TypeVar("T")


# ----------------------------------------------------------------------------- small facts


def _ipython() -> Any:
    """The running IPython shell, or None in plain Python (or when IPython is not installed)."""
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


def in_live_kernel() -> bool:
    """True in a Jupyter kernel that a person is watching: not plain Python, not nbmake.

    nbmake runs notebooks inside pytest, whose ``PYTEST_CURRENT_TEST`` variable the kernel
    inherits; there nobody watches, so plots are drawn once at the end.
    """
    shell = _ipython()
    return shell is not None and hasattr(shell, "kernel") and "PYTEST_CURRENT_TEST" not in os.environ


def parse_level(value: str | None) -> str:
    """The run level named by `value` (the ``SHAQ_RUN`` variable), case and spaces ignored.

    Unset or empty means ``demo``, whatever the hardware.

    Raises:
        ValueError: `value` names no run level.
    """
    if value is None or not value.strip():
        return "demo"
    name = value.strip().lower()
    if name not in LEVELS:
        raise ValueError(
            f"{LEVEL_ENV}={value!r} is not a run level: use one of {', '.join(LEVELS)} "
            "(or leave it unset for demo)"
        )
    return name


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (if installed) and torch's generators (CPU and every GPU)."""
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed)
    torch.manual_seed(seed)


def _available_cores() -> int:
    """CPU cores this process may run on (honours taskset/cgroup affinity where the OS has it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _limit_threads(device: torch.device) -> int:
    """Set torch's intra-op threads and return the number.

    ``SHAQ_THREADS`` wins. Otherwise never more than the cores this process may use: torch
    counts the machine's cores, which in a container or on a shared machine oversubscribes
    the CPU and makes small-op models several times slower.
    """
    wanted = os.environ.get(THREADS_ENV, "").strip()
    if wanted:
        try:
            n = int(wanted)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{THREADS_ENV}={wanted!r} must be a positive integer")
    else:
        n = min(torch.get_num_threads(), _available_cores())
    torch.set_num_threads(n)
    return n


def git_revision(path: str | os.PathLike[str] | None = None) -> str | None:
    """Short commit hash of the checkout that holds `path` (default: the shaq package).

    A trailing ``+`` means the package had uncommitted changes. None when the package is not in
    a git checkout (e.g. installed from a wheel) or git is missing.
    """
    folder = Path(path) if path is not None else Path(shaq.__file__).parent
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--", "."],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+" if dirty else "") if head else None


def shaq_version() -> str:
    """``shaq 0.1.0 (317c875)``: the package version and, in a git checkout, its commit."""
    revision = git_revision()
    return f"shaq {shaq.__version__}" + (f" ({revision})" if revision else "")


def describe_device(device: torch.device) -> str:
    """``CPU``, ``GPU (NVIDIA H100 80GB HBM3)`` or ``Apple GPU (MPS)``."""
    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return device.type.upper()


def default_data_root() -> Path:
    """Where enwik8 lives: ``SHAQ_DATA``, else the checkout's ``data/``, else ``./data``.

    The checkout's folder is used when shaq runs from a clone (its ``data/README.md`` exists);
    an installed shaq (e.g. on Colab) keeps the data next to the notebook instead.
    """
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    checkout_data = Path(shaq.__file__).resolve().parents[1] / "data"
    if (checkout_data / "README.md").exists():
        return checkout_data
    return Path("data")


def _short_path(path: Path) -> str:
    """`path` relative to the working directory when that is shorter (keeps outputs portable)."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return relative if len(relative) < len(str(path)) else str(path)


# ----------------------------------------------------------------------------- the run level


class _Line:
    """One line of text that renders as Markdown in Jupyter and as itself elsewhere."""

    def __init__(self, text: str, markdown: str):
        self.text, self.markdown = text, markdown

    def __repr__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return self.markdown


@dataclass
class RunLevel:
    """The run level a notebook runs at, and what follows from it. Made by `setup`.

    Attributes:
        name: ``smoke``, ``demo`` or ``full``.
        device: where the chapter computes.
        seed: what every generator was seeded with.
        data_name: the name of the corpus `load_corpus` returns (``standin-py3.11`` or ``enwik8``).
        data_description: the same for people, e.g. ``the stand-in (py3.11 stdlib + pydoc text)``.
        data_root: the folder that holds enwik8 (used at the full level only).
        started: ``time.perf_counter()`` when setup ran; `elapsed` counts from it.
    """

    name: str
    device: torch.device
    seed: int = 0
    data_name: str = ""
    data_description: str = ""
    data_root: Path = field(default_factory=lambda: Path("data"))
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        if self.name not in LEVELS:
            raise ValueError(f"run level must be one of {', '.join(LEVELS)}, got {self.name!r}")
        self.device = torch.device(self.device)
        if not self.data_name:
            self.data_name = _data_name(self.name)
        if not self.data_description:
            self.data_description = _data_description(self.name)

    @property
    def is_smoke(self) -> bool:
        return self.name == "smoke"

    @property
    def is_demo(self) -> bool:
        return self.name == "demo"

    @property
    def is_full(self) -> bool:
        return self.name == "full"

    def pick(self, *, smoke: T, demo: T, full: T) -> T:
        """The value for this run level, e.g. ``steps = level.pick(smoke=20, demo=600, full=20_000)``."""
        return {"smoke": smoke, "demo": demo, "full": full}[self.name]

    def at(self, name: str) -> RunLevel:
        """This run level under another name, e.g. ``level.at("full").pick(...)`` for the value a
        cell would use at the full level."""
        return replace(self, name=name, data_name="", data_description="")

    def show_full_cost(self, config: TrainConfig | None = None, *, train_bytes: int | None = None,
                       runs: int = 1) -> None:
        """Say, before a chapter trains, what its training costs at the full level, whatever level
        this is: `config` is one run's full-level TrainConfig (or give the bytes it trains), and
        the chapter trains `runs` such runs."""
        print(full_cost(config, train_bytes=train_bytes, runs=runs))

    def load_corpus(self):
        """The corpus of this level: the stand-in (its first 1 MB at smoke) or enwik8 at full.

        Returns a `shaq.data.Corpus`; enwik8 is downloaded into `data_root` on first use.
        """
        from shaq import data

        if self.is_full:
            return data.load_enwik8(self.data_root)
        return data.load_standin(max_bytes=SMOKE_MAX_BYTES if self.is_smoke else None)

    def elapsed(self) -> float:
        """Seconds since `setup`."""
        return time.perf_counter() - self.started

    def provenance(self, elapsed_s: float | None = None) -> str:
        """Which level, data, device and code produced a notebook's numbers, and how long it took.

        ``Produced by run level demo on the stand-in (py3.11 stdlib + pydoc text), CPU, in
        2 min 13 s, shaq 0.1.0 (317c875)``. Without `elapsed_s` the time is left out.
        """
        took = f", in {format_duration(elapsed_s)}" if elapsed_s is not None else ""
        return (
            f"Produced by run level {self.name} on {self.data_description}, "
            f"{describe_device(self.device)}{took}, {shaq_version()}"
        )

    def _provenance_line(self, text: str) -> _Line:
        return _Line(text, f"*{text}.*")

    def show_provenance(self) -> None:
        """Show the provenance line (without a time yet) where it can be rewritten by `finish`."""
        text = self.provenance() + " (still running: the time appears when the notebook finishes)"
        _display(self._provenance_line(text), display_id=_PROVENANCE_ID)

    def finish(self) -> None:
        """Complete the provenance line that setup showed with the total time; print it too.

        Call it in a chapter's last cell. In Jupyter (and in the executed notebook that the book
        renders) the line near the top is rewritten in place, so the page says up front which
        run produced its numbers and how long the run took.
        """
        text = self.provenance(self.elapsed())
        _display(self._provenance_line(text), display_id=_PROVENANCE_ID, update=True)
        print(text)


# The yardstick for what the full level costs until a GPU of this project has been measured: the
# SHA-RNN paper's one epoch of enwik8 (90,000,000 training bytes) in 1,800 s on one Titan V
# (Merity 2019, quoted by its author in sha-rnn issue #3), for its 54M-parameter model.
ENWIK8_TRAIN_BYTES = 90_000_000
PAPER_GPU = "one Titan V"
PAPER_BYTES_PER_SECOND = ENWIK8_TRAIN_BYTES / 1800


def full_cost(config: TrainConfig | None = None, *, train_bytes: int | None = None, runs: int = 1) -> str:
    """One line on what training `config` (or `train_bytes` bytes) costs on a GPU at the speed of
    the paper's SHA-RNN (the chapters' smaller models would train faster).

    A run bounded by minutes costs at most those minutes; one bounded by steps or epochs costs
    its bytes at that speed; the first bound to come counts. `runs` such runs cost `runs` times it.
    """
    if (config is None) == (train_bytes is None):
        raise ValueError("give the full level's TrainConfig or the bytes it trains, not both")
    hours, how = [], []
    if config is not None:
        by_bytes = []
        if config.steps is not None:
            by_bytes.append(config.steps * config.batch_size * config.seq_len)
        if config.epochs is not None:
            by_bytes.append(config.epochs * (config.max_bytes or ENWIK8_TRAIN_BYTES))
        if by_bytes:
            train_bytes = min(by_bytes)
        if config.minutes is not None:
            hours.append(config.minutes / 60)
            how.append(f"its {config.minutes:g}-minute budget")
    if train_bytes is not None:
        hours.append(train_bytes / PAPER_BYTES_PER_SECOND / 3600)
        how.append(f"{train_bytes:,.0f} bytes at the paper's {PAPER_BYTES_PER_SECOND:,.0f} bytes/s on {PAPER_GPU}")
    cost = runs * min(hours)
    if cost < 1 / 60:
        amount = "less than a GPU-minute"
    else:
        minutes = round(cost * 60)
        amount = f"about {minutes} GPU-minute{'s' if minutes != 1 else ''}" if cost < 1 else f"about {cost:,.1f} GPU-hours"
    each = f"{runs} runs, each " if runs > 1 else ""
    ends = ", whichever ends first" if len(how) > 1 else ""
    return f"At the full level this training costs {amount} ({each}{' or '.join(how)}{ends})."


def _data_name(level: str) -> str:
    if level == "full":
        return "enwik8"
    return f"standin-py{sys.version_info.major}.{sys.version_info.minor}"


def _data_description(level: str) -> str:
    if level == "full":
        return "enwik8"
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    first = f", first {SMOKE_MAX_BYTES:,} bytes" if level == "smoke" else ""
    return f"the stand-in ({version} stdlib + pydoc text{first})"


def _display(obj: Any, display_id: str | None = None, update: bool = False) -> None:
    """IPython's display (or update of an existing display_id); a print in plain Python."""
    if _ipython() is None:
        if not update:
            print(repr(obj))
        return
    from IPython.display import display, update_display

    if update and display_id is not None:
        update_display(obj, display_id=display_id)
    else:
        display(obj, display_id=display_id)


def setup(
    seed: int = 0,
    level: str | None = None,
    device: str | None = None,
    quiet: bool = False,
) -> RunLevel:
    """Prepare a chapter: run level, device, seeds, threads; print what was chosen.

    Args:
        seed: seeds Python's, NumPy's and torch's generators.
        level: ``smoke``, ``demo`` or ``full``; default ``SHAQ_RUN``, else demo.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` or ``mps``; default ``SHAQ_DEVICE``,
            else auto (CUDA, then MPS, then the CPU).
        quiet: print nothing and show no provenance line (for tests and scripts).

    Returns:
        The RunLevel: ``level.pick(...)`` chooses sizes, ``level.load_corpus()`` the data and
        ``level.finish()`` (in the last cell) completes the provenance line.

    Raises:
        ValueError: an unknown level or device, or a device this machine does not have.
    """
    device_name = device or os.environ.get(DEVICE_ENV, "").strip() or "auto"
    chosen = pick_device(device_name)
    name = parse_level(level if level is not None else os.environ.get(LEVEL_ENV))
    threads = _limit_threads(chosen)
    seed_everything(seed)
    run = RunLevel(name=name, device=chosen, seed=seed, data_root=default_data_root())
    if quiet:
        return run
    if level is not None:
        why = f"setup(level={level!r})"
    elif os.environ.get(LEVEL_ENV, "").strip():
        why = f"{LEVEL_ENV}={os.environ[LEVEL_ENV].strip()}"
    else:
        why = f"the default; set {LEVEL_ENV}=smoke|demo|full to change it"
    print(shaq_version())
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"device: {describe_device(chosen)}, {threads} CPU thread{'s' if threads != 1 else ''}")
    print(f"run level: {name} ({why}), seed {seed}")
    if run.is_full:
        print(f"data: enwik8 from {_short_path(run.data_root)} (downloaded on first use)")
    else:
        print(f"data: {run.data_description}, not enwik8")
    run.show_provenance()
    return run


# ----------------------------------------------------------------------------- tables


class Table:
    """A small table that renders as Markdown in Jupyter (and the book) and as text elsewhere.

    ``Table(["model", "bpb"], [["unigram", 4.93], ["bigram", 3.41]], digits=3)``; as the last
    expression of a cell it displays itself. Floats are rounded to `digits` decimals, ints get
    thousands separators, everything else is shown with ``str``.
    """

    def __init__(self, headers: list[str], rows: list[list[Any]], digits: int = 3):
        self.headers = [str(h) for h in headers]
        self.rows = [[self._cell(value, digits) for value in row] for row in rows]
        if any(len(row) != len(self.headers) for row in self.rows):
            raise ValueError(f"every row needs {len(self.headers)} values, like the headers")

    @staticmethod
    def _cell(value: Any, digits: int) -> str:
        if isinstance(value, bool):
            return str(value)
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:,.{digits}f}"
        return str(value)

    def __repr__(self) -> str:
        widths = [max(len(h), *(len(row[i]) for row in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.headers)]
        lines = [self.headers, ["-" * w for w in widths], *self.rows]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)

    def _repr_markdown_(self) -> str:
        def line(cells):
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        out = [line(self.headers), "|" + "|".join("---" for _ in self.headers) + "|"]
        return "\n".join(out + [line(row) for row in self.rows])


# ----------------------------------------------------------------------------- timing


class Timer:
    """``with Timer("bigram counts"): ...`` prints ``bigram counts: 0.3 s``; `.seconds` keeps it."""

    def __init__(self, label: str | None = None, quiet: bool = False):
        self.label, self.quiet = label, quiet
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        if not self.quiet and exc[0] is None:
            print(f"{self.label or 'took'}: {format_duration(self.seconds)}")


# ----------------------------------------------------------------------------- live plot


class LivePlot:
    """Training curves that redraw while a cell runs and leave one static figure behind.

    ::

        plot = LivePlot(ylabel="bits per byte")
        plot.hline(8.0, "uniform guess")
        for step in range(steps):
            ...
            plot.add("train", step, train_bpb)
        plot.close()

    In a Jupyter kernel that someone watches, the figure is shown once and then updated in
    place (at most about every `min_interval_s`, and never spending more than a tenth of the
    time on drawing); `close` draws the final state. Elsewhere (nbmake, plain Python) nothing
    is drawn until `close`, which shows the figure once (IPython) and returns it either way.
    The figure is a PNG image output, so the built book shows exactly the last state.
    """

    def __init__(
        self,
        xlabel: str = "step",
        ylabel: str = "bits per byte",
        title: str | None = None,
        xscale: str = "linear",
        yscale: str = "linear",
        figsize: tuple[float, float] = (6.0, 3.5),
        dpi: int = 110,
        min_interval_s: float = 1.0,
        live: bool | None = None,
    ):
        from matplotlib.figure import Figure  # not pyplot: no second copy appears at cell end

        self.figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
        self.axes = self.figure.add_subplot()
        self.axes.set(xlabel=xlabel, ylabel=ylabel, xscale=xscale, yscale=yscale)
        if title:
            self.axes.set_title(title)
        self.axes.grid(alpha=0.3)
        self.series: dict[str, tuple[list[float], list[float]]] = {}
        self._lines: dict[str, Any] = {}
        self.live = in_live_kernel() if live is None else live
        self.min_interval_s = min_interval_s
        self._handle = None
        self._next_draw = 0.0
        self._closed = False

    def hline(self, y: float, label: str, **style) -> None:
        """A horizontal reference line (e.g. 8 bits per byte for the uniform guess)."""
        style = {"color": "gray", "linestyle": "--", "linewidth": 1, **style}
        self.axes.axhline(y, label=label, **style)

    def add(self, name: str, x: float, y: float) -> None:
        """Append the point (x, y) to the curve `name` and redraw if it is time to."""
        if self._closed:
            raise RuntimeError("this LivePlot is closed; make a new one")
        xs, ys = self.series.setdefault(name, ([], []))
        xs.append(float(x))
        ys.append(float(y))
        if self.live and time.perf_counter() >= self._next_draw:
            started = time.perf_counter()
            self._show()
            spent = time.perf_counter() - started
            self._next_draw = time.perf_counter() + max(self.min_interval_s, 10 * spent)

    def _redraw(self) -> None:
        for name, (xs, ys) in self.series.items():
            if name not in self._lines:
                (self._lines[name],) = self.axes.plot(xs, ys, label=name, markersize=3)
            self._lines[name].set_data(xs, ys)
            self._lines[name].set_marker("o" if len(xs) < 30 else "")  # dots only while sparse
        self.axes.relim()
        self.axes.autoscale_view()
        if self.series or self.axes.get_legend_handles_labels()[0]:
            self.axes.legend(loc="best")

    def png(self) -> bytes:
        """The current figure as PNG bytes."""
        self._redraw()
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        return buffer.getvalue()

    def _show(self) -> None:
        if _ipython() is None:
            return
        from IPython.display import Image, display

        image = Image(data=self.png(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)

    def close(self):
        """Draw the final state (once) and return the matplotlib Figure."""
        if not self._closed:
            self._closed = True
            if _ipython() is None:
                self._redraw()
            else:
                self._show()
        return self.figure

    def __enter__(self) -> "LivePlot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
