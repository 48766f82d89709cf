"""Float32 matmuls on oneDNN on CPUs, and `Linear`, a drop-in nn.Linear that uses them.

PyTorch hands float32 matmuls on x86 CPUs to MKL, which on AMD CPUs keeps to its AVX2 code
path; oneDNN, which PyTorch ships as well (it already runs nn.LSTM and bfloat16 matmuls), was
measured much faster there (README, Speed). PyTorch sends float32 matmuls to oneDNN only when
it may lower their precision (`torch.backends.mkldnn` fp32_precision "bf16" or "tf32"), which
would change the model's numerics. The functions here call oneDNN's float32 matmul directly,
forward and backward: the same float32 arithmetic in another summation order (results differ
by a few 1e-7 relative, as between any two BLAS libraries).

    Linear(in, out)           torch.nn.Linear (same parameters, state_dict and repr) on oneDNN
    linear(x, weight, bias)   like torch.nn.functional.linear, differentiable; `Linear.functional`
    mm(a, b)                  like a @ b for matrices, for hand-written backwards

Anything else (CUDA, float64, autocast, torch.compile, a PyTorch without the oneDNN op) goes to
the ordinary torch function, and `shaq.nn.switches.use_onednn` turns the oneDNN path off.
linear's backward is written by hand and is not itself differentiable (no double backward),
which no training loop here needs.
"""

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shaq.nn import switches


def _mm(a: Tensor, b_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """a [M, K] @ b_t.T (+ bias) on oneDNN, with b_t [N, K].

    Transposed views go in as they are: oneDNN reads strides, so nothing is copied into
    another layout first.
    """
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


@cache
def onednn_available() -> bool:
    """Whether this PyTorch has the oneDNN linear op and it computes a @ b.T correctly."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        torch.is_autocast_enabled("cpu")  # the per-device form used below (PyTorch >= 2.4)
        # Its own generator: the first call comes in a model's first forward, and drawing from the
        # global one there would shift the dropout masks of the first run in a process only.
        probe = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, 3, dtype=torch.float64, generator=probe) for n in (5, 4))
        return torch.allclose(_mm(a.float(), b.float()).double(), a @ b.T, atol=1e-5)
    except (AttributeError, RuntimeError, TypeError):
        return False


def _use_onednn(*tensors: Tensor | None) -> bool:
    return (
        switches.use_onednn
        and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)
        and onednn_available()
        and not torch.is_autocast_enabled("cpu")
        and not switches.compiling()
    )


class _Linear(torch.autograd.Function):
    """y = x @ w.T + b with all three matmuls (forward, dx, dw) on oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return _mm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x2, weight = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])  # [M, N]
        dx = _mm(g2, weight.t()).view(ctx.x_shape) if ctx.needs_input_grad[0] else None  # g @ w
        dw = _mm(g2.t(), x2.t()) if ctx.needs_input_grad[1] else None  # g.T @ x
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`torch.nn.functional.linear(x, weight, bias)`, on oneDNN for float32 CPU tensors.

    Shapes: x [..., in], weight [out, in], bias [out] or None -> [..., out].
    """
    if x.numel() > 0 and _use_onednn(x, weight, bias):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b` for 2-D tensors, on oneDNN for float32 CPU tensors. Not differentiable: for
    hand-written backwards (the attention's), which call it under no_grad."""
    if a.numel() > 0 and b.numel() > 0 and _use_onednn(a, b):
        return _mm(a, b.t())
    return a @ b


class Linear(nn.Linear):
    """`torch.nn.Linear` whose float32 CPU matmuls run on oneDNN (same arguments, parameters,
    state_dict and repr), as `shaq.nn.dropout.Dropout` is a drop-in for nn.Dropout."""

    # For a matrix that is not a Linear's own, such as a tied softmax's embedding.
    functional = staticmethod(linear)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
