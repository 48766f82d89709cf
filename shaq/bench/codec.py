"""The compressor's speed: `shaq.compress` and `shaq.decompress` in bytes/s.

SHAQ at the trainer section's preset (the cpu preset in the full plan), weights as initialised:
the speed of coding does not depend on what the weights are. The text is the stand-in's test
split, `positions` bytes per lane, coded with one lane and with `DEFAULT_LANES`.
"""

import time

import torch

from shaq.bench.harness import Context
from shaq.bench.sections import StepShape
from shaq.codec import DEFAULT_LANES, compress, decompress, read_file
from shaq.data import load_standin
from shaq.models import build_model


def bench_codec(ctx: Context, shape: StepShape, positions: int) -> list[dict]:
    """Compress and decompress bytes/s for one lane and for DEFAULT_LANES lanes."""
    torch.manual_seed(0)
    model = build_model("shaq", shape.config("shaq")).to(ctx.device)
    test = load_standin().test
    rows = []
    for lanes in (1, DEFAULT_LANES):
        data = bytes(test[: lanes * positions].tolist())
        started = time.perf_counter()
        blob = compress(model, data, lanes=lanes)
        compressed = time.perf_counter()
        restored = decompress(model, blob)
        ended = time.perf_counter()
        assert restored == data, "the bench's round trip failed"
        # Untrained weights code at about 8 bits a byte, so compress may store the bytes instead:
        # decompressing a stored file runs no model, and its time says nothing.
        method = read_file(blob)[0]["method"]
        decompress_rate = len(data) / (ended - compressed) if method == "model" else None
        rows.append(
            {
                "model": "shaq",
                "shape": shape.name,
                "lanes": lanes,
                "bytes": len(data),
                "method": method,
                "compress_bytes_per_s": len(data) / (compressed - started),
                "decompress_bytes_per_s": decompress_rate,
            }
        )
    return rows
