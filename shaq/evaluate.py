"""Bits per byte: how a byte-level model is scored, by the reference's protocol (Merity 2019).

The text is laid out as `batch_size` rows (`shaq.data.batchify`) and read left to right in
segments of `bptt` bytes, in eval mode, with the recurrent state and the attention memory carried
from one segment to the next. The mean cross-entropy over every predicted byte, in nats, divided
by ln 2 is the score in bits per byte (bpb).

    bpb = evaluate(model, corpus.test, batch_size=8, bptt=1024)

Dynamic evaluation (`evaluate_dynamic`) lets the model keep learning from the bytes it has
scored; its figure answers another question and is always reported apart, labelled.
"""

import bz2
import lzma
import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from shaq.data import batchify, get_segment
from shaq.device import Distributed, all_reduce_sum, mixed_precision

LN2 = math.log(2)


class NonFiniteError(ValueError):
    """`evaluate` got a NaN or infinite loss: the weights are damaged or diverged, so there is no
    result."""


@torch.no_grad()
def _sum_nats(
    model: nn.Module, columns: torch.Tensor, bptt: int, amp_dtype: torch.dtype | None
) -> tuple[float, int]:
    """Total cross-entropy in nats over columns [B, N] and the number of bytes it predicted
    (B * (N - 1)).

    Walks fixed segments of `bptt` (the last one shorter) in eval mode, carrying state and
    memory from one to the next; both start empty.
    """
    if columns.size(0) == 0:  # a process with no rows of a small evaluation batch
        return 0.0, 0
    device = columns.device
    was_training = model.training
    model.eval()
    try:
        state, sums = None, []
        for pos in range(0, columns.size(1) - 1, bptt):
            inputs, targets = get_segment(columns, pos, bptt)
            with mixed_precision(device, amp_dtype):
                out = model(inputs, state=state, targets=targets)
            sums.append(
                out.loss.float() * targets.numel()
            )  # mean -> sum: weights each segment by its size
            state = out.state
        # Sum in float64 on the CPU: millions of bytes, and one device sync for the whole pass.
        return torch.stack(sums).cpu().double().sum().item(), columns.size(0) * (
            columns.size(1) - 1
        )
    finally:
        model.train(was_training)


def bits_per_byte(
    model: nn.Module,
    rows: torch.Tensor,
    bptt: int,
    amp_dtype: torch.dtype | None,
    info: Distributed,
) -> float:
    """Bits per byte over the rows [B / world, N] of all processes, each passing its own (as the
    trainer validates): the sums of nats and of bytes are added up over the processes. A NaN or
    infinite loss gives a NaN or infinite result."""
    nats, count = _sum_nats(model, rows, bptt, amp_dtype)
    if info.enabled:
        totals = torch.tensor([nats, count], dtype=torch.float64, device=rows.device)
        nats, count = all_reduce_sum(totals, info).tolist()
    return nats / count / LN2


