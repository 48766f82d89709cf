"""Lossless compression with a shaq model: bits per byte become bytes.

    blob = shaq.compress(model, data)        # bytes -> bytes, about data's cross-entropy long
    data = shaq.decompress(model, blob)      # exactly the bytes that went in, or a CodecError

The model predicts every byte from the bytes before it, and the range coder of `shaq.coding`
writes the byte in about -log2(p) bits: a file shrinks to about its cross-entropy under the
model (`cross_entropy_bits`). The decoder runs the same model over the bytes it has decoded so
far, gets the same probabilities, and reads every byte back.

The same probabilities, bit for bit: the coder's tables come from the model's floats, and a
table one count off decodes garbage from there on. So both sides call the model in exactly
the same sequence of operations: one `model(x [K, 1], state)` per position (the decoder can do
no better: it knows a byte only once it has decoded it), the same batch, in eval mode under
inference_mode with autocast off. The floats then still depend on the kernels that compute
them: the weights' dtype, the device (and the CPU's instruction set), torch.get_num_threads(),
the shaq and torch versions and shaq's speed switches (`shaq.nn.switches`). The header records
them all, with the model's identity (its class, config and a SHA-256 of its weights), and
decompress refuses, naming what differs, before it decodes a byte. A CRC-32 of the original
bytes, checked after decoding, catches whatever else could differ: decompress never returns
wrong bytes.

Lanes. Much of a model call's time does not grow with its batch (reading the weights, starting
every op), so the data is cut into K contiguous pieces, the lanes, as equal as can be (the
longer ones first), run as one batch: a call per position codes K bytes. Every lane has its own
state and its own coded stream. Each lane starts from a fresh state (state=None) with a zero
byte as its only context (`START_BYTE`), so its first bytes cost more than they would in the
middle of the text: more lanes run faster and compress a little worse. Where lanes differ in
length, the shorter ones' last position is run on a padding byte and not coded.

The file, every number big-endian::

    b"SHAQZ"               magic
    1 byte                 format version (FORMAT_VERSION)
    4 bytes                H, the header's length
    H bytes                the header: JSON (see `_header`)
    4 bytes                CRC-32 of all the bytes before it
    the payload            the lanes' coded streams one after another (method "model"), or the
                           data itself (method "stored") when that makes the shorter file

so a file is never longer than its data plus the header of a stored file (`header_size`).
"""

import contextlib
import dataclasses
import hashlib
import itertools
import json
import zlib
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

import shaq
from shaq.coding import TOTAL, RangeDecoder, RangeEncoder, quantize
from shaq.nn import switches

MAGIC = b"SHAQZ"
# Bump when the layout or the coding changes; decompress refuses versions it does not know.
FORMAT_VERSION = 1
START_BYTE = 0  # what every lane's first byte is predicted after
# Default lanes: DEFAULT_LANES, fewer for short data so that every lane gets MIN_LANE_BYTES (a
# lane's cold start then costs little of what it codes). Beyond some lanes a step's time grows in
# proportion to them, as every lane's attention memory is read at every step: more stop paying.
DEFAULT_LANES = 16
MIN_LANE_BYTES = 4096

_PREFIX = len(MAGIC) + 1 + 4  # magic, version, header length
_CRC = 4


class CodecError(ValueError):
    """A compressed file that `decompress` refuses; the subclasses say why."""


class DamagedFileError(CodecError):
    """Not a shaq compressed file, or truncated, or some of its bytes changed."""


class FormatVersionError(CodecError):
    """Written in a format version this shaq does not read."""


class ModelMismatchError(CodecError):
    """Compressed with another model: another class, config or weights."""


class SetupMismatchError(CodecError):
    """Compressed where the arithmetic differs: dtype, device, threads, versions or switches."""


class VerificationError(CodecError):
    """The decoded bytes are not the original ones: the arithmetic differed all the same."""


# ----------------------------------------------------------------------------- the public functions


