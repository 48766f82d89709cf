"""SHA-RNN's GELU, x * sigmoid(1.702 x), computed fast.

Written out, the formula is three passes over the tensor forward (scale, sigmoid, multiply) and
a longer chain of them backward, keeping x, 1.702 x and the sigmoid for it. torch has no op for
it, but two fused ops compute exactly what is needed, each in one pass:

    softplus's backward, with beta = 1.702:  softplus_backward(g, x) = g * sigmoid(1.702 x),
        so with g = x it is the forward, x * sigmoid(1.702 x);
    silu's backward:  silu_backward(g, u) = g * silu'(u), and d/dx [x * sigmoid(1.702 x)]
        = silu'(1.702 x), since x * sigmoid(1.702 x) = silu(1.702 x) / 1.702.

`gelu` runs on them (measured faster on the CPU than the formula written out, see the README's
Speed section) and keeps only x for the backward.
"""

import torch
from torch import Tensor

from shaq.nn import switches

_SCALE = 1.702  # sigmoid(1.702 x) approximates the normal CDF Phi(x)
# Where softplus's backward returns g itself: sigmoid(1.702 x) rounds to 1 there, even in float64.
_THRESHOLD = 40.0


def gelu(x: Tensor) -> Tensor:
    """The sigmoid approximation GELU(x) = x * sigmoid(1.702 x) used by SHA-RNN.

    Not the erf or tanh form of `torch.nn.functional.gelu`: the published bits per byte
    were obtained with this one, so we keep it.
    """
    if switches.compiling():  # the compiler fuses the formula itself
        return x * torch.sigmoid(_SCALE * x)
    return _SigmoidGELU.apply(x)


class _SigmoidGELU(torch.autograd.Function):
    """x * sigmoid(1.702 x) forward and silu'(1.702 x) backward, one fused op each (see above)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.ops.aten.softplus_backward(x, x, _SCALE, _THRESHOLD)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, x * _SCALE)
