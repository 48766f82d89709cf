"""What every chapter of the book calls: the setup cell, run levels, tables, a live plot, timing.

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

This module is the setup cell; `run_level` holds the RunLevel it returns (sizes, data,
provenance, the full level's cost), `live_plot` the LivePlot, `display` where output goes in
Jupyter and elsewhere, and `shaq.table` the Table every chapter shows.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import torch

import shaq
from shaq.console import format_duration, rate_text
from shaq.device import pick_device
from shaq.notebook.live_plot import LivePlot
from shaq.notebook.run_level import (
    LEVELS,
    SMOKE_MAX_BYTES,
    RunLevel,
    describe_device,
    full_cost,
    shaq_version,
)
from shaq.table import Table

__all__ = [
    "DATA_ENV",
    "DEVICE_ENV",
    "LEVELS",
    "LEVEL_ENV",
    "SMOKE_MAX_BYTES",
    "THREADS_ENV",
    "LivePlot",
    "RunLevel",
    "Table",
    "Timer",
    "default_data_root",
    "describe_device",
    "format_duration",
    "full_cost",
    "parse_level",
    "rate_text",
    "seed_everything",
    "setup",
]

LEVEL_ENV = "SHAQ_RUN"
DEVICE_ENV = "SHAQ_DEVICE"
THREADS_ENV = "SHAQ_THREADS"
DATA_ENV = "SHAQ_DATA"


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


def _limit_threads() -> int:
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


def setup(
    seed: int = 0, level: str | None = None, device: str | None = None, quiet: bool = False
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
    chosen = pick_device(device or os.environ.get(DEVICE_ENV, "").strip() or "auto")
    name = parse_level(level if level is not None else os.environ.get(LEVEL_ENV))
    threads = _limit_threads()
    seed_everything(seed)
    run = RunLevel(name=name, device=chosen, data_root=default_data_root())
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


class Timer:
    """``with Timer("bigram counts"): ...`` prints ``bigram counts: 0.3 s``; `.seconds` keeps it."""

    def __init__(self, label: str):
        self.label = label
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        if exc[0] is None:
            print(f"{self.label}: {format_duration(self.seconds)}")
