"""The run level a chapter runs at (smoke, demo or full; see `shaq.notebook`) and what follows
from it: the sizes a cell picks, the corpus it reads, the provenance line that says which run
produced a page's numbers, and what training at the full level costs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch

import shaq
from shaq.console import format_duration
from shaq.data import Corpus
from shaq.notebook.display import MarkdownLine, show
from shaq.provenance import git_revision
from shaq.train_config import TrainConfig

LEVELS = ("smoke", "demo", "full")
# The smoke level reads only this many bytes of the stand-in: enough for every split to hold real
# text, small enough that each chapter's smoke run takes seconds. They are the start of each split
# in its 90/5/5 share, so that smoke scores the same validation bytes as the Trainer and as the
# other levels (the first bytes of the stand-in's validation split).
SMOKE_MAX_BYTES = 1_000_000
# The bytes of the validation (and test) split that every chapter scores at each level: one slice,
# the split's first bytes, so that figures from different chapters at one level are comparable.
EVAL_BYTES = {"smoke": 8_192, "demo": 65_536, "full": 1_000_000}
# A stable id for the provenance output, so that finish() can rewrite the line setup() showed.
_PROVENANCE_ID = "shaq-provenance"

T = TypeVar("T")


@dataclass
class RunLevel:
    """The run level a notebook runs at, and what follows from it. Made by `shaq.notebook.setup`.

    Attributes:
        name: ``smoke``, ``demo`` or ``full``.
        device: where the chapter computes.
        data_root: the folder that holds enwik8 (used at the full level only).
        started: ``time.perf_counter()`` when setup ran; `elapsed` counts from it.
    """

    name: str
    device: torch.device
    data_root: Path = field(default_factory=lambda: Path("data"))
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        if self.name not in LEVELS:
            raise ValueError(f"run level must be one of {', '.join(LEVELS)}, got {self.name!r}")
        self.device = torch.device(self.device)

    @property
    def is_smoke(self) -> bool:
        return self.name == "smoke"

    @property
    def is_full(self) -> bool:
        return self.name == "full"

    def pick(self, *, smoke: T, demo: T, full: T) -> T:
        """The value for this run level: ``steps = level.pick(smoke=20, demo=600, full=20_000)``."""
        return {"smoke": smoke, "demo": demo, "full": full}[self.name]

    def at(self, name: str) -> RunLevel:
        """This run level under another name, e.g. ``level.at("full").pick(...)`` for the value a
        cell would use at the full level."""
        return replace(self, name=name)

    # ------------------------------------------------------------------------- the data

    @property
    def data(self) -> str:
        """The corpus of this level as `shaq.data.load_corpus` and ``TrainConfig.data`` name it:
        ``enwik8`` at the full level, ``standin`` below it."""
        return "enwik8" if self.is_full else "standin"

    @property
    def max_bytes(self) -> int | None:
        """How much of the stand-in this level reads: 1 MB at smoke (the start of each split in its
        90/5/5 share), all of it at demo."""
        return SMOKE_MAX_BYTES if self.is_smoke else None

    @property
    def data_description(self) -> str:
        """The corpus for people, e.g. ``the stand-in (py3.11 stdlib + pydoc text)``."""
        if self.data == "enwik8":
            return "enwik8"
        version = shaq.data.STANDIN_NAME.removeprefix("standin-")
        first = ""
        if self.max_bytes is not None:
            sizes = " / ".join(f"{n:,}" for n in _smoke_split_bytes())
            first = f", the first {sizes} bytes of its train / valid / test splits"
        return f"the stand-in ({version} stdlib + pydoc text{first})"

    @property
    def eval_bytes(self) -> int:
        """How many bytes of the valid (and test) split every chapter scores at this level: the
        first 8,192 at smoke, 65,536 at demo, 1,000,000 at full (EVAL_BYTES)."""
        return EVAL_BYTES[self.name]

    def eval_settings(self) -> dict[str, int]:
        """The TrainConfig fields that make a run score this level's slice, during training and at
        the end: ``TrainConfig.cpu(**level.eval_settings(), ...)``."""
        return {"eval_bytes": self.eval_bytes, "final_bytes": self.eval_bytes}

    def valid_slice(self, corpus: Corpus) -> torch.Tensor:
        """The validation bytes every chapter scores at this level (its first `eval_bytes`)."""
        return corpus.valid[: self.eval_bytes]

    def load_corpus(self) -> Corpus:
        """The corpus of this level: the stand-in (the start of each split at smoke) or enwik8 at
        full, downloaded into `data_root` on first use (see `shaq.data.load_corpus`)."""
        corpus = shaq.data.load_corpus(self.data, self.data_root)
        if not self.is_smoke:
            return corpus
        train, valid, test = _smoke_split_bytes()
        return Corpus(corpus.train[:train], corpus.valid[:valid], corpus.test[:test], corpus.name)

    # ------------------------------------------------------------------------- time and cost

    def elapsed(self) -> float:
        """Seconds since `setup`."""
        return time.perf_counter() - self.started

    def show_full_cost(
        self, config: TrainConfig | None = None, *, train_bytes: int | None = None, runs: int = 1
    ) -> None:
        """Say, before a chapter trains, what its training costs at the full level, whatever level
        this is: `config` is one run's full-level TrainConfig (or give the bytes it trains), and
        the chapter trains `runs` such runs."""
        print(full_cost(config, train_bytes=train_bytes, runs=runs))

    # ------------------------------------------------------------------------- provenance

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

    def show_provenance(self) -> None:
        """Show the provenance line (without a time yet) where it can be rewritten by `finish`."""
        text = self.provenance() + " (still running: the time appears when the notebook finishes)"
        show(MarkdownLine(text, f"*{text}.*"), display_id=_PROVENANCE_ID)

    def finish(self) -> None:
        """Complete the provenance line that setup showed with the total time; print it too.

        Call it in a chapter's last cell. In Jupyter (and in the executed notebook that the book
        renders) the line near the top is rewritten in place, so the page says up front which
        run produced its numbers and how long the run took.
        """
        text = self.provenance(self.elapsed())
        show(MarkdownLine(text, f"*{text}.*"), display_id=_PROVENANCE_ID, update=True)
        print(text)


def _smoke_split_bytes() -> tuple[int, int, int]:
    """The train, valid and test bytes of the smoke corpus: SMOKE_MAX_BYTES cut as
    `shaq.data` cuts every corpus (90/5/5)."""
    n_eval = SMOKE_MAX_BYTES * shaq.data._EVAL_PERCENT // 100
    return SMOKE_MAX_BYTES - 2 * n_eval, n_eval, n_eval


def describe_device(device: torch.device) -> str:
    """``CPU``, ``GPU (NVIDIA H100 80GB HBM3)`` or ``Apple GPU (MPS)``."""
    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return device.type.upper()


def shaq_version() -> str:
    """``shaq 0.1.0 (317c875)``: the package version and, in a git checkout, its commit."""
    revision = git_revision()
    return f"shaq {shaq.__version__}" + (f" ({revision})" if revision else "")


# ----------------------------------------------------------------------------- full-level cost

# The yardstick for what the full level costs until a GPU of this project has been measured: the
# SHA-RNN paper's one epoch of enwik8 (90,000,000 training bytes) in 1,800 s on one Titan V for
# its single-head 52M-parameter model (Merity 2019, the text beside Table 1; a head per layer took
# 4,020 s).
ENWIK8_TRAIN_BYTES = 90_000_000
PAPER_GPU = "one Titan V"
PAPER_BYTES_PER_SECOND = ENWIK8_TRAIN_BYTES / 1800


def full_cost(
    config: TrainConfig | None = None, *, train_bytes: int | None = None, runs: int = 1
) -> str:
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
        speed = f"the paper's {PAPER_BYTES_PER_SECOND:,.0f} bytes/s on {PAPER_GPU}"
        how.append(f"{train_bytes:,.0f} bytes at {speed}")
    cost = runs * min(hours)
    minutes = round(cost * 60)
    if cost < 1 / 60:
        amount = "less than a GPU-minute"
    elif cost < 1:
        amount = f"about {minutes} GPU-minute{'s' if minutes != 1 else ''}"
    else:
        amount = f"about {cost:,.1f} GPU-hours"
    each = f"{runs} runs, each " if runs > 1 else ""
    ends = ", whichever ends first" if len(how) > 1 else ""
    return f"At the full level this training costs {amount} ({each}{' or '.join(how)}{ends})."
