"""Byte-level corpora and batching: enwik8, an offline stand-in, and (inputs, targets) segments.

Every corpus is a stream of raw bytes, so the vocabulary is always the 256 byte values and there
is no tokenizer. A typical training loop::

    corpus = load_corpus("auto", "data")      # enwik8, or the offline stand-in without it
    train = batchify(corpus.train, 16)        # [B, N] long, row b is one contiguous stream
    for inputs, targets in iterate_segments(train, 1024, variable=True):
        ...                                   # inputs, targets: [B, T]; targets = next bytes

A trainer that checkpoints mid-epoch keeps its own cursor instead of the iterator::

    length = segment_length(seq_len, variable=True, generator=g)
    inputs, targets = get_segment(train, pos, length)
    pos += inputs.size(1)                     # save pos and g.get_state() to resume exactly
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import random
import secrets
import sys
import sysconfig
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_ZIP_SIZE = 36_445_475
ENWIK8_SIZE = 100_000_000
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"

# Valid and test each get this percentage of a corpus, train the rest: 90M/5M/5M for enwik8.
_EVAL_PERCENT = 5
_CHUNK = 1 << 20  # download read size: large enough to be fast, small enough for a smooth bar


class DataError(RuntimeError):
    """A corpus could not be obtained or failed verification; the message says how to fix it."""


@dataclass(frozen=True, eq=False, repr=False)
class Corpus:
    """Train, valid and test splits of one byte stream, consecutive and in that order.

    Each split is a 1-D ``torch.uint8`` tensor of raw bytes, shape [n_split]; the vocabulary is
    the 256 byte values. ``eq=False`` because comparing tensors elementwise has no single truth
    value; compare the splits with ``torch.equal`` instead.
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    name: str = "corpus"

    def __repr__(self) -> str:
        splits = {"train": self.train, "valid": self.valid, "test": self.test}
        sizes = ", ".join(f"{split}={data.numel():,} bytes" for split, data in splits.items())
        return f"Corpus({self.name!r}, {sizes})"


def _split(data: torch.Tensor, name: str) -> Corpus:
    """Cut a 1-D byte tensor [n] into 90% train, 5% valid and 5% test, in stream order.

    Valid and test get floor(5% of n) bytes each and train the rest, which for enwik8 is exactly
    the standard 90M/5M/5M split. The splits are views of `data`.
    """
    n_eval = data.numel() * _EVAL_PERCENT // 100
    train, valid, test = data.split([data.numel() - 2 * n_eval, n_eval, n_eval])
    return Corpus(train, valid, test, name)


CORPORA = ("standin", "enwik8", "auto")


def load_corpus(
    name: str, root: str | Path = "data", *, max_bytes: int | None = None, verbose: bool = True
) -> Corpus:
    """The corpus called `name` (one of CORPORA), as ``TrainConfig.data`` and the book name it:
    `load_standin(max_bytes)`, `load_enwik8(root)`, or for ``auto`` enwik8 if it can be had, else
    the stand-in with a notice saying why (unless not `verbose`). Only ``enwik8`` raises DataError.
    """
    if name not in CORPORA:
        raise ValueError(f"the corpus must be one of {', '.join(CORPORA)}, got {name!r}")
    if name == "enwik8" and max_bytes is not None:
        raise ValueError("max_bytes cuts the stand-in only: enwik8 keeps its standard splits")
    if name != "standin":
        try:
            return load_enwik8(root)
        except DataError as err:
            if name == "enwik8":
                raise
            if verbose:
                print(f"data 'auto': enwik8 is not available ({err})")
                print("  -> training on the offline stand-in instead")
    return load_standin(max_bytes)


# ----------------------------------------------------------------------------------------------
# enwik8


