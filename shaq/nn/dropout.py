"""Dropout whose random mask is cheap to draw on the CPU.

`torch.nn.functional.dropout` draws its mask on the CPU with `bernoulli_`, which (outside
Intel CPUs, where it can use MKL) runs on one thread, one Mersenne-twister draw and one float
comparison per element, plus a division and a multiplication pass. SHA-RNN drops out a lot:
at the paper's shape about 630 million elements per training step (the attention's [T, M + T]
probabilities and its [M + T, d] values, the Boom's 4d-wide hidden layer, every block's
output), so drawing masks that way was measured to take a large share of a CPU step.

Here one 64-bit draw of torch's generator (`random_`) gives two 32-bit uniform integers,
and an element is kept when its integer falls below round((1 - p) * 2^32): Bernoulli(1 - p)
to within 2^-32 in the probability (bernoulli_ compares a 24-bit uniform, so this is the
finer of the two). The mask is drawn in fixed chunks (`shaq.nn.switches.dropout_chunk`
elements, 2^20 by default), each from its own generator seeded by the global one, spread
over `torch.get_num_threads()` Python threads (torch releases the GIL inside its ops).
Results are therefore reproducible under `torch.manual_seed`, whatever the number of
threads. The mask is kept for the backward as bool, one byte per element instead of
F.dropout's four, and applied chunk by chunk (`masked_scale`).

Tensors of at most one chunk, other devices (CUDA has a fused dropout kernel), inference
and torch.compile use F.dropout: there the set-up would cost more than it saves, or the
compiler generates its own.
"""

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shaq.nn import switches

_pools: dict[int, ThreadPoolExecutor] = {}


def _threads() -> ThreadPoolExecutor:
    """A pool with as many threads as torch uses (created once per thread count)."""
    n = torch.get_num_threads()
    if n not in _pools:
        _pools[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="shaq-dropout")
    return _pools[n]


def _for_each_chunk(n: int, chunk: int, fn) -> None:
    """fn(0), ..., fn(n_chunks - 1) for the chunks of n elements, on the thread pool if several."""
    n_chunks = max(-(-n // chunk), 1)
    if n_chunks == 1:
        fn(0)
    else:
        list(_threads().map(fn, range(n_chunks)))


def bernoulli_mask(
    shape: torch.Size | tuple[int, ...], keep: float, device: torch.device | str = "cpu"
) -> Tensor:
    """A bool tensor of `shape` whose elements are True with probability `keep`.

    On the CPU the draws come from the global CPU generator (a single draw per chunk seeds
    that chunk's generator), so `torch.manual_seed` makes the mask reproducible. Elsewhere
    this is the device's own bernoulli_.
    """
    mask = torch.empty(shape, dtype=torch.bool, device=device)
    chunk = switches.dropout_chunk
    if mask.device.type != "cpu" or mask.numel() <= chunk:
        return mask.bernoulli_(keep)  # small: not worth the set-up
    flat = mask.view(-1)
    seeds = torch.randint(0, 2**62, (max(-(-flat.numel() // chunk), 1),)).tolist()
    # Signed 32-bit uniforms u in [-2^31, 2^31): keep when u < threshold, with
    # P(keep) = (threshold + 2^31) / 2^32 = round(keep * 2^32) / 2^32.
    threshold = round(keep * 2**32) - 2**31

    @torch.no_grad()
    def draw(i: int) -> None:
        out = flat[i * chunk : (i + 1) * chunk]
        bits = torch.empty((out.numel() + 1) // 2, dtype=torch.int64)
        # from/to span all 64 bits (to is exclusive, so one value in 2^64 never occurs).
        bits.random_(-(2**63), 2**63 - 1, generator=torch.Generator().manual_seed(seeds[i]))
        torch.lt(bits.view(torch.int32)[: out.numel()], threshold, out=out)

    _for_each_chunk(flat.numel(), chunk, draw)
    return mask


def masked_scale(x: Tensor, mask: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """x * mask * scale for a bool mask of x's shape; out, if given, is contiguous (may be x).

    On the CPU, multiplying by a bool tensor directly makes torch convert it element by
    element in a slow, unvectorised loop (measured several times slower than a float
    multiply). Here each chunk of the mask becomes a small float tensor {0, scale} that stays
    in cache, and the chunks run on the thread pool.
    """
    chunk = switches.dropout_chunk
    if x.device.type != "cpu" or x.numel() <= chunk:
        return torch.mul(x, mask, out=out).mul_(scale)
    x, mask = x.contiguous(), mask.contiguous()
    out = torch.empty_like(x) if out is None else out
    xs, ms, outs = x.view(-1), mask.view(-1), out.view(-1)

    @torch.no_grad()  # grad mode is per thread: the pool's threads must not record
    def apply(i: int) -> None:
        part = slice(i * chunk, (i + 1) * chunk)
        torch.mul(xs[part], ms[part].to(x.dtype).mul_(scale), out=outs[part])

    _for_each_chunk(xs.numel(), chunk, apply)
    return out


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        mask = bernoulli_mask(x.shape, 1.0 - p)
        ctx.save_for_backward(mask)
        ctx.scale = 1.0 / (1.0 - p)
        return masked_scale(x, mask, ctx.scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return masked_scale(grad, mask, ctx.scale), None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """`torch.nn.functional.dropout(x, p, training)`, with the fast mask on the CPU."""
    small = x.numel() <= switches.dropout_chunk
    if not training or not 0.0 < p < 1.0 or x.device.type != "cpu" or small or switches.compiling():
        return F.dropout(x, p, training)  # also raises for a p outside [0, 1]
    return _Dropout.apply(x, p)


class Dropout(nn.Dropout):
    """`torch.nn.Dropout` using `dropout` above (same arguments, state and repr)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
