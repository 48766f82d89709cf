"""Which code produced a number: the commit of a notebook's outputs or of shipped weights, checked
against the files that decide the numbers.

A figure is current when it was produced from a clean commit that is HEAD or an ancestor of it,
and no file in DECIDING_FILES has changed since that commit. `tools/check_site.py` applies this
to every chapter's provenance line and to every manifest of `shaq.pretrained`. (Standard
library only, so that tool can load this file without torch.)
"""

import subprocess
from pathlib import Path

# The files whose change can move a trained model's numbers: the models and their building
# blocks, the optimiser, the data, the trainer and its presets, the evaluation, and the device
# and precision choices. A path ending in / is a folder.
DECIDING_FILES = (
    "shaq/byte_lm.py",
    "shaq/models.py",
    "shaq/shatter.py",
    "shaq/nn/",
    "shaq/optim.py",
    "shaq/data.py",
    "shaq/device.py",
    "shaq/evaluate.py",
    "shaq/train.py",
    "shaq/train_checkpoints.py",
    "shaq/train_config.py",
)


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10
    )


def git_revision() -> str | None:
    """Short commit hash of the checkout that holds the shaq package, ``+`` if the package has
    uncommitted changes; None when shaq is not in a git checkout (a wheel) or git is missing."""
    folder = Path(__file__).parent
    try:
        head = _git(folder, "rev-parse", "--short", "HEAD")
        dirty = _git(folder, "status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode or dirty.returncode or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def stale(revision: str, root: str | Path) -> str | None:
    """Why numbers produced by `revision` (a commit hash, ``+`` if it was dirty) no longer stand
    for the code at HEAD of the repository at `root`, or None when they do."""
    if revision.endswith("+"):
        return f"{revision} had uncommitted changes: regenerate from a clean commit"
    root = Path(root)
    if _git(root, "cat-file", "-e", f"{revision}^{{commit}}").returncode:
        return f"{revision} is no commit of this repository"
    if _git(root, "merge-base", "--is-ancestor", revision, "HEAD").returncode:
        return f"{revision} is not an ancestor of HEAD"
    last = _git(root, "log", "-1", "--format=%h", "HEAD", "--", *DECIDING_FILES).stdout.strip()
    if last and _git(root, "merge-base", "--is-ancestor", last, revision).returncode:
        return (
            f"{revision} is older than {last}, the last change to the files that decide the "
            f"numbers ({', '.join(DECIDING_FILES)}): regenerate"
        )
    return None
