"""Checkpoints: everything a run needs to resume exactly, written so that a crash never costs one.

A checkpoint is a plain dict saved with `torch.save`. It holds only dicts, lists, tensors,
numbers and strings, so `torch.load(weights_only=True)` reads it and loading never runs
pickled code. Its keys:

    format, format_version, shaq_version    what wrote it (checked on load)
    model_name, model_config, train_config  the run's definition (the configs as dicts)
    model, optimizer, scheduler, scaler     state dicts
    rng, data_rng                           RNG states: per process (python, torch, device) and
                                            the generator that draws variable segment lengths
    state, world_size                       the carried State (of the whole batch) and the processes
    step, epoch, cursor, bytes, ...         where the run stands: the fields of `Progress`

The file is the `torch.save` bytes (a zip archive) followed by a fixed 89-byte trailer: the
marker "\nshaq-checkpoint sha256 ", the SHA-256 of all the bytes before the trailer in hex, and
a newline. Zip readers find their directory from the end of the file and step over the
trailer, so `torch.load` still reads the file as it is. `load_checkpoint` verifies the
checksum before it unpickles anything: a single damaged byte anywhere (a disk or copy fault)
is a CheckpointError that names the file and the run's other checkpoint, rather than wrong
weights or optimizer moments that load silently. (torch.load ignores the CRC-32s of the zip's
records: a format 1 file damaged anywhere in its tensors loads without a murmur. So they are
left out, which pays for the SHA-256.) Format 1 files, which have no trailer, still load,
with a warning.

Saving is crash-safe: the bytes go to a temporary file in the same folder, are flushed and
fsynced, then `os.replace` swaps the file in (atomic on POSIX and Windows) and the folder is
fsynced so the rename itself survives a power cut. A crash at any point leaves either the
previous checkpoint or the new one, never a mixture; a failed write (a full disk, no
permission) is a CheckpointError naming the path and the system's error, and leaves the
previous checkpoint as it was.
"""

import contextlib
import hashlib
import os
import random
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

import shaq
from shaq.byte_lm import ModelConfig, State
from shaq.models import build_model, config_from_dict, model_class

FORMAT = "shaq-checkpoint"
# Bump when the layout above changes; loading refuses any other version instead of guessing.
FORMAT_VERSION = 2
# The format before checksums (no trailer), still read, with a warning that damage goes unseen.
UNCHECKED_VERSION = 1

_TRAILER_MARK = b"\nshaq-checkpoint sha256 "
_TRAILER_SIZE = len(_TRAILER_MARK) + 64 + 1  # marker, hex digest, newline


@dataclass
class Progress:
    """Where a run stands between two steps: the counters a checkpoint saves and a resume
    restores."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0  # the next input column of the training rows
    bytes: int = 0  # training bytes read, over all processes
    elapsed: float = 0.0  # wall-clock seconds of the run, validations included
    train_seconds: float = 0.0  # seconds of training steps alone
    best_valid_bpb: float | None = None
    best_step: int = 0
    nonfinite_steps: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "Progress":
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


KEYS = (
    "model_name",
    "model_config",
    "train_config",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "data_rng",
    "state",
    "world_size",
    *(f.name for f in fields(Progress)),
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, from another format version, or does not fit the model."""