def load_enwik8(
    root: str | os.PathLike[str] = "data",
    download: bool = True,
    *,
    url: str = ENWIK8_URL,
    zip_size: int = ENWIK8_ZIP_SIZE,
    size: int = ENWIK8_SIZE,
    md5: str = ENWIK8_MD5,
    timeout: float = 30.0,
) -> Corpus:
    """Load enwik8 (the first 10^8 bytes of an English Wikipedia XML dump) as a Corpus.

    The splits are the standard bytes [0, 90M) train, [90M, 95M) valid and [95M, 100M) test.
    Files in `root`:

    - ``enwik8``: the verified, unzipped bytes. Once present, loading needs neither the zip nor
      the network. Its size and md5 are checked on every load (the bytes are read anyway, and
      this checks exactly what goes into the tensors); a bad copy is moved aside to
      ``enwik8.bad`` with a warning and rebuilt.
    - ``enwik8.zip``: if present (e.g. downloaded by hand) it is used without network; if its
      member is wrong it is moved aside to ``enwik8.zip.bad`` and a DataError is raised.
      Otherwise, with `download`, it is fetched from `url`.

    Everything is written to a hidden ``.*.part`` file in `root` and moved into place with
    ``os.replace`` once verified: ``enwik8`` and ``enwik8.zip`` are absent or good, and a failed
    download leaves nothing behind (a process killed mid-write may leave a ``.part`` file).

    Args:
        root: folder for ``enwik8.zip`` and ``enwik8``; created if needed.
        download: fetch the zip from `url` if neither file is in `root`.
        url, zip_size, size, md5: where to download from, the expected size of the zip, and the
            expected size and md5 of its member ``enwik8``; overridable for tests. Only `size` and
            `md5` decide whether the data is right; `zip_size` catches incomplete downloads.
        timeout: seconds a network connect or read may stall before the download fails.

    Returns:
        Corpus named "enwik8" of uint8 tensors: train [0.9 size], valid [0.05 size],
        test [0.05 size] (all three views of one buffer).

    Raises:
        DataError: the data could not be obtained or verified; the message says how to fix it.
    """
    root = Path(root).expanduser().absolute()
    raw_path, zip_path = root / "enwik8", root / "enwik8.zip"
    data = _read_cached(raw_path, size, md5)
    if data is None:
        if zip_path.exists():
            try:
                data = _unzip(zip_path, size, md5)
            except DataError as err:
                bad = _move_aside(zip_path)
                raise DataError(
                    f"{err}; it was moved aside to {bad}. {_howto(url, zip_path)}"
                ) from None
        elif download:
            data = _download(url, zip_path, zip_size, size, md5, timeout)
        else:
            raise DataError(f"{zip_path} not found and download=False. {_howto(url, zip_path)}")
        _write_atomic(raw_path, data)
    return _split(torch.frombuffer(data, dtype=torch.uint8), "enwik8")


def _howto(url: str, zip_path: Path) -> str:
    return (
        f"Download {url} by hand and place it at {zip_path}, or use the offline stand-in: "
        "`--data standin` / shaq.data.load_standin()"
    )


def _mismatch(data: bytearray, size: int, md5: str) -> str | None:
    """Why `data` is not the expected file ("has ..., expected ..."), or None if it is."""
    if len(data) != size:
        return f"has {len(data):,} bytes, expected {size:,}"
    # usedforsecurity=False: md5 is a checksum here, and FIPS-mode Pythons refuse it otherwise.
    digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return None if digest == md5 else f"has md5 {digest}, expected {md5}"


def _read_cached(path: Path, size: int, md5: str) -> bytearray | None:
    """The verified bytes of a previously unzipped file, or None if absent or bad (moved aside)."""
    if not path.exists():
        return None
    # readinto a bytearray: one read, no copy, and torch.frombuffer can share its memory.
    data = bytearray(path.stat().st_size)
    with path.open("rb") as file:
        file.readinto(data)
    problem = _mismatch(data, size, md5)
    if problem is None:
        return data
    bad = _move_aside(path)
    warnings.warn(
        f"{path} is corrupt ({problem}); moved it aside to {bad} and rebuilding it", stacklevel=3
    )
    return None


def _unzip(zip_path: Path, size: int, md5: str) -> bytearray:
    """The verified bytes of the member ``enwik8`` of `zip_path`; DataError if it is not right."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            info = archive.getinfo("enwik8")
            # Check the declared size before inflating, so a wrong archive cannot exhaust memory.
            if info.file_size != size:
                raise DataError(
                    f"{zip_path} is wrong: its member enwik8 has {info.file_size:,} bytes, "
                    f"expected {size:,}"
                )
            data = bytearray(archive.read(info))
    except (zipfile.BadZipFile, KeyError, EOFError, zlib.error, NotImplementedError) as err:
        raise DataError(f"{zip_path} is not a valid enwik8 zip ({err})") from err
    problem = _mismatch(data, size, md5)
    if problem is not None:
        raise DataError(f"{zip_path} is wrong: its member enwik8 {problem}")
    return data


def _download(
    url: str, zip_path: Path, zip_size: int, size: int, md5: str, timeout: float
) -> bytearray:
    """Download `url` to `zip_path` and return the verified member; on failure nothing is left."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(zip_path)
    try:
        with tmp.open("xb") as file:
            received = _fetch(url, file, zip_size, timeout, zip_path)
        if received != zip_size:
            raise DataError(
                f"the download of {url} is incomplete or wrong: got {received:,} bytes"
                f"{' or more' if received > zip_size else ''}, expected {zip_size:,}; the partial "
                f"file was deleted. Try again, or: {_howto(url, zip_path)}"
            )
        try:
            data = _unzip(tmp, size, md5)
        except DataError as err:
            raise DataError(
                f"the download of {url} is corrupt: {err}; it was deleted. Try again, or: "
                f"{_howto(url, zip_path)}"
            ) from None
        os.replace(tmp, zip_path)
        return data
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful os.replace