def compress(
    model: nn.Module, data: bytes, *, lanes: int | None = None, progress: bool = False
) -> bytes:
    """Compress `data` losslessly with `model`; `decompress` with the same model reverses it.

    Args:
        model: a shaq model (SHARNN, SHAQ, LSTMLM, ...); it runs in eval mode for the call and
            its mode is restored afterwards.
        data: the bytes to compress.
        lanes: how many pieces of the data run side by side (see the module docstring); None
            picks `default_lanes(len(data))`. Never more than there are bytes.
        progress: show a progress bar with bytes per second.

    Returns:
        The compressed file. When the coded streams would not make it shorter than storing the
        data itself, the data is stored: a file is never longer than the data plus the header
        of a stored file (`header_size`).
    """
    data = _as_bytes(data)
    lengths = _lane_lengths(len(data), _lane_count(len(data), lanes))
    encoders = [RangeEncoder() for _ in lengths]
    with _coding_mode(model), _progress_bar(len(data), "compress", progress) as bar:
        for probs, current, running in _predictions(model, data, lengths):
            table = quantize(probs)  # [K, 257]
            c_low = table.gather(1, current[:, None]).squeeze(1).tolist()
            c_high = table.gather(1, current[:, None] + 1).squeeze(1).tolist()
            for i in range(running):
                encoders[i].encode(c_low[i], c_high[i], TOTAL)
            bar.update(running)
    streams = [encoder.finish() for encoder in encoders]
    coded = _pack(_header(model, data, "model", streams), b"".join(streams))
    stored = _pack(_header(model, data, "stored", []), data)
    return coded if len(coded) < len(stored) else stored


def decompress(model: nn.Module, blob: bytes, *, progress: bool = False) -> bytes:
    """The data that `compress(model, data)` turned into `blob`.

    Checks the file, the model and the setup before decoding; raises DamagedFileError (not a
    compressed file, truncated, a byte changed), FormatVersionError (a format this shaq does
    not read), ModelMismatchError (another class, config or weights), SetupMismatchError
    (another dtype, device, thread count, shaq or torch version, or switches) and, after
    decoding, VerificationError if the bytes are not the original ones. A stored file needs no
    model arithmetic: any model reads it back.
    """
    header, payload = read_file(blob)
    if header["method"] == "stored":
        return payload  # read_file checked its CRC-32
    _check_model(header["model"], _model_identity(model))
    _check_setup(header["setup"], _setup(model))
    data = _decode(model, header, payload, progress)
    if zlib.crc32(data) != header["crc32"]:
        raise VerificationError(f"the decoded bytes fail their CRC-32: {_DIVERGED}")
    return data


def cross_entropy_bits(model: nn.Module, data: bytes, lanes: int | None = None) -> float:
    """The code length in bits that `model` gives `data` in `compress`'s lanes and steps: the sum
    over the bytes of -log2 p(byte | the bytes before it in its lane). compress's coded streams
    come within a fraction of a percent of it, plus a byte or so per lane."""
    data = _as_bytes(data)
    lengths = _lane_lengths(len(data), _lane_count(len(data), lanes))
    bits = 0.0
    with _coding_mode(model):
        for probs, current, running in _predictions(model, data, lengths):
            bits -= torch.log2(probs[:running].gather(1, current[:running, None])).sum().item()
    return bits


