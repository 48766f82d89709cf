"""A run's folder from its start to its end, and the signals that stop a run.

A run folder holds config.json, metrics.jsonl (one line per step), last.pt, best.pt and
summary.json. One process at a time writes it: `open_run_folder` takes its `shaq.runlock.RunLock`,
which the run holds until it ends. Before that, while there is no work to lose, `check_run_folder`
refuses a folder that another process writes, or a new run into a folder that holds one.

A resumed run opens its folder again: config.json keeps where the run's first session started,
and metrics.jsonl loses the lines of steps that a crash logged but last.pt does not hold.

`StopSignals` turns SIGINT (Ctrl-C, Jupyter's stop button) and SIGTERM (`kill`, a job
scheduler) into a request to stop after the step in progress, so that a stop costs no step; the
trainer then saves last.pt and raises `TrainingInterrupted`.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

from shaq.checkpoint import remove_temp_files
from shaq.runlock import RunLock, check_not_locked


def check_run_folder(folder: str | os.PathLike, resuming: bool) -> None:
    """Raise now, before any work, if `folder` is being written by another process (RunLockError)
    or, for a new run (not `resuming`), holds a run already (ValueError)."""
    check_not_locked(folder)
    _refuse_existing_run(Path(folder), resuming)


def new_run_path(model: str) -> Path:
    """A folder name for a new run of `model` that is not taken: runs/<model>-<date>-<time>[-n]."""
    stem = Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def open_run_folder(path: Path, record: dict, resume_step: int | None) -> RunLock:
    """Create `path`, take its lock and write `record` as its config.json; return the lock, held
    until released.

    A new run (`resume_step` None) may not go into a folder that holds one. A resumed run keeps
    the `started_from` that its first session recorded, and its log is cut back to `resume_step`.
    """
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path)
    try:
        # Checked again under the lock: a run may have ended there since the check before any work.
        _refuse_existing_run(path, resume_step is not None)
        remove_temp_files(path)  # under the lock: no other process is saving there
        if resume_step is not None:
            record = {**record, "started_from": _recorded_start(path)}
        (path / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        if resume_step is not None:
            _trim_log(path / "metrics.jsonl", resume_step)
    except BaseException:
        lock.release()
        raise
    return lock


def _refuse_existing_run(path: Path, resuming: bool) -> None:
    """A new run may not write into a folder that holds one."""
    if not resuming and (path / "last.pt").exists():
        raise ValueError(
            f"{path} already holds a run: continue it with --resume {path} or choose another --out"
        )


def _recorded_start(run_dir: Path) -> dict | None:
    """What an earlier config.json of this run folder recorded under started_from (a resumed run
    keeps the record of where its first session started)."""
    try:
        return json.loads((run_dir / "config.json").read_text()).get("started_from")
    except (OSError, ValueError):
        return None


def _trim_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after `step` (a crashed run logged steps its last.pt does not
    hold), and a last line that the crash cut short."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
        if logged <= step and line.endswith("\n"):
            kept.append(line)
    if len(kept) != len(lines):
        path.write_text("".join(kept))


class TrainingInterrupted(KeyboardInterrupt):
    """`fit()` stopped on SIGINT or SIGTERM after finishing its step and saving last.pt.

    A KeyboardInterrupt, so that a notebook cell (or a script that does not catch it) stops as
    on any interrupt. `signum` is the signal, `step` the step saved, `run_dir` the run; the
    message says how to continue.
    """

    def __init__(self, signum: int, step: int, run_dir: Path):
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step:,}, saved in "
            f"{run_dir / 'last.pt'}; continue with: python -m shaq train --resume {run_dir}"
        )
        self.signum, self.step, self.run_dir = signum, step, run_dir


class StopSignals:
    """Between `catch()` and `restore()`, SIGINT and SIGTERM ask for a stop after the step in
    progress instead of stopping at once: `caught` is the first of them (None before one came).
    A second one meanwhile is ignored with a notice, as last.pt is being saved.

    Only the main thread may set handlers (a run in another thread keeps the usual ones), and a
    signal that was ignored (SIGINT in a job a shell started with &) stays ignored.
    """

    def __init__(self):
        self.caught: int | None = None
        self._handlers: dict[int, object] = {}  # the handlers the signals had before catch()

    def catch(self) -> None:
        """Take over SIGINT and SIGTERM, keeping the handlers they had."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) != signal.SIG_IGN:
                self._handlers[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        """Give SIGINT and SIGTERM back the handlers that `catch` found."""
        for signum, previous in self._handlers.items():
            # None: a handler set outside Python, which cannot be put back; the default is the
            # next best.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._handlers = {}

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.caught is None:
            self.caught = signum
            message = (
                f"\n{signal.Signals(signum).name}: stopping after this step; saving last.pt first\n"
            )
        else:
            message = (
                "\nalready stopping: last.pt is being saved; wait for it (SIGKILL would stop at "
                "once, losing the steps since the last save)\n"
            )
        # os.write, not print: the signal may have come in the middle of a print (the progress
        # bar's).
        os.write(2, message.encode())