def _fetch(url: str, file: BinaryIO, limit: int, timeout: float, zip_path: Path) -> int:
    """Stream `url` into `file` with a progress bar; returns the number of bytes written.

    Reads at most `limit` + 1 bytes: one past the expected size is enough to tell that the file
    is wrong, without downloading an arbitrarily large one.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "shaq"})
    received = 0
    try:
        with (
            urllib.request.urlopen(request, timeout=timeout) as response,
            tqdm(
                total=limit, unit="B", unit_scale=True, unit_divisor=1024, desc=zip_path.name
            ) as bar,
        ):
            # A server that closes early just ends the stream (http.client does not raise for a
            # short body), so completeness is checked by the caller from the byte count.
            while received <= limit and (chunk := response.read(min(_CHUNK, limit + 1 - received))):
                file.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:
        # URLError wraps the real cause (refused, timed out, DNS, HTTP status) in .reason.
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise DataError(f"could not download {url}: {reason}. {_howto(url, zip_path)}") from err
    return received


def _temp_path(path: Path) -> Path:
    """A fresh hidden name next to `path`, on the same filesystem so os.replace is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")


def _write_atomic(path: Path, data: bytearray) -> None:
    """Write `data` to `path` so that `path` is never seen half-written."""
    tmp = _temp_path(path)
    try:
        with tmp.open("xb") as file:
            file.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _move_aside(path: Path) -> Path:
    """Rename a bad file to ``<name>.bad`` (replacing an older one), kept for inspection."""
    bad = path.with_name(path.name + ".bad")
    os.replace(path, bad)
    return bad


# ----------------------------------------------------------------------------------------------
# Offline stand-in

STANDIN_NAME = f"standin-py{sys.version_info.major}.{sys.version_info.minor}"
# Folders under the stdlib that are not stdlib prose or code: test suites (with their data
# files), third-party packages, bytecode caches, compiled extensions, and build configuration.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
)
# topics.py holds the pydoc topics already included as documents; site/usercustomize.py are
# distribution or user additions, not stdlib.
_SKIP_FILES = frozenset({"pydoc_data/topics.py", "sitecustomize.py", "usercustomize.py"})


def _skip_dir(name: str) -> bool:
    # config-3.11-x86_64-linux-gnu/ holds the build's Makefile and python-config.py.
    return name in _SKIP_DIRS or name.startswith("config-")


def _skip_file(relpath: str) -> bool:
    # _sysconfigdata_*.py is generated at build time with this machine's paths and compiler flags,
    # so it would make the corpus differ between installs of the same Python version.
    name = relpath.rsplit("/", 1)[-1]
    return relpath in _SKIP_FILES or name in _SKIP_FILES or name.startswith("_sysconfigdata")


@functools.lru_cache(maxsize=1)
def _standin_bytes() -> bytes:
    """The assembled stand-in corpus (see load_standin); built once per process."""
    from pydoc_data.topics import topics  # imported here: 0.7 MB module only this corpus needs

    documents = {f"pydoc_data.topics[{key!r}]": text.encode() for key, text in topics.items()}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for folder, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [name for name in dirnames if not _skip_dir(name)]  # prune: never descend
        for filename in filenames:
            relpath = (Path(folder) / filename).relative_to(stdlib).as_posix()
            if filename.endswith(".py") and not _skip_file(relpath):
                documents[relpath] = (stdlib / relpath).read_bytes()
    if len(documents) == len(topics):  # not one .py file
        raise DataError(f"no .py files under {stdlib}; the stand-in needs the stdlib sources")
    # Sort (walk order is filesystem-dependent), then shuffle with a fixed seed so that docs and
    # code from many packages land in all three splits; valid/test come from the end.
    names = sorted(documents)
    random.Random(0).shuffle(names)
    # A form feed (page break) separates documents: a single byte that rarely occurs inside them.
    return b"\f".join(documents[name] for name in names if documents[name])


def load_standin(max_bytes: int | None = None) -> Corpus:
    """Load the offline stand-in corpus: real English prose and Python code shipped with Python.

    Used for CI, tests and CPU runs where enwik8 is unavailable or too large. The documents are

    - the pydoc topic texts (``pydoc_data.topics.topics``, the reference manual's chapters as
      plain text, UTF-8 encoded), and
    - the standard library's ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, raw bytes,
      without test suites, third-party packages, caches, build configuration and the files that
      differ between installs of one Python version (``_SKIP_DIRS`` and ``_SKIP_FILES``).

    The documents are sorted by name, shuffled with ``random.Random(0)`` so that every split mixes
    prose and code from many packages, and joined with form feeds (b"\\f"). Never any text written
    in this repository. The result is deterministic for a given Python version (and identical
    stdlib files), which its name says.

    Args:
        max_bytes: keep only the first `max_bytes` bytes before splitting (quick runs); at least
            20 so every split is non-empty. None keeps everything.

    Returns:
        Corpus named STANDIN_NAME (e.g. "standin-py3.11") of uint8 tensors split 90/5/5 like
        enwik8. Each call returns fresh tensors, so modifying one corpus never affects another;
        the assembled bytes are cached in memory, so only the first call reads the files.
    """
    raw = _standin_bytes()
    if max_bytes is not None:
        if max_bytes < 20:
            raise ValueError(
                f"max_bytes must be at least 20 so that every split is non-empty, got {max_bytes}"
            )
        raw = memoryview(raw)[:max_bytes]
    return _split(torch.frombuffer(bytearray(raw), dtype=torch.uint8), STANDIN_NAME)