def default_lanes(n_bytes: int) -> int:
    """The lanes `compress` uses for `n_bytes` when not told: DEFAULT_LANES, fewer for short data
    so that every lane codes at least MIN_LANE_BYTES (one lane below that)."""
    return max(1, min(DEFAULT_LANES, n_bytes // MIN_LANE_BYTES))


def read_file(blob: bytes) -> tuple[dict, bytes]:
    """(header, payload) of a compressed file, checked for damage (see the module docstring);
    raises DamagedFileError or FormatVersionError."""
    blob = _as_bytes(blob)
    if blob[: len(MAGIC)] != MAGIC[: len(blob)]:
        raise DamagedFileError(f"not a shaq compressed file: it does not start with {MAGIC!r}")
    if len(blob) < _PREFIX:
        raise DamagedFileError(
            f"the file is truncated: it has {len(blob)} bytes, fewer than "
            f"the {_PREFIX} that start every compressed file"
        )
    version = blob[len(MAGIC)]
    if version != FORMAT_VERSION:
        newer = "a newer" if version > FORMAT_VERSION else "an unknown"
        raise FormatVersionError(
            f"the file is in {newer} format version {version}; this shaq {shaq.__version__} reads "
            f"version {FORMAT_VERSION}: decompress it with the shaq that wrote it"
        )
    start = header_size(blob)
    if len(blob) < start:
        raise DamagedFileError(
            f"the file is truncated: its header ends at byte {start}, the file has {len(blob)}"
        )
    if zlib.crc32(blob[: start - _CRC]) != int.from_bytes(blob[start - _CRC : start], "big"):
        raise DamagedFileError("the file's header is damaged (CRC-32 mismatch): bytes changed")
    header = json.loads(blob[_PREFIX : start - _CRC])
    payload = blob[start:]
    expected = sum(header["streams"]) if header["method"] == "model" else header["length"]
    if len(payload) != expected:
        what = (
            "truncated"
            if len(payload) < expected
            else "longer than it should be (damaged, or joined to more bytes)"
        )
        raise DamagedFileError(
            f"the file is {what}: its payload is {len(payload)} bytes, the header says {expected}"
        )
    if zlib.crc32(payload) != header["payload_crc32"]:
        raise DamagedFileError("the file's payload is damaged (CRC-32 mismatch): bytes changed")
    return header, payload


def header_size(blob: bytes) -> int:
    """How many bytes of the compressed file `blob` come before the payload."""
    return _PREFIX + int.from_bytes(blob[len(MAGIC) + 1 : _PREFIX], "big") + _CRC


# ----------------------------------------------------------------------------- stepping the model

_DIVERGED = (
    "although the file is intact and the model and setup match its header, the model "
    "computed other probabilities than when it compressed (a difference in the arithmetic "
    "that the header does not record); decompress where the file was compressed"
)


@contextlib.contextmanager
def _coding_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (restored afterwards), under inference_mode, without autocast:
    no dropout, and the arithmetic that the header records. Linear layers run on torch's own
    matmul, whatever `switches.use_onednn` says: stepped one byte at a time, a call is too small
    for oneDNN's faster kernels to repay its fixed cost per call."""
    was_training, onednn = model.training, switches.use_onednn
    model.eval()
    switches.use_onednn = False
    try:
        device_type = next(model.parameters()).device.type
        with torch.inference_mode(), torch.autocast(device_type, enabled=False):
            yield
    finally:
        switches.use_onednn = onednn
        model.train(was_training)


def _progress_bar(n_bytes: int, what: str, show: bool) -> tqdm:
    return tqdm(total=n_bytes, unit="B", unit_scale=True, desc=what, disable=not show)


def _step(model: nn.Module, previous: torch.Tensor, state):
    """One position of every lane: the previous bytes [K] -> (the probabilities [K, 256] (float64)
    of the next bytes, the state after)."""
    out = model(previous[:, None], state)  # logits [K, 1, 256]
    return torch.softmax(out.logits[:, -1].double(), dim=-1), out.state


def _running(lengths: list[int], t: int) -> int:
    """How many lanes have a byte at position t: the first ones, as the longer lanes come first."""
    return sum(length > t for length in lengths)


def _predictions(
    model: nn.Module, data: bytes, lengths: list[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """For every position t of the lanes of `data`: the probabilities [K, 256] of every lane's
    byte t, those bytes [K] (padding where a lane has ended), and `_running(lengths, t)`."""
    device = next(model.parameters()).device
    lanes = _lanes_tensor(data, lengths).to(device)  # [K, T]
    previous = torch.full((len(lengths),), START_BYTE, dtype=torch.long, device=device)
    state = None
    for t in range(lanes.shape[1]):
        probs, state = _step(model, previous, state)
        yield probs, lanes[:, t], _running(lengths, t)
        previous = lanes[:, t]


def _decode(model: nn.Module, header: dict, payload: bytes, progress: bool) -> bytes:
    """The bytes of a "model" file: its lanes decoded in lockstep, as `compress` coded them."""
    lengths = _lane_lengths(header["length"], len(header["streams"]))
    ends = list(itertools.accumulate(header["streams"]))
    decoders = [
        RangeDecoder(payload[end - size : end])
        for size, end in zip(header["streams"], ends, strict=True)
    ]
    lanes = [bytearray() for _ in lengths]
    device = next(model.parameters()).device
    previous = torch.full((len(lengths),), START_BYTE, dtype=torch.long, device=device)
    state = None
    with _coding_mode(model), _progress_bar(header["length"], "decompress", progress) as bar:
        for t in range(max(lengths, default=0)):
            probs, state = _step(model, previous, state)
            tables = quantize(probs).tolist()  # K lists of 257 cumulative counts
            running = _running(lengths, t)
            try:
                current = [decoders[i].decode(tables[i]) for i in range(running)]
            except ValueError as err:
                raise VerificationError(
                    f"decoding failed at position {t} ({err}): {_DIVERGED}"
                ) from err
            for lane, byte in zip(lanes[:running], current, strict=True):
                lane.append(byte)
            padding = [START_BYTE] * (len(lengths) - running)
            previous = torch.tensor(current + padding, dtype=torch.long, device=device)
            bar.update(running)
    return b"".join(lanes)


# ----------------------------------------------------------------------------- lanes


def _as_bytes(data) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"expected bytes, got {type(data).__name__}; encode text first, "
            "e.g. text.encode('utf-8')"
        )
    return bytes(data)


def _lane_count(n_bytes: int, lanes: int | None) -> int:
    if lanes is None:
        return default_lanes(n_bytes)
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise ValueError(
            f"lanes must be a whole number >= 1 (or None for the default), got {lanes!r}"
        )
    return max(1, min(lanes, n_bytes))


def _lane_lengths(n_bytes: int, lanes: int) -> list[int]:
    """The lengths of `lanes` contiguous pieces of n_bytes, as equal as can be, longer first."""
    return [n_bytes // lanes + (i < n_bytes % lanes) for i in range(lanes)]


def _lanes_tensor(data: bytes, lengths: list[int]) -> torch.Tensor:
    """`data` cut into lanes of `lengths` as rows [K, T] (int64), padded with START_BYTE."""
    lanes = torch.full((len(lengths), max(lengths, default=0)), START_BYTE, dtype=torch.long)
    start = 0
    for i, length in enumerate(lengths):
        if length:  # torch.frombuffer refuses an empty buffer
            piece = torch.frombuffer(bytearray(data[start : start + length]), dtype=torch.uint8)
            lanes[i, :length] = piece
        start += length
    return lanes


# ----------------------------------------------------------------------------- the header


def _header(model: nn.Module, data: bytes, method: str, streams: list[bytes]) -> dict:
    """What decompress checks and decodes with:

    length, crc32       the original data's length and CRC-32
    method              "model" (coded) or "stored" (the data itself)
    streams             the length of every lane's coded stream ([] when stored)
    payload_crc32       CRC-32 of the payload
    model               class, config and weights_sha256: the model's identity
    setup               what changes the model's arithmetic: dtype, device, threads,
                        shaq and torch versions, shaq's switches
    """
    payload = b"".join(streams) if method == "model" else data
    return {
        "length": len(data),
        "crc32": zlib.crc32(data),
        "method": method,
        "streams": [len(stream) for stream in streams],
        "payload_crc32": zlib.crc32(payload),
        "model": _model_identity(model),
        "setup": _setup(model),
    }


def _pack(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    start = MAGIC + bytes([FORMAT_VERSION]) + len(text).to_bytes(4, "big") + text
    return start + zlib.crc32(start).to_bytes(4, "big") + payload


def _model_identity(model: nn.Module) -> dict:
    """The model's class, its config (as JSON gives it back) and a SHA-256 of its weights: every
    tensor of its state_dict in name order, with its name, dtype and shape."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    # As JSON gives it back: tuples as lists, so that a file's config compares equal to it.
    config = json.loads(json.dumps(dataclasses.asdict(model.config)))
    return {"class": type(model).__name__, "config": config, "weights_sha256": digest.hexdigest()}


def _setup(model: nn.Module) -> dict:
    """Everything besides the model that changes the floats it computes."""
    parameter = next(model.parameters())
    device = parameter.device
    if device.type == "cpu":
        # The SIMD instruction set whose kernels torch runs (AVX2, AVX512, ...).
        device_name = f"cpu {torch.backends.cpu.get_cpu_capability()}"
    elif device.type == "cuda":
        device_name = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        device_name = device.type
    return {
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "device": device_name,
        "threads": torch.get_num_threads(),
        "shaq": shaq.__version__,
        "torch": torch.__version__,
        "switches": {  # use_onednn is always off while coding (_coding_mode)
            "use_extension": switches.use_extension,
            "scan_mode": switches.scan_mode,
        },
    }


_SETUP_FIXES = {
    "dtype": "convert the model to that dtype",
    "device": "decompress on that kind of device (and CPU)",
    "threads": "call torch.set_num_threads with that number (or set OMP_NUM_THREADS) first",
    "shaq": "install that shaq version",
    "torch": "install that torch version",
    "switches": "set shaq.nn.switches (or their environment variables) as they were",
}


def _check_model(theirs: dict, ours: dict) -> None:
    problems = []
    if theirs["class"] != ours["class"]:
        problems.append(f"class {theirs['class']} (file) vs {ours['class']} (this model)")
    for key in sorted(set(theirs["config"]) | set(ours["config"])):
        a, b = theirs["config"].get(key, "<absent>"), ours["config"].get(key, "<absent>")
        if a != b:
            problems.append(f"config {key} {a!r} (file) vs {b!r}")
    if theirs["weights_sha256"] != ours["weights_sha256"]:
        problems.append(
            f"weights sha256 {theirs['weights_sha256'][:12]}... (file) "
            f"vs {ours['weights_sha256'][:12]}..."
        )
    if problems:
        raise ModelMismatchError(
            "the file was compressed with another model: "
            + "; ".join(problems)
            + ". Decompress it with the model that compressed it"
        )


def _check_setup(theirs: dict, ours: dict) -> None:
    problems = [
        f"{key} {theirs.get(key)!r} when compressed, {ours[key]!r} here: {_SETUP_FIXES[key]}"
        for key in ours
        if theirs.get(key) != ours[key]
    ]
    if problems:
        raise SetupMismatchError(
            "the model's arithmetic here differs from when the file was "
            "compressed, so decoding would give wrong bytes: " + "; ".join(problems)
        )
