"""Checkpoints: everything a run needs to resume exactly, written so that a crash never costs one.

A checkpoint is a plain dict saved with `torch.save`. It holds only dicts, lists, tensors,
numbers and strings, so `torch.load(weights_only=True)` reads it and loading never runs
pickled code. Its keys:

    format, format_version, shaq_version    what wrote it (checked on load)
    model_name, model_config, train_config  the run's definition (SHARNNConfig / TrainConfig dicts)
    model, optimizer, scheduler, scaler     state dicts
    rng, data_rng                           RNG states: per process (python, torch, device) and
                                            the generator that draws variable segment lengths
    cursor, epoch, state                    where the training data is, and the carried State
    step, bytes, elapsed, train_seconds     counters
    best_valid_bpb, best_step, nonfinite_steps, world_size

Saving is crash-safe: the bytes go to a temporary file in the same folder, are flushed and
fsynced, then `os.replace` swaps the file in (atomic on POSIX and Windows) and the folder is
fsynced so the rename itself survives a power cut. A crash at any point leaves either the
previous checkpoint or the new one, never a mixture.
"""

import os
import random
import tempfile
from pathlib import Path

import torch
from torch import nn

import shaq
from shaq.models import LSTMState, QRNNState, SHARNNConfig, State, build_model

FORMAT = "shaq-checkpoint"
# Bump when the layout above changes; loading refuses any other version instead of guessing.
FORMAT_VERSION = 1

KEYS = (
    "model_name", "model_config", "train_config", "model", "optimizer", "scheduler", "scaler",
    "rng", "data_rng", "cursor", "epoch", "state", "step", "bytes", "elapsed", "train_seconds",
    "best_valid_bpb", "best_step", "nonfinite_steps", "world_size",
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, from another format version, or does not fit the model."""


def save_checkpoint(payload: dict, path: str | os.PathLike) -> None:
    """Write `payload` (the keys above, minus the format ones, which are added) to `path` atomically."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "shaq_version": shaq.__version__, **payload}
    # Same folder as the target: os.replace is only atomic within one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable. Windows cannot open folders; its rename is durable enough."""
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
        raise CheckpointError(f"{path} holds no best.pt or last.pt; is it a run folder of `python -m shaq train`?")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and check a checkpoint (tensors on the CPU). Raises CheckpointError naming what is wrong."""
    path = find_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file fails in many ways: zip, unpickling, EOF, ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} cannot be read ({first_line}): it is truncated or damaged, or holds more than "
            "tensors and plain data; use the run's other checkpoint (best.pt / last.pt) or retrain") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shaq checkpoint (no '{FORMAT}' marker)")
    version = checkpoint.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version} (written by shaq {checkpoint.get('shaq_version', '?')}); "
            f"this shaq {shaq.__version__} reads only format {FORMAT_VERSION}: use the shaq version that wrote it")
    missing = [key for key in KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(missing)}")
    return checkpoint


def check_model(checkpoint: dict, model_name: str, model_config: SHARNNConfig) -> None:
    """Raise CheckpointError unless the checkpoint holds a `model_name` model of this config."""
    problems = []
    if checkpoint["model_name"] != model_name:
        problems.append(f"model {checkpoint['model_name']!r} (checkpoint) vs {model_name!r}")
    ours = model_config.to_dict()
    for key in sorted(set(ours) | set(checkpoint["model_config"])):
        theirs = checkpoint["model_config"].get(key, "<absent>")
        if theirs != ours.get(key, "<absent>"):
            problems.append(f"{key} {theirs!r} (checkpoint) vs {ours.get(key, '<absent>')!r}")
    if problems:
        raise CheckpointError("the checkpoint is of another model: " + "; ".join(problems))


def load_weights(model: nn.Module, checkpoint: dict, strict: bool = True) -> None:
    """Copy the checkpoint's weights into `model`; with `strict`, every tensor must match by name and shape."""
    try:
        model.load_state_dict(checkpoint["model"], strict=strict)
    except RuntimeError as err:
        detail = " ".join(str(err).split())  # torch's message spans many indented lines
        raise CheckpointError(f"the checkpoint's weights do not fit the model: {detail}") from err


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Build the model a checkpoint describes, load its weights, and return it in eval mode.

    `path` is a .pt file or a run folder (its best.pt). Returns (model, checkpoint) so callers
    can read the configs, e.g. checkpoint["train_config"]["seq_len"].
    """
    checkpoint = load_checkpoint(path)
    try:
        config = SHARNNConfig(**checkpoint["model_config"])
        model = build_model(checkpoint["model_name"], config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the checkpoint's model description is invalid: {err}") from err
    load_weights(model, checkpoint)
    return model.to(device).eval(), checkpoint


# ----------------------------------------------------------------------------- carried state


_LAYER_STATES = {kind.__name__: kind for kind in (LSTMState, QRNNState)}


def state_to_dict(state: State | None) -> dict | None:
    """A State as plain dicts of tensors, e.g. rnn [{"kind": "LSTMState", "h": .., "c": ..}].
    Copies, because the tensors are often views of a larger one (the memory is the tail of
    [memory; segment]) and torch.save would store all of it."""
    if state is None:
        return None
    return {
        "rnn": [{"kind": type(layer).__name__, **{k: t.clone() for k, t in layer._asdict().items()}}
                for layer in state.rnn],
        "memory": [m.clone() if m is not None else None for m in state.memory],
    }


def state_from_dict(saved: dict | None, device: torch.device) -> State | None:
    """The State that `state_to_dict` saved, on `device`."""
    if saved is None:
        return None
    rnn = []
    for layer in saved["rnn"]:
        kind = _LAYER_STATES[layer["kind"]]
        rnn.append(kind(**{name: layer[name].to(device) for name in kind._fields}))
    return State(rnn=rnn, memory=[m.to(device) if m is not None else None for m in saved["memory"]])


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
