"""The range coder and its frequency tables on their own, with toy models of fixed and adaptive
counts."""

import math
import random

import pytest
import torch

from shaq.coding import TOTAL, RangeDecoder, RangeEncoder, quantize


def encode(symbols: list[int], tables) -> bytes:
    """Code symbols[i] with tables(i) (a cumulative count list) -> the stream."""
    encoder = RangeEncoder()
    for i, s in enumerate(symbols):
        table = tables(i)
        encoder.encode(table[s], table[s + 1], table[-1])
    return encoder.finish()


def ideal_bits(symbols: list[int], tables) -> float:
    return sum(
        -math.log2((tables(i)[s + 1] - tables(i)[s]) / tables(i)[-1]) for i, s in enumerate(symbols)
    )


# ----------------------------------------------------------------------------- quantize


def test_quantize_gives_every_symbol_a_count_and_adds_up_to_the_total():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(5, 256) * 8, dim=-1)  # rows from near-uniform to very peaked
    probs[0] = 0.0
    probs[0, 7] = 1.0  # a one-hot row: 255 symbols of probability 0
    table = quantize(probs)
    assert table.shape == (5, 257) and table.dtype == torch.int64
    assert (table[:, 0] == 0).all() and (table[:, -1] == TOTAL).all()
    counts = table.diff(dim=-1)
    assert (counts >= 1).all()
    assert counts[0, 7] == TOTAL - 255 and (counts[0].sum() - counts[0, 7]) == 255
    # Proportional to the probabilities: a count is off by at most the floor of 1 and what the
    # floors leave over (< 256, all to the most likely symbol).
    assert ((counts / TOTAL - probs).abs() <= 257 / TOTAL).all()


def test_quantize_is_a_function_of_the_probabilities_alone():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(64, 256) * 4, dim=-1)
    assert torch.equal(quantize(probs), quantize(probs.clone()))
    assert torch.equal(quantize(probs[3:4]), quantize(probs)[3:4])  # rows do not affect each other
    assert torch.equal(quantize(probs.float()), quantize(probs.float().double()))


def test_quantize_tiny_probabilities_keep_one_count_and_other_totals():
    probs = torch.tensor([[1 - 3e-30, 1e-30, 2e-30, 0.0]])
    counts = quantize(probs, total=1 << 10).diff(dim=-1)
    assert counts.tolist() == [[1021, 1, 1, 1]]


@pytest.mark.parametrize(
    "bad",
    [
        torch.full((2, 4), float("nan")),
        torch.tensor([[0.5, 0.6, -0.1]]),
        torch.zeros(1, 3),
        torch.ones(4),
    ],
)
def test_quantize_refuses_what_are_not_probabilities(bad):
    with pytest.raises(ValueError):
        quantize(bad)


def test_quantize_refuses_a_total_too_small_or_too_large():
    with pytest.raises(ValueError, match="total"):
        quantize(torch.full((1, 256), 1 / 256), total=256)
    with pytest.raises(ValueError, match="total"):
        quantize(torch.full((1, 256), 1 / 256), total=(1 << 32) + 1)


# ----------------------------------------------------------------------------- the coder


@pytest.mark.parametrize("seed", range(4))
def test_random_symbols_round_trip_near_their_ideal_length(seed):
    rng = random.Random(seed)
    n_symbols = rng.choice([2, 3, 17, 256])
    weights = torch.rand(1, n_symbols, generator=torch.Generator().manual_seed(seed)) ** 4
    table = quantize(weights)[0].tolist()
    symbols = [rng.randrange(n_symbols) for _ in range(5000)]
    data = encode(symbols, lambda i: table)
    decoder = RangeDecoder(data)
    assert [decoder.decode(table) for _ in symbols] == symbols
    # Within two bytes of -sum log2 p: the last byte, and the floor divisions' rounding.
    assert len(data) <= ideal_bits(symbols, lambda i: table) / 8 + 2


def test_an_adaptive_model_round_trips_and_learns_a_skewed_source():
    """Counts that grow with every symbol seen: both sides update the table after every symbol."""
    rng = random.Random(5)
    symbols = [0 if rng.random() < 0.9 else rng.randrange(1, 8) for _ in range(4000)]

    def table(counts: list[int]) -> list[int]:
        return [sum(counts[:k]) for k in range(len(counts) + 1)]

    encoder, counts = RangeEncoder(), [1] * 8
    for s in symbols:
        t = table(counts)
        encoder.encode(t[s], t[s + 1], t[-1])
        counts[s] += 1
    data = encoder.finish()
    decoder, counts, decoded = RangeDecoder(data), [1] * 8, []
    for _ in symbols:
        s = decoder.decode(table(counts))
        decoded.append(s)
        counts[s] += 1
    assert decoded == symbols
    # The source's entropy is about 0.75 bits a symbol, a uniform code's 3 bits.
    assert len(data) * 8 < 0.85 * len(symbols)


def test_the_least_likely_symbol_costs_log2_total_bits_and_round_trips():
    probs = torch.zeros(1, 256)
    probs[0, 0] = 1.0
    table = quantize(probs)[0].tolist()  # symbols 1..255 have 1 count of 2^24
    rng = random.Random(0)
    symbols = [rng.randrange(1, 256) if rng.random() < 0.5 else 0 for _ in range(2000)]
    data = encode(symbols, lambda i: table)
    decoder = RangeDecoder(data)
    assert [decoder.decode(table) for _ in symbols] == symbols
    unlikely = sum(s != 0 for s in symbols)
    assert unlikely * 24 / 8 - 1 <= len(data) <= unlikely * 24 / 8 + 2


def test_carries_into_written_bytes_are_exercised_and_decode():
    """A carry adds 1 to bytes already written (0x12, 0xFF -> 0x13, 0): long runs make some."""

    class CountingEncoder(RangeEncoder):
        carries = 0

        def _carry(self):
            self.carries += 1
            super()._carry()

    rng = random.Random(3)
    table = [0, 1, 1 << 20, (1 << 24) - 1, 1 << 24]  # slices of very unequal size
    symbols = [rng.randrange(4) for _ in range(20000)]
    encoder = CountingEncoder()
    for s in symbols:
        encoder.encode(table[s], table[s + 1], table[-1])
    data = encoder.finish()
    assert encoder.carries > 0
    decoder = RangeDecoder(data)
    assert [decoder.decode(table) for _ in symbols] == symbols


def test_the_empty_message_is_no_bytes():
    assert RangeEncoder().finish() == b""
    one = RangeEncoder()
    one.encode(0, 5, 10)  # the lower half: the number 0 lies in it, and zeros are left out
    assert one.finish() == b""
    assert RangeDecoder(b"").decode([0, 5, 10]) == 0


def test_a_symbol_of_count_zero_cannot_be_coded():
    with pytest.raises(ValueError, match="count 0"):
        RangeEncoder().encode(3, 3, 10)
    with pytest.raises(ValueError):
        RangeEncoder().encode(0, 1, (1 << 32) + 1)


def test_a_number_outside_every_slice_is_reported_as_damage():
    # 3 does not divide 2^64: three slices of step = 2^64 // 3 leave the top 2^64 - 3 step unused.
    with pytest.raises(ValueError, match="damaged"):
        RangeDecoder(b"\xff" * 8).decode([0, 1, 2, 3])
