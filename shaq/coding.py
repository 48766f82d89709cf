"""Arithmetic coding with integers: a range coder, and the frequency tables it codes with.

A model that gives the next symbol the probability p can write it in about -log2(p) bits, so a
model at 1.2 bits per byte turns text into 0.15 bytes per byte. Arithmetic coding gets there by
giving every message a number in [0, 1): each symbol narrows an interval to the share of it
that its probability takes, and the output is the shortest string of bytes that pins a number
inside the final interval. Its width is the product of the probabilities, so pinning it takes
-log2 of that product, the sum of the symbols' code lengths, plus at most a byte or two.

Here the interval is integers. The encoder keeps [low, low + range) as 64-bit numbers, the
digits after the bytes it has written; a symbol s of the table c (cumulative counts adding up to
`total`) takes its slice [c_s, c_{s+1}) of it:

    step = range // total;   low += step * c_s;   range = step * (c_{s+1} - c_s)

Once range drops below 2^56, the top byte of low is settled, up to a carry from a later
addition: it is written and the interval widened 256 times. Keeping range >= 2^56 and totals
<= 2^32 leaves step >= 2^24, so the floor division throws away less than 2^-24 of the range.
The decoder keeps the coded number minus low, finds the slice it falls in, and follows the
encoder's steps exactly. Everything is integer arithmetic (Python's ints do not overflow), so
encoder and decoder agree bit for bit whenever their tables do.

The tables come from a model's probabilities through `quantize`: a fixed sequence of float64
and integer operations, so the same probabilities always give the same table, and every symbol
gets a count of at least 1, so no byte is ever impossible to code.

    quantize(probs [K, S]) -> cumulative counts [K, S + 1]
    RangeEncoder().encode(c_low, c_high, total) ... .finish() -> bytes
    RangeDecoder(data).decode(cumulative counts) -> symbol
"""

import bisect
from collections.abc import Sequence

import torch

# Every table from `quantize` adds up to this. One count is the smallest probability a symbol
# can have, 2^-24: the most a single byte can cost is 24 bits, however wrong the model is.
TOTAL = 1 << 24

_WHOLE = 1 << 64  # the interval's width at the start: the whole of [0, 1) after the written bytes
_BOTTOM = 1 << 56  # renormalise below this width: the top byte of low is then settled
_MAX_TOTAL = 1 << 32  # keeps step = range // total >= 2^24, so rounding costs < 2^-24 of the range


def quantize(probs: torch.Tensor, total: int = TOTAL) -> torch.Tensor:
    """Integer cumulative frequency tables for probabilities, every symbol at least one count.

    Each row is normalised in float64, then symbol s gets 1 + floor(p_s * (total - S)) counts;
    what the floors leave over (0 to S counts) goes to the most likely symbol, where it changes
    the probability least. Every step is a fixed sequence of float64 and integer operations,
    so the same probabilities give the same table: an encoder and a decoder that compute the
    same probabilities code with the same table.

    Args:
        probs: [K, S] probabilities (a softmax), or any finite non-negative weights with a
            positive sum in every row; 1 <= S <= 2^16 symbols.
        total: what each table adds up to, S < total <= 2^32.

    Returns:
        [K, S + 1] int64 tensor c on probs' device with c[:, 0] = 0, c[:, S] = total and
        c[:, s] < c[:, s + 1]: symbol s of row k owns the slice [c[k, s], c[k, s + 1]).
    """
    if probs.dim() != 2 or not 1 <= probs.shape[1] <= 1 << 16:
        raise ValueError(
            f"probs must be [K, S] with 1 <= S <= 2^16 symbols, got shape {tuple(probs.shape)}"
        )
    n_symbols = probs.shape[1]
    if not n_symbols < total <= _MAX_TOTAL:
        raise ValueError(
            f"total must be in ({n_symbols}, 2^32] for {n_symbols} symbols, got {total}"
        )
    p = probs.double()
    if not torch.isfinite(p).all() or (p < 0).any() or (p.sum(dim=-1) <= 0).any():
        raise ValueError(
            "probs must be finite and non-negative with a positive sum in every row "
            "(a softmax of the logits): a model whose outputs are NaN or inf cannot "
            "be coded with"
        )
    p = p / p.sum(dim=-1, keepdim=True)
    # The floors sum to at most (total - S) * sum(p), and sum(p) is 1 to within float64 rounding,
    # far less than one count: what is left over is never negative.
    counts = 1 + torch.floor(p * (total - n_symbols)).long()  # [K, S], each >= 1
    left_over = total - counts.sum(dim=-1, keepdim=True)  # [K, 1], in [0, S]
    counts.scatter_add_(-1, p.argmax(dim=-1, keepdim=True), left_over)
    return torch.cat([counts.new_zeros(counts.shape[0], 1), counts.cumsum(dim=-1)], dim=-1)


