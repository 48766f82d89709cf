"""One writer per run folder: an OS-level lock that a second training process runs into at once.

Two processes writing one run folder (a second `--out DIR` or a `--resume DIR` while DIR's run
goes on) would interleave their metrics and overwrite each other's checkpoints. `RunLock`
takes an exclusive `flock` on RUN/.lock and holds it while the run writes; the next process
that asks is refused with an error naming the holder (pid, host, command line, start time),
which the lock file holds for that purpose.

The kernel drops a flock when the process that holds it ends, however it ends, so a crashed
run never leaves a stale lock behind, only a stale file, which the next run takes over.
Released, the lock deletes its file. Platforms without `fcntl` (Windows) get no lock.
"""

import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path
from typing import TextIO

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """Another process (or another open Trainer of this process) is writing the run folder."""


class RunLock:
    """The exclusive hold of one process on the run folder `folder` (which must exist) until
    `release()`, or until the RunLock is garbage-collected or the interpreter exits.

    Raises RunLockError at once, without waiting, when another holds it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._release = lambda: None
        if fcntl is None:
            return
        while True:
            file = open(
                self.path, "a+"
            )  # creates it if need be; reads from anywhere, writes at the end
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read()
                file.close()
                raise RunLockError(_busy_message(self.path.parent, holder)) from None
            # A holder that released between our open and our flock deleted the file first: then
            # this lock is on a file that nobody else will open, so take the path's new one.
            try:
                current = os.path.samestat(os.fstat(file.fileno()), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                break
            file.close()
        file.truncate(0)
        file.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": " ".join(sys.argv),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            )
        )
        file.flush()
        # A finalizer, so that a lock nobody released (a Trainer built and dropped without fit)
        # is released all the same, file and all, when it is collected or the interpreter exits.
        self._release = weakref.finalize(self, _let_go, self.path, file)

    def release(self) -> None:
        """Let the folder go; a no-op when already released."""
        self._release()


def _let_go(path: Path, file: TextIO) -> None:
    """Delete the lock file, then drop the lock: a process that opened the old file and waits
    for its lock then finds the file gone, and takes a new one."""
    path.unlink(missing_ok=True)
    file.close()


def check_not_locked(folder: str | os.PathLike) -> None:
    """Raise RunLockError now if a process holds the run folder `folder` (when it exists); hold
    nothing.

    For the checks a process makes before it has work to lose (loading data, a checkpoint);
    the RunLock it takes to write is what keeps the others out.
    """
    if Path(folder).is_dir():
        RunLock(folder).release()


def _busy_message(folder: Path, holder: str) -> str:
    """Who holds `folder`, from the lock file's contents, and what to do about it."""
    try:
        info = json.loads(holder)
        pid, host, command, since = info["pid"], info["host"], info["command"], info["since"]
    except (ValueError, KeyError, TypeError):  # the holder is between its flock and its write
        return (
            f"{folder} is being written by another process (it has not said which yet); one "
            "process at a time may write a run folder: wait for it to finish or choose "
            "another --out"
        )
    if pid == os.getpid() and host == socket.gethostname():
        return (
            f"{folder} is held by another Trainer in this process (pid {pid}): let its fit() "
            "finish or call its close() first"
        )
    return (
        f"{folder} is being written by process {pid} on {host} since {since} ({command}); one "
        "process at a time may write a run folder: wait for it to finish, stop it (kill -TERM "
        f"{pid} saves last.pt and exits), or choose another --out"
    )