def evaluate(
    model: nn.Module,
    data: torch.Tensor,
    batch_size: int = 8,
    bptt: int = 1024,
    max_bytes: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Bits per byte of `model` on `data` [n] (bytes), the reference's protocol.

    The data (or its first `max_bytes`) is batchified into `batch_size` rows; segments of `bptt`
    are read in order with the state and attention memory carried across, in eval mode; the
    mean cross-entropy over all predicted bytes (each segment weighted by its length) is
    divided by ln 2. (The reference divides the sum by N instead of N - 1 per row, a
    difference of 1/N.) More rows mean more cold starts and a slightly worse number: the
    reference tests with 8.

    Raises NonFiniteError when the loss is NaN or infinite: no number of bits per byte is
    right then, and a `nan` printed as a result would pass for one.
    """
    device = next(model.parameters()).device
    columns = batchify(data[:max_bytes], batch_size).to(device)
    nats, count = _sum_nats(model, columns, bptt, amp_dtype)
    bpb = nats / count / LN2
    if not math.isfinite(bpb):
        raise NonFiniteError(
            f"the weights give a non-finite loss ({bpb} bits per byte on {count:,} predicted "
            "bytes): they are damaged or diverged. Evaluate the run's other checkpoint (best.pt / "
            "last.pt), or retrain with a lower --lr or --clip"
        )
    return bpb


# ----------------------------------------------------------------------------- dynamic evaluation


@dataclass(frozen=True)
class DynamicEval:
    """How dynamic evaluation adapts the weights to the text it scores (Krause et al., 2018).

    After scoring each segment the model takes one optimizer step on that segment's loss: it
    learns from bytes already scored, never from bytes not yet scored, the way an adaptive
    compressor (xz, NNCP) learns from the file it reads. Krause et al. normalise SGD by gradient
    statistics of the training data and pull the weights back toward the trained ones; we use
    Adam, whose running statistics come from the evaluation stream itself, and the same pull
    (`decay`, the fraction of the way back per step) [ours: the optimizer].
    """

    lr: float = 1e-4  # Adam's step size on the evaluation stream
    decay: float = (
        0.0  # per step, move the weights this fraction of the way back to the trained ones
    )

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"dynamic evaluation needs lr > 0, got {self.lr}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"dynamic evaluation needs decay in [0, 1), got {self.decay}")


def dynamic_byte_nats(
    model: nn.Module,
    data: torch.Tensor,
    bptt: int,
    settings: DynamicEval = DynamicEval(),
    amp_dtype: torch.dtype | None = None,
    rows: int = 1,
) -> torch.Tensor:
    """nats [rows, n / rows - 1] (float64): the cross-entropy of every byte after the first of each
    row, under dynamic evaluation.

    `data` [n] is laid out as `rows` streams (`batchify`, as `evaluate` does) read together in
    segments of `bptt`, in eval mode (no dropout), with state and memory carried: a segment of
    every row is scored with the weights as they are, then the weights take one step on that
    segment's loss. So the score of byte t of a row depends only on the bytes before t of that row
    and on earlier segments of the others, all scored already: with one row, on the bytes before t.
    The model's weights are restored before returning.
    """
    device = next(model.parameters()).device
    columns = batchify(data, rows).to(device)  # [rows, n / rows]
    params = [p for p in model.parameters() if p.requires_grad]
    trained = {name: t.detach().clone() for name, t in model.state_dict().items()}
    anchors = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    was_training = model.training
    model.eval()
    try:
        state, nats = None, []
        for pos in range(0, columns.size(1) - 1, bptt):
            inputs, targets = get_segment(columns, pos, bptt)  # [rows, T] each
            with mixed_precision(device, amp_dtype):
                out = model(inputs, state=state)
            losses = nn.functional.cross_entropy(
                out.logits.float().transpose(1, 2), targets, reduction="none"
            )  # [rows, T]
            nats.append(losses.detach().double())
            losses.mean().backward()  # scored already: now learn from it
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if settings.decay:
                with torch.no_grad():
                    for p, anchor in zip(params, anchors, strict=True):
                        p.lerp_(anchor, settings.decay)
            state = out.state.map(torch.Tensor.detach)
        return torch.cat(nats, dim=1).cpu() if nats else torch.zeros(rows, 0, dtype=torch.float64)
    finally:
        model.load_state_dict(trained)
        model.train(was_training)


def evaluate_dynamic(
    model: nn.Module,
    data: torch.Tensor,
    bptt: int = 1024,
    max_bytes: int | None = None,
    settings: DynamicEval = DynamicEval(),
    amp_dtype: torch.dtype | None = None,
    rows: int = 1,
) -> float:
    """Bits per byte of `model` on `data` [n] (or its first `max_bytes`) read as `rows` streams
    under dynamic evaluation (`dynamic_byte_nats`). Not comparable with `evaluate`'s static
    figure: report it apart, labelled. The model is left as it was."""
    nats = dynamic_byte_nats(model, data[:max_bytes], bptt, settings, amp_dtype, rows)
    bpb = nats.sum().item() / max(nats.numel(), 1) / LN2
    if not math.isfinite(bpb):
        raise NonFiniteError(
            f"dynamic evaluation gives a non-finite loss ({bpb} bits per byte on {nats.numel():,} "
            "bytes): lower its lr, or check the weights with a static evaluation first"
        )
    return bpb


# ----------------------------------------------------------------------------- yardsticks


def compressor_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte of the standard library's compressors at their strongest settings on `data`:
    the yardsticks that give a model's bpb on the same bytes its meaning. (Each figure counts the
    compressor's header too, a few bytes.)"""
    sizes = {
        "zlib -9": len(zlib.compress(data, 9)),
        "bz2 -9": len(bz2.compress(data, 9)),
        "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8 * size / len(data) for name, size in sizes.items()}
