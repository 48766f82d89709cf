"""Compression with a model: exact round trips across processes, a size at the cross-entropy, and
files that decompress refuses (damaged, truncated, another model, another setup, a newer format)."""

import copy
import math
import subprocess
import sys
import zlib

import pytest
import torch

import shaq
from shaq import codec
from shaq.codec import (
    FORMAT_VERSION,
    MIN_LANE_BYTES,
    DamagedFileError,
    FormatVersionError,
    ModelMismatchError,
    SetupMismatchError,
    VerificationError,
    compress,
    cross_entropy_bits,
    decompress,
    default_lanes,
    header_size,
    read_file,
)
from shaq.data import load_standin
from shaq.models import MODELS, SHAQ, SHARNN, SHARNNConfig, build_model, model_config
from shaq.nn import switches

# Rebuilds the model from its saved weights and decompresses every file named after them.
CHILD = """
import pathlib, sys, torch
from shaq.codec import decompress
from shaq.models import SHAQ, SHARNNConfig
model = SHAQ(SHARNNConfig.smoke())
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
for name in sys.argv[2:]:
    path = pathlib.Path(name)
    path.with_suffix(".out").write_bytes(decompress(model, path.read_bytes()))
"""


@pytest.fixture(scope="module")
def corpus():
    return load_standin(max_bytes=200_000)


@pytest.fixture(scope="module")
def model(corpus):
    """A smoke SHAQ trained for a few seconds: it compresses text to about half."""
    torch.manual_seed(0)
    model = SHAQ(SHARNNConfig.smoke())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = corpus.train.long()
    for _ in range(60):
        starts = torch.randint(0, len(train) - 65, (16,)).tolist()
        rows = torch.stack([train[s : s + 65] for s in starts])
        loss = model(rows[:, :-1], targets=rows[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def text(corpus) -> bytes:
    return bytes(corpus.test[:2400].tolist())


@pytest.fixture(scope="module")
def cases(model, text) -> dict[str, tuple[bytes, int | None, bytes]]:
    """name -> (data, lanes, compressed file), compressed once for the tests below."""
    inputs = {
        "empty": (b"", None),
        "one byte": (b"Q", None),
        "all 256 byte values": (bytes(range(256)), 1),
        "random bytes": (
            torch.randint(0, 256, (1200,), generator=torch.Generator().manual_seed(0))
            .to(torch.uint8)
            .numpy()
            .tobytes(),
            4,
        ),
        "text, 1 lane": (text[:600], 1),
        "text, 8 lanes": (text, 8),
    }
    return {
        name: (data, lanes, compress(model, data, lanes=lanes))
        for name, (data, lanes) in inputs.items()
    }


def test_round_trips_are_exact_in_another_process(model, cases, tmp_path):
    torch.save(model.state_dict(), tmp_path / "model.pt")
    names = []
    for i, (_, _, blob) in enumerate(cases.values()):
        (tmp_path / f"{i}.shaqz").write_bytes(blob)
        names.append(str(tmp_path / f"{i}.shaqz"))
    subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "model.pt"), *names], check=True, timeout=600
    )
    for i, (name, (data, _, _)) in enumerate(cases.items()):
        assert (tmp_path / f"{i}.out").read_bytes() == data, name


def test_text_is_coded_in_lanes_and_random_bytes_are_stored(cases):
    header, _ = read_file(cases["text, 8 lanes"][2])
    assert header["method"] == "model" and len(header["streams"]) == 8
    assert read_file(cases["text, 1 lane"][2])[0]["streams"] != []
    for name in ("empty", "one byte", "random bytes"):
        assert read_file(cases[name][2])[0]["method"] == "stored", name


def test_worst_case_expansion_is_the_header(cases):
    """The file is the shorter of the coded one and the data itself behind a header: never more than
    the header (under 1 KiB) longer than the data."""
    for name, (data, _, blob) in cases.items():
        assert len(blob) <= len(data) + header_size(blob) < len(data) + 1024, name
    data, _, blob = cases["random bytes"]
    assert len(blob) == len(data) + header_size(blob)


def test_coded_size_is_within_one_percent_of_the_cross_entropy(model, cases):
    for name in ("text, 1 lane", "text, 8 lanes"):
        data, lanes, blob = cases[name]
        payload_bits = 8 * (len(blob) - header_size(blob))
        ideal = cross_entropy_bits(model, data, lanes)
        assert ideal < 0.6 * 8 * len(data), "the trained model should compress text"
        # Each lane's stream ends with at most two bytes more than its share of the ideal.
        assert abs(payload_bits - ideal) <= 0.01 * ideal + 16 * lanes, name


