"""Forget-mult: the QRNN's f-pooling recurrence c_t = f_t * c_{t-1} + (1 - f_t) * z_t.

(Initial version: `forget_mult` calls the reference; a fast path follows.)
"""

from typing import Optional

import torch
from torch import Tensor


def forget_mult_reference(f: Tensor, z: Tensor, c0: Optional[Tensor] = None) -> Tensor:
    """Plain Python loop over time. f, z: [B, T, H]; c0: [B, H] or None (zeros). Returns c: [B, T, H]."""
    c = torch.zeros_like(z[:, 0]) if c0 is None else c0
    cs = []
    for f_t, z_t in zip(f.unbind(1), z.unbind(1)):
        c = f_t * c + (1 - f_t) * z_t
        cs.append(c)
    return torch.stack(cs, dim=1)


def forget_mult(f: Tensor, z: Tensor, c0: Optional[Tensor] = None) -> Tensor:
    """c_t = f_t * c_{t-1} + (1 - f_t) * z_t. f, z: [B, T, H]; c0: [B, H] or None. Returns c: [B, T, H]."""
    return forget_mult_reference(f, z, c0)