def save_checkpoint(payload: dict, path: str | os.PathLike) -> None:
    """Write `payload` (the keys above, minus the format ones, which are added) to `path`
    atomically, with its checksum.

    Raises CheckpointError naming `path` and the system's error when the file cannot be written
    (a full disk, no permission); the previous file at `path` is then untouched.
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shaq_version": shaq.__version__,
        **payload,
    }
    try:
        # Same folder as the target: os.replace is only atomic within one filesystem.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as file:
            with _without_zip_crcs():
                torch.save(payload, file)
            file.flush()
            digest = _hash_while_syncing(file, tmp)
            file.write(_TRAILER_MARK + digest.encode() + b"\n")
            file.flush()
            os.fsync(file.fileno())  # the trailer alone: the bytes before it are on disk already
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _write_error(path: Path, err: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write the checkpoint {path}: {err}. The previous {path.name} there, if any, is "
        "untouched; free disk space or fix the folder's permissions, then save again"
    )


@contextlib.contextmanager
def _without_zip_crcs():
    """torch.save without a CRC-32 of every record of its zip archive (PyTorch >= 2.6 can leave
    them out). torch.load never checks them and the SHA-256 covers every byte; they took a third
    of torch.save's time at paper size, which pays for the SHA-256."""
    crc32 = getattr(torch.serialization, "get_crc32_options", None)
    if crc32 is None:
        yield
        return
    previous = crc32()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def _hash_while_syncing(file: BinaryIO, name: str) -> str:
    """The SHA-256 of all that `file` (open as `name`) holds, hashed on a second thread while this
    one waits for fsync to put the bytes on disk.

    The hash reads the bytes back from the page cache and the wait is for the disk, so the two
    overlap even on a busy CPU; hashing in line, as torch.save writes, was measured slower at
    paper size (README, "The command line").
    """
    size = file.tell()

    def hash_file() -> str:
        with open(
            name, "rb"
        ) as reader:  # its own position: `file` stays at the end for the trailer
            return _sha256(reader, size)

    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(hash_file)
        os.fsync(file.fileno())
        return hashing.result()


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable. Windows cannot open folders; its rename is durable
    enough."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(folder: str | os.PathLike) -> None:
    """Delete the temporary files that saves interrupted by a crash left in `folder`."""
    for tmp in Path(folder).glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)