def test_cross_entropy_is_the_models_loss_on_the_lane_after_a_zero_byte(model, text):
    data = text[:120]  # within the memory (128): one call over all of it sees what the steps see
    x = torch.tensor([[codec.START_BYTE, *data[:-1]]])
    with torch.no_grad():
        loss = model(x, targets=torch.tensor([list(data)])).loss.item()  # nats per byte, one call
    expected = loss * len(data) / math.log(2)
    assert cross_entropy_bits(model, data, lanes=1) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_round_trips(name, text):
    torch.manual_seed(0)
    model = build_model(name, model_config(name, "smoke"))
    # The text's byte frequencies as the output bias: even untrained, the model compresses text.
    counts = torch.bincount(torch.tensor(list(text)), minlength=256).float()
    with torch.no_grad():
        model.decoder_bias.copy_(torch.log(counts + 0.5))
    data = text[:300]
    blob = compress(model, data, lanes=3)
    assert read_file(blob)[0]["method"] == "model"
    assert model.training  # its mode is restored
    assert decompress(model, blob) == data


# ------------------------------------------------------------------------ files that are refused


def flip(blob: bytes, i: int) -> bytes:
    return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :]


def test_damaged_and_truncated_files_are_refused(model, cases):
    blob = cases["text, 8 lanes"][2]
    start = header_size(blob)
    damaged = {
        "payload is damaged": [flip(blob, start + 10), flip(blob, len(blob) - 1)],
        "header is damaged": [flip(blob, len(codec.MAGIC) + 20), flip(blob, start - 1)],
        "truncated": [blob[:-1], blob[: start + 5], blob[: start - 1], blob[:7], b"SHA"],
        "longer than it should be": [blob + b"\0"],
        "not a shaq compressed file": [b"PK\x03\x04 a zip", b"\0" + blob],
    }
    for message, blobs in damaged.items():
        for bad in blobs:
            with pytest.raises(DamagedFileError, match=message):
                decompress(model, bad)


def test_a_newer_format_version_is_refused(model, cases):
    blob = cases["text, 8 lanes"][2]
    newer = blob[: len(codec.MAGIC)] + bytes([FORMAT_VERSION + 1]) + blob[len(codec.MAGIC) + 1 :]
    with pytest.raises(FormatVersionError, match=f"newer format version {FORMAT_VERSION + 1}"):
        decompress(model, newer)


def test_another_model_is_refused(model, cases):
    blob = cases["text, 8 lanes"][2]
    torch.manual_seed(1)
    with pytest.raises(ModelMismatchError, match="weights sha256"):
        decompress(SHAQ(SHARNNConfig.smoke()), blob)
    shorter_memory = SHAQ(SHARNNConfig.smoke(memory_len=64))
    shorter_memory.load_state_dict(model.state_dict())  # the same weights: only the config differs
    with pytest.raises(ModelMismatchError, match="memory_len 128 \\(file\\) vs 64"):
        decompress(shorter_memory, blob)
    with pytest.raises(ModelMismatchError, match="class SHAQ \\(file\\) vs SHARNN"):
        decompress(SHARNN(SHARNNConfig.smoke()), blob)


def test_another_setup_is_refused(model, cases, monkeypatch):
    blob = cases["text, 8 lanes"][2]
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        expected = f"threads {threads} when compressed, {threads + 1} here"
        with pytest.raises(SetupMismatchError, match=expected):
            decompress(model, blob)
    finally:
        torch.set_num_threads(threads)
    for module, name in ((shaq, "__version__"), (torch, "__version__")):
        with monkeypatch.context() as patch:
            patch.setattr(module, name, "0.0.1")
            with pytest.raises(SetupMismatchError, match="0.0.1' here: install that"):
                decompress(model, blob)
    with monkeypatch.context() as patch:
        patch.setattr(switches, "use_extension", not switches.use_extension)
        with pytest.raises(SetupMismatchError, match="switches"):
            decompress(model, blob)


def test_arithmetic_that_differs_unseen_raises_instead_of_returning_wrong_bytes(model, cases):
    """Logits nudged by a hook (no weight, config or setting changes): decoding goes astray, and the
    decoder's range check or the CRC-32 of the decoded bytes catches it."""
    data, _, blob = cases["text, 1 lane"]
    nudged = copy.deepcopy(model)

    def nudge(module, args, out):
        out.logits.mul_(1.01)  # in place: the hook returns None, so the output stays the model's

    nudged.register_forward_hook(nudge)
    with pytest.raises(VerificationError):
        decompress(nudged, blob)
    assert zlib.crc32(data) == read_file(blob)[0]["crc32"]


# ----------------------------------------------------------------------------- arguments


def test_lanes_are_checked_and_never_more_than_the_bytes(model):
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="lanes"):
            compress(model, b"abc", lanes=bad)
    with pytest.raises(TypeError, match="bytes"):
        compress(model, "text")
    data = b"abababababababababab"
    assert cross_entropy_bits(model, data, lanes=500) == cross_entropy_bits(
        model, data, lanes=len(data)
    )
    assert default_lanes(0) == 1 and default_lanes(3 * MIN_LANE_BYTES) == 3
    assert default_lanes(10**9) == codec.DEFAULT_LANES


def test_progress_bar_shows_bytes_per_second(model, capsys):
    data = b"progress " * 20
    blob = compress(model, data, lanes=4, progress=True)
    assert decompress(model, blob, progress=True) == data
    assert "B/s" in capsys.readouterr().err


def test_shaq_compress_and_decompress_are_the_functions():
    assert shaq.compress is compress and shaq.decompress is decompress