class RangeEncoder:
    """Writes symbols as bytes, each given as its slice [c_low, c_high) of a table's counts.

    Call `encode` once per symbol, then `finish` once for the bytes.
    """

    def __init__(self):
        # The interval is [low, low + range), in units of 2^-64 after the bytes in `out`.
        self.low = 0
        self.range = _WHOLE
        self.out = bytearray()

    def encode(self, c_low: int, c_high: int, total: int) -> None:
        """Narrow the interval to the slice [c_low, c_high) of `total` counts."""
        if not 0 <= c_low < c_high <= total <= _MAX_TOTAL:
            raise ValueError(
                f"a symbol's slice must satisfy 0 <= low < high <= total <= 2^32, got "
                f"[{c_low}, {c_high}) of {total}: a symbol of count 0 cannot be coded"
            )
        step = self.range // total
        self.low += step * c_low
        self.range = step * (c_high - c_low)
        if self.low >= _WHOLE:  # the addition carried into the bytes already written
            self.low -= _WHOLE
            self._carry()
        while self.range < _BOTTOM:  # low's top byte is settled (up to a later carry): write it
            self.out.append(self.low >> 56)
            self.low = (self.low << 8) & (_WHOLE - 1)
            self.range <<= 8

    def _carry(self) -> None:
        """Add 1 to the written bytes as a base-256 number (0x12, 0xFF, 0xFF -> 0x13, 0, 0).

        It never runs past the first byte: every interval lies inside the one before, and the
        first is [0, 1), so the coded number stays below 1.
        """
        i = len(self.out) - 1
        while self.out[i] == 0xFF:
            self.out[i] = 0
            i -= 1
        self.out[i] += 1

    def finish(self) -> bytes:
        """The coded bytes: those written, and one more that pins a number inside the interval.

        low rounded up to a multiple of 2^56 is inside, since range >= 2^56: its top byte (with
        its carry) is that last byte. The decoder reads zeros past the end, so the trailing
        zero bytes are left out: an empty message is no bytes at all.
        """
        value = -(-self.low >> 56) << 56  # ceil(low / 2^56) * 2^56
        if value >= _WHOLE:
            value -= _WHOLE
            self._carry()
        self.out.append(value >> 56)
        return bytes(self.out.rstrip(b"\0"))


class RangeDecoder:
    """Reads back the symbols a `RangeEncoder` wrote to `data`, given the same tables in order."""

    def __init__(self, data: bytes):
        self.data = data
        self.position = 8  # the next byte of data to read; bytes past its end are zeros
        self.range = _WHOLE
        # The coded number minus the encoder's low, in the same units: always in [0, range).
        self.offset = int.from_bytes(data[:8].ljust(8, b"\0"), "big")

    def decode(self, cumulative: Sequence[int]) -> int:
        """The next symbol, coded with the table `cumulative` (0 = c_0 <= c_1 <= ... <= c_S).

        Raises ValueError when the number falls outside every slice, which no stream a
        RangeEncoder wrote with these tables does: the data is damaged, or the tables differ
        from the encoder's.
        """
        total = cumulative[-1]
        if not 0 < total <= _MAX_TOTAL:
            raise ValueError(f"a table's total must be in [1, 2^32], got {total}")
        step = self.range // total
        target = self.offset // step
        if target >= total:
            raise ValueError(
                "the coded stream is damaged, or was coded with other tables: "
                "its number lies outside the interval"
            )
        symbol = bisect.bisect_right(cumulative, target) - 1  # [c_s, c_{s+1}) holds target
        self.offset -= step * cumulative[symbol]
        self.range = step * (cumulative[symbol + 1] - cumulative[symbol])
        while self.range < _BOTTOM:
            byte = self.data[self.position] if self.position < len(self.data) else 0
            self.offset = (self.offset << 8) | byte
            self.range <<= 8
            self.position += 1
        return symbol
