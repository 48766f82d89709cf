"""Tests for shaq.data: enwik8 loading against a local HTTP server, the stand-in, batching."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import random
import socket
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import shaq.data
from shaq.data import (
    STANDIN_NAME,
    Corpus,
    DataError,
    batchify,
    get_segment,
    iterate_segments,
    load_corpus,
    load_enwik8,
    load_standin,
    segment_length,
)

# A small stand-in for enwik8: text-like bytes plus some arbitrary ones, so zipping compresses it
# a little and every byte value can occur.
_RNG = random.Random(0)
PAYLOAD = bytes(_RNG.choice(b"abc <page>\n") for _ in range(15_000)) + _RNG.randbytes(5_000)
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


def make_zip(member: bytes, name: str = "enwik8") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, member)
    return buffer.getvalue()


ZIP = make_zip(PAYLOAD)


# ----------------------------------------------------------------------------------------------
# A local HTTP server serving in-memory files


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        route = self.server.routes.get(self.path)  # type: ignore[attr-defined]
        if route is None:
            self.send_error(404)
            return
        body, content_length, stall = route
        time.sleep(stall)  # lets a test exercise the client's timeout
        self.send_response(200)
        self.send_header("Content-Length", str(content_length))
        self.end_headers()
        try:
            # HTTP/1.0: the connection closes after the body, even one shorter than announced.
            self.wfile.write(body)
        except ConnectionError:
            pass  # the client gave up first (timeout or enough bytes): expected in these tests

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


class LocalServer:
    """http.server on 127.0.0.1 with an ephemeral port, in a daemon thread."""

    def __init__(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.routes = {}  # type: ignore[attr-defined]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.running = True

    def serve(
        self, path: str, body: bytes, content_length: int | None = None, stall: float = 0.0
    ) -> str:
        """Serve `body` at `path` (announcing `content_length`, default its true size); its URL."""
        length = len(body) if content_length is None else content_length
        self.httpd.routes[path] = (body, length, stall)  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)
            self.running = False


@pytest.fixture
def server() -> Iterator[LocalServer]:
    local = LocalServer()
    yield local
    local.stop()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/enwik8.zip"


def load(root: Path, url: str, **kwargs: object) -> Corpus:
    """load_enwik8 with the expected sizes and md5 of PAYLOAD/ZIP."""
    expected = {"zip_size": len(ZIP), "size": len(PAYLOAD), "md5": PAYLOAD_MD5, "timeout": 5.0}
    return load_enwik8(root, url=url, **{**expected, **kwargs})  # type: ignore[arg-type]


def sizes(corpus: Corpus) -> tuple[int, int, int]:
    return corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()


def joined(corpus: Corpus) -> bytes:
    return torch.cat([corpus.train, corpus.valid, corpus.test]).numpy().tobytes()


def files(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir()) if root.exists() else []


# ----------------------------------------------------------------------------------------------
# load_enwik8


def test_download_verifies_splits_and_keeps_files(server: LocalServer, tmp_path: Path) -> None:
    corpus = load(tmp_path / "data", server.serve("/enwik8.zip", ZIP))
    assert corpus.name == "enwik8"
    assert [split.dtype for split in (corpus.train, corpus.valid, corpus.test)] == [torch.uint8] * 3
    assert sizes(corpus) == (18_000, 1_000, 1_000)
    assert joined(corpus) == PAYLOAD
    # The verified zip and member are kept; no temporary files are left.
    assert files(tmp_path / "data") == ["enwik8", "enwik8.zip"]
    assert (tmp_path / "data" / "enwik8").read_bytes() == PAYLOAD
    assert "train=18,000 bytes" in repr(corpus)


def test_second_load_needs_no_network(server: LocalServer, tmp_path: Path) -> None:
    url = server.serve("/enwik8.zip", ZIP)
    first = load(tmp_path, url)
    server.stop()
    assert joined(load(tmp_path, url)) == joined(first)
    assert joined(load(tmp_path, url, download=False)) == PAYLOAD
    # With only the zip left, the member is extracted again, still offline.
    (tmp_path / "enwik8").unlink()
    assert joined(load(tmp_path, url, download=False)) == PAYLOAD


@pytest.mark.parametrize(
    "body, content_length",
    [(ZIP[:-100], len(ZIP)), (ZIP[:-100], len(ZIP) - 100), (ZIP + b"extra", len(ZIP) + 5)],
    ids=["content-length-lie", "short-file", "long-file"],
)
def test_wrong_download_size_leaves_nothing(
    server: LocalServer, tmp_path: Path, body: bytes, content_length: int
) -> None:
    with pytest.raises(DataError, match=f"expected {len(ZIP):,}.*deleted"):
        load(tmp_path, server.serve("/enwik8.zip", body, content_length))
    assert files(tmp_path) == []


def test_md5_mismatch_in_download_leaves_nothing(server: LocalServer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"has md5 {PAYLOAD_MD5}, expected 0{{32}}.*deleted"):
        load(tmp_path, server.serve("/enwik8.zip", ZIP), md5="0" * 32)
    assert files(tmp_path) == []


@pytest.mark.parametrize(
    "bad_zip, message",
    [
        (b"PK\x03\x04 this is not a zip" * 100, "not a valid enwik8 zip"),
        (make_zip(PAYLOAD, name="something-else"), "not a valid enwik8 zip"),
        (make_zip(PAYLOAD[:-1] + b"!"), f"has md5 [0-9a-f]{{32}}, expected {PAYLOAD_MD5}"),
        (make_zip(PAYLOAD[:-1]), f"{len(PAYLOAD) - 1:,} bytes, expected {len(PAYLOAD):,}"),
    ],
    ids=["garbage", "no-member", "md5", "size"],
)
def test_bad_user_zip_is_moved_aside(tmp_path: Path, bad_zip: bytes, message: str) -> None:
    (tmp_path / "enwik8.zip").write_bytes(bad_zip)
    with pytest.raises(DataError, match=message) as error:
        load(tmp_path, closed_port_url())
    assert str(tmp_path / "enwik8.zip.bad") in str(error.value)
    assert files(tmp_path) == ["enwik8.zip.bad"]
    assert (tmp_path / "enwik8.zip.bad").read_bytes() == bad_zip


def test_missing_file_without_download_says_where_to_put_it(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match="download=False") as error:
        load(root, closed_port_url(), download=False)
    assert str(root.absolute() / "enwik8.zip") in str(error.value)
    assert not root.exists()


def test_unreachable_url_suggests_manual_download_and_standin(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="could not download") as error:
        load(tmp_path, closed_port_url())
    message = str(error.value)
    assert str(tmp_path / "enwik8.zip") in message
    assert "load_standin()" in message and "--data standin" in message
    assert files(tmp_path) == []


def test_http_error_and_timeout_raise_data_error(server: LocalServer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="could not download.*Not Found"):
        load(tmp_path, server.serve("/enwik8.zip", ZIP).replace("enwik8.zip", "missing.zip"))
    start = time.monotonic()
    with pytest.raises(DataError, match="could not download.*timed out"):
        load(tmp_path, server.serve("/slow.zip", ZIP, stall=1.0), timeout=0.2)
    assert time.monotonic() - start < 1.0
    assert files(tmp_path) == []


def test_user_placed_zip_is_used_offline(tmp_path: Path) -> None:
    (tmp_path / "enwik8.zip").write_bytes(ZIP)
    # zip_size is only for downloads: a zip made by hand may differ and is judged by its member.
    corpus = load(tmp_path, closed_port_url(), zip_size=1)
    assert joined(corpus) == PAYLOAD
    assert files(tmp_path) == ["enwik8", "enwik8.zip"]


def test_corrupt_cached_file_is_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    (tmp_path / "enwik8.zip").write_bytes(ZIP)
    (tmp_path / "enwik8").write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.warns(UserWarning, match="corrupt.*has md5"):
        corpus = load(tmp_path, closed_port_url(), download=False)
    assert joined(corpus) == PAYLOAD
    assert files(tmp_path) == ["enwik8", "enwik8.bad", "enwik8.zip"]


# ----------------------------------------------------------------------------------------------
# load_standin


def test_standin_is_deterministic_real_text_split_90_5_5() -> None:
    corpus, again = load_standin(), load_standin()
    for split in ("train", "valid", "test"):
        assert getattr(corpus, split).dtype == torch.uint8
        assert torch.equal(getattr(corpus, split), getattr(again, split))
    total = sum(sizes(corpus))
    assert total > 5_000_000
    assert corpus.valid.numel() == corpus.test.numel() == total * 5 // 100
    assert corpus.name.startswith("standin-py3.")
    text = joined(corpus)
    from pydoc_data.topics import topics

    assert topics["assert"].encode()[:200] in text
    # The fixed shuffle mixes code into every split, the evaluation splits included.
    for split in (corpus.train, corpus.valid, corpus.test):
        assert b"def " in split.numpy().tobytes()
    assert b"import unittest" in text  # stdlib code does import unittest ...
    assert b"class TestCase" in text  # ... and unittest/case.py is stdlib, not a test suite


def test_standin_calls_return_independent_tensors() -> None:
    first, second = load_standin(max_bytes=1000), load_standin(max_bytes=1000)
    first.train.zero_()
    assert second.train.any()


def test_standin_max_bytes() -> None:
    full = joined(load_standin())
    corpus = load_standin(max_bytes=100_000)
    assert sizes(corpus) == (90_000, 5_000, 5_000)
    assert joined(corpus) == full[:100_000]
    assert joined(load_standin(max_bytes=len(full) + 1)) == full
    with pytest.raises(ValueError, match="max_bytes"):
        load_standin(max_bytes=19)


# ----------------------------------------------------------------------------------------------
# load_corpus: a corpus by name


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: every download fails at once, as on a machine without one."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_load_corpus_standin_never_touches_the_data_folder(tmp_path: Path, offline: None) -> None:
    corpus = load_corpus("standin", tmp_path / "data", max_bytes=1000)
    assert corpus.name == STANDIN_NAME and joined(corpus) == joined(load_standin(max_bytes=1000))
    assert not (tmp_path / "data").exists()


def test_load_corpus_auto_takes_enwik8_when_it_can_be_had(
    server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    url = server.serve("/enwik8.zip", ZIP)  # the small PAYLOAD plays enwik8
    expected = {"zip_size": len(ZIP), "size": len(PAYLOAD), "md5": PAYLOAD_MD5}
    small = functools.partial(load_enwik8, url=url, **expected)
    monkeypatch.setattr(shaq.data, "load_enwik8", small)
    for name in ("auto", "enwik8"):
        corpus = load_corpus(name, tmp_path)
        assert corpus.name == "enwik8" and joined(corpus) == PAYLOAD
    assert capsys.readouterr().out == ""  # nothing to say when enwik8 is there


def test_load_corpus_auto_without_enwik8_falls_back_with_a_notice(
    tmp_path: Path, offline: None, capsys: pytest.CaptureFixture
) -> None:
    corpus = load_corpus("auto", tmp_path, max_bytes=1000)
    assert corpus.name == STANDIN_NAME and sum(sizes(corpus)) == 1000
    out = capsys.readouterr().out
    assert "enwik8 is not available (could not download" in out and "by hand" in out
    assert "training on the offline stand-in instead" in out
    assert load_corpus("auto", tmp_path, max_bytes=1000, verbose=False).name == STANDIN_NAME
    assert capsys.readouterr().out == ""
    assert files(tmp_path) == []


def test_load_corpus_enwik8_missing_raises_what_to_do(tmp_path: Path, offline: None) -> None:
    with pytest.raises(DataError, match="could not download") as error:
        load_corpus("enwik8", tmp_path)
    assert "--data standin" in str(error.value) and str(tmp_path / "enwik8.zip") in str(error.value)
    assert files(tmp_path) == []


def test_load_corpus_arguments() -> None:
    with pytest.raises(ValueError, match="standin, enwik8, auto.*'wiki'"):
        load_corpus("wiki")
    with pytest.raises(ValueError, match="stand-in only"):
        load_corpus("enwik8", max_bytes=1000)


# ----------------------------------------------------------------------------------------------
# batchify and segments


@pytest.mark.parametrize("dtype", [torch.uint8, torch.long])
def test_batchify_rows_are_contiguous_streams(dtype: torch.dtype) -> None:
    data = (torch.arange(103) % 256).to(dtype)
    batched = batchify(data, 4)
    assert batched.shape == (4, 25) and batched.dtype == torch.long
    for b in range(4):
        assert torch.equal(batched[b], data[b * 25 : (b + 1) * 25].long())
    assert batched.max() == 99  # the remainder 100..102 is dropped
    batched.zero_()
    assert data.any()  # a new tensor, even when data is already long


def test_batchify_errors() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        batchify(torch.arange(10), 0)
    with pytest.raises(ValueError, match="1-D"):
        batchify(torch.zeros(2, 10, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="too few"):
        batchify(torch.arange(7), 4)
    with pytest.raises(ValueError, match="integer"):
        batchify(torch.rand(10), 2)


def test_get_segment_targets_are_next_bytes() -> None:
    batched = batchify(torch.arange(200), 2)  # rows 0..99 and 100..199
    inputs, targets = get_segment(batched, 10, 7)
    assert inputs.shape == targets.shape == (2, 7)
    assert torch.equal(inputs, batched[:, 10:17]) and torch.equal(targets, inputs + 1)
    inputs, targets = get_segment(batched, 95, 10)  # clipped at the end: last target is column 99
    assert inputs.shape == (2, 4) and targets[0, -1] == 99
    for pos, length in [(99, 1), (-1, 1), (0, 0)]:
        with pytest.raises(ValueError):
            get_segment(batched, pos, length)


def test_fixed_segments_cover_the_data_consecutively() -> None:
    batched = batchify(torch.arange(3 * 101) % 256, 3)  # N = 101: 100 input columns
    segments = list(iterate_segments(batched, 30))
    assert [inputs.size(1) for inputs, _ in segments] == [30, 30, 30, 10]
    assert torch.equal(torch.cat([inputs for inputs, _ in segments], dim=1), batched[:, :-1])
    assert torch.equal(torch.cat([targets for _, targets in segments], dim=1), batched[:, 1:])
    resumed = list(iterate_segments(batched, 30, start=60))
    assert [inputs.size(1) for inputs, _ in resumed] == [30, 10]
    assert torch.equal(resumed[0][0], segments[2][0])


def test_variable_segments_are_bounded_and_reproducible() -> None:
    batched = batchify(torch.arange(2 * 20_001) % 256, 2)
    seq_len = 64

    def lengths(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        segments = iterate_segments(batched, seq_len, variable=True, generator=generator)
        return [inputs.size(1) for inputs, _ in segments]

    first = lengths(0)
    assert first == lengths(0) and first != lengths(1)
    assert sum(first) == 20_000  # still consecutive and complete
    assert all(5 <= length <= seq_len for length in first[:-1])
    assert any(length < seq_len // 2 + 10 for length in first)  # the occasional half-length base
    assert sum(length == seq_len for length in first) > len(first) / 3  # most clamp at seq_len


def test_segment_cursor_and_generator_resume_exactly() -> None:
    batched = batchify(torch.arange(2 * 2_001) % 256, 2)
    generator = torch.Generator().manual_seed(3)
    pos, saved = 0, None
    reference = []
    while pos < batched.size(1) - 1:
        if len(reference) == 5:
            saved = (pos, generator.get_state())  # what a trainer checkpoints
        inputs, _ = get_segment(batched, pos, segment_length(32, True, generator))
        reference.append(inputs)
        pos += inputs.size(1)
    assert saved is not None
    resumed_generator = torch.Generator()
    resumed_generator.set_state(saved[1])
    resumed = [x for x, _ in iterate_segments(batched, 32, saved[0], True, resumed_generator)]
    assert len(resumed) == len(reference) - 5
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference[5:], strict=True))


def test_segment_length_arguments() -> None:
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert segment_length(100, False, generator) == 100
    assert torch.equal(generator.get_state(), state)  # fixed lengths draw nothing
    with pytest.raises(ValueError):
        segment_length(0)
    with pytest.raises(ValueError, match=">= 5"):
        segment_length(4, variable=True)