def find_checkpoint(path: str | os.PathLike, prefer: str = "best.pt") -> Path:
    """`path` itself if it is a file; for a run folder its `prefer` file, else its other one."""
    path = Path(path)
    if path.is_dir():
        for name in (prefer, "last.pt" if prefer == "best.pt" else "best.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"{path} holds no best.pt or last.pt; is it a run folder of `python -m shaq train`?"
        )
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read, verify and check a checkpoint (tensors on the CPU). Raises CheckpointError naming
    what is wrong.

    The checksum is verified before anything is unpickled. A format 1 file, which has none,
    loads with a warning.
    """
    path = find_checkpoint(path)
    try:
        # One open file for the check and the load: a save that replaces the file in between
        # (a run writing best.pt while it is evaluated) cannot pair one file's checksum with
        # another's bytes.
        with open(path, "rb") as file:
            trailer = _read_trailer(file)
            if trailer is not None:
                digest, size = trailer
                if _sha256(file, size) != digest:
                    raise CheckpointError(
                        f"{path} is damaged (checksum mismatch): its bytes are not those that were "
                        f"saved, whether a disk, a copy or an upload changed them; {_instead(path)}"
                    )
            file.seek(0)
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # a damaged file fails in many ways: zip, unpickling, EOF, ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} cannot be read ({first_line}): it is truncated or damaged, or holds more than "
            f"tensors and plain data; {_instead(path)}"
        ) from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shaq checkpoint (no '{FORMAT}' marker)")
    version = checkpoint.get("format_version")
    if version not in (FORMAT_VERSION, UNCHECKED_VERSION):
        raise CheckpointError(
            f"{path} has checkpoint format {version} (written by shaq "
            f"{checkpoint.get('shaq_version', '?')}); this shaq {shaq.__version__} reads only "
            f"formats {UNCHECKED_VERSION} and {FORMAT_VERSION}: use the shaq version that wrote it"
        )
    if trailer is None and version != UNCHECKED_VERSION:
        raise CheckpointError(
            f"{path} is damaged: the checksum that ends a format {version} file is missing or "
            f"garbled; {_instead(path)}"
        )
    if trailer is None:
        warnings.warn(
            f"{path} has no checksum (checkpoint format {version}, from shaq "
            f"{checkpoint.get('shaq_version', '?')}), so damage to it cannot be detected; a run "
            "resumed from it saves checksummed checkpoints",
            stacklevel=2,
        )
    missing = [key for key in KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(missing)}")
    return checkpoint


def _read_trailer(file: BinaryIO) -> tuple[str, int] | None:
    """(hex digest, size of the bytes it covers) from the trailer of an open checkpoint; None
    without one."""
    size = os.fstat(file.fileno()).st_size
    if size <= _TRAILER_SIZE:
        return None
    file.seek(size - _TRAILER_SIZE)
    trailer = file.read(_TRAILER_SIZE)
    digest = trailer[len(_TRAILER_MARK) : -1]
    if (
        not trailer.startswith(_TRAILER_MARK)
        or not trailer.endswith(b"\n")
        or not all(c in b"0123456789abcdef" for c in digest)
    ):
        return None
    return digest.decode(), size - _TRAILER_SIZE


def _sha256(file: BinaryIO, size: int) -> str:
    """The SHA-256 in hex of the first `size` bytes of `file`, read from its start."""
    digest, chunk = hashlib.sha256(), memoryview(bytearray(16 << 20))
    file.seek(0)
    while size > 0:
        n = file.readinto(chunk[: min(size, len(chunk))])
        if not n:
            break  # the file is shorter than its trailer says: the digest will not match
        digest.update(chunk[:n])
        size -= n
    return digest.hexdigest()


def _instead(path: Path) -> str:
    """What to use instead of the unreadable checkpoint `path`: the run's other one when it
    exists."""
    other = {"best.pt": "last.pt", "last.pt": "best.pt"}.get(path.name)
    if other is not None and (path.parent / other).is_file():
        return f"try the run's other checkpoint, {path.parent / other}, or retrain"
    return "use a good copy of it or the run's other checkpoint (best.pt / last.pt), or retrain"


def saved_model_config(checkpoint: dict) -> ModelConfig:
    """The config of the checkpoint's model; CheckpointError unless this shaq can build the model
    from it."""
    try:
        config = config_from_dict(checkpoint["model_name"], checkpoint["model_config"])
        model_class(checkpoint["model_name"]).check_config(config)
        return config
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the checkpoint's model description is invalid: {err}") from err


def check_model(checkpoint: dict, model_name: str, model_config: ModelConfig) -> None:
    """Raise CheckpointError unless the checkpoint holds a `model_name` model of this config."""
    problems = []
    if checkpoint["model_name"] != model_name:
        problems.append(f"model {checkpoint['model_name']!r} (checkpoint) vs {model_name!r}")
    ours, saved = model_config.to_dict(), saved_model_config(checkpoint).to_dict()
    for key in sorted(set(ours) | set(saved)):
        theirs = saved.get(key, "<absent>")
        if theirs != ours.get(key, "<absent>"):
            problems.append(f"{key} {theirs!r} (checkpoint) vs {ours.get(key, '<absent>')!r}")
    if problems:
        raise CheckpointError("the checkpoint is of another model: " + "; ".join(problems))


def load_weights(model: nn.Module, checkpoint: dict, strict: bool = True) -> None:
    """Copy the checkpoint's weights into `model`; with `strict`, every tensor must match by name
    and shape."""
    try:
        model.load_state_dict(checkpoint["model"], strict=strict)
    except RuntimeError as err:
        detail = " ".join(str(err).split())  # torch's message spans many indented lines
        raise CheckpointError(f"the checkpoint's weights do not fit the model: {detail}") from err


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict]:
    """Build the model a checkpoint describes, load its weights, and return it in eval mode.

    `path` is a .pt file or a run folder (its best.pt). Returns (model, checkpoint) so callers
    can read the configs, e.g. checkpoint["train_config"]["seq_len"].
    """
    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint["model_name"], saved_model_config(checkpoint))
    load_weights(model, checkpoint)
    return model.to(device).eval(), checkpoint


# ----------------------------------------------------------------------------- carried state


def state_to_dict(state: State | None) -> dict | None:
    """A State as plain dicts of tensors (see State.to_dict). Copies, because the tensors are
    often views of a larger one (the memory is the tail of [memory; segment]) and torch.save
    would store all of it."""
    return None if state is None else state.map(torch.clone).to_dict()


def state_from_dict(saved: dict | None, device: torch.device) -> State | None:
    """The State that `state_to_dict` saved, on `device`."""
    return None if saved is None else State.from_dict(saved).map(lambda t: t.to(device))


# ----------------------------------------------------------------------------- random numbers


def rng_state(device: torch.device) -> dict:
    """This process's global RNG states: Python's, torch's CPU one, and the GPU's (CUDA or MPS)."""
    version, internal, gauss = random.getstate()
    accelerator = None
    if device.type == "cuda":
        accelerator = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        accelerator = torch.mps.get_rng_state()
    return {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
        "device_type": device.type,
        "device": accelerator,
    }


def set_rng_state(saved: dict, device: torch.device) -> None:
    """Restore what `rng_state` returned; the GPU part only on the same kind of device."""
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(saved["torch"])
    if saved["device_type"] != device.type:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved["device"], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(saved["device"])