# ----------------------------------------------------------------------------------------------
# Batching


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Lay a 1-D byte stream out as `batch_size` contiguous rows, batch first.

    Row b is data[b*N:(b+1)*N] with N = n // batch_size; the last n - batch_size*N elements are
    dropped. Segments then read all rows left to right in lockstep, so a recurrent state for row b
    carries over from one segment to the next.

    Args:
        data: [n] integer tensor (uint8 bytes or long ids).
        batch_size: B, the number of parallel streams, >= 1.

    Returns:
        [B, N] long tensor on data's device; always a new tensor, never a view of `data`.

    Raises:
        ValueError: data is not 1-D integers, batch_size < 1, or N < 2.
    """
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if data.dtype.is_floating_point or data.dtype.is_complex:
        raise ValueError(f"data must hold integer byte values, got dtype {data.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_cols = data.numel() // batch_size
    if n_cols < 2:
        raise ValueError(
            f"data has {data.numel():,} elements, too few for batch_size={batch_size}: "
            "each row needs at least 2 (an input and its target)"
        )
    return data[: batch_size * n_cols].reshape(batch_size, n_cols).to(torch.long, copy=True)


def segment_length(
    seq_len: int, variable: bool = False, generator: torch.Generator | None = None
) -> int:
    """Length T of the next segment.

    With variable=False this is `seq_len` and no random numbers are drawn (use it for
    evaluation). With variable=True it follows SHA-RNN (after AWD-LSTM): a base of `seq_len` with
    probability 0.95, else `seq_len` / 2, then T = int(Normal(base, 5)) clamped to [5, seq_len].
    Varying T moves the segment boundaries from epoch to epoch, so each byte is seen at different
    positions of a segment instead of always at the same one.
    Exactly two numbers are drawn from `generator` (torch's global RNG if None) per variable call,
    so checkpointing the generator state along with the cursor resumes the same lengths.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not variable:
        return seq_len
    if seq_len < 5:
        raise ValueError(
            f"variable segment lengths are clamped to [5, seq_len], so seq_len must be >= 5, "
            f"got {seq_len}"
        )
    coin = torch.rand((), generator=generator).item()
    noise = torch.randn((), generator=generator).item()
    base = seq_len if coin < 0.95 else seq_len / 2
    return max(5, min(seq_len, int(base + 5 * noise)))


def get_segment(batched: torch.Tensor, pos: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment of `batched` starting at column `pos`: inputs and their next-byte targets.

    Args:
        batched: [B, N] long tensor from batchify.
        pos: first input column, 0 <= pos < N - 1.
        length: wanted T; clipped to N - 1 - pos at the end of the data (the last target is
            column N - 1), so the last segment may be shorter.

    Returns:
        (inputs, targets), both [B, T] views of `batched`: inputs = batched[:, pos:pos+T] and
        targets = batched[:, pos+1:pos+1+T], i.e. targets[:, t] is the byte after inputs[:, t].
        The next segment starts at pos + T.
    """
    n_cols = batched.size(1)
    if not 0 <= pos < n_cols - 1:
        raise ValueError(f"pos must be in [0, {n_cols - 1}) for {n_cols} columns, got {pos}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    length = min(length, n_cols - 1 - pos)
    return batched[:, pos : pos + length], batched[:, pos + 1 : pos + 1 + length]


def iterate_segments(
    batched: torch.Tensor,
    seq_len: int,
    start: int = 0,
    variable: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (inputs, targets) segments of `batched` from column `start` to the end.

    Each is get_segment(batched, pos, segment_length(seq_len, variable, generator)), the next
    starting at pos + T: the inputs cover columns [start, N - 1) once, the last may be shorter.
    Yields (inputs, targets), both [B, T] long views of `batched`; to resume mid-epoch, pass the
    saved cursor as `start` and a generator restored to the state it had at that cursor.
    """
    pos = start
    while pos < batched.size(1) - 1:
        inputs, targets = get_segment(batched, pos, segment_length(seq_len, variable, generator))
        yield inputs, targets
        pos += inputs.size(1)
