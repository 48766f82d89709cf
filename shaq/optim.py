"""LAMB with minimum trust, as used to train SHA-RNN.

LAMB (You et al., 2019) is Adam whose step for each tensor is rescaled by a "trust ratio"
||w|| / ||update||, so every tensor moves by a similar *fraction* of its own size. Merity's
variant adds a floor, `min_trust`: tensors with tiny norms (zero-initialised gates and
biases) would otherwise barely move at all. Built step by step in the book's chapter
"LAMB and minimum trust".
"""

from collections.abc import Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class LAMB(Optimizer):
    """LAMB as in Merity's pytorch-lamb fork, per parameter tensor w with gradient g:

        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2        (no bias correction)
        u = m / (sqrt(v) + eps) + weight_decay * w                (decay inside the update)
        trust = min(||w||, max_weight_norm) / ||u||   (1 where either norm is 0)
        trust = max(trust, min_trust)
        w <- w - lr * trust * u

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: decay rates of the first and second moments.
        eps: added to sqrt(v).
        weight_decay: decoupled weight decay, added to the update before its norm is taken.
        min_trust: floor of the trust ratio, in [0, 1); None disables the floor.
        max_weight_norm: clamp of ||w|| in the ratio (10 in the reference).
        adam: force trust = 1, giving Adam without bias correction (for comparison).

    After each step, `state[p]["trust_ratio"]`, `["weight_norm"]` and `["update_norm"]`
    hold that step's values as 0-d tensors (the book plots them).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        min_trust: float | None = 0.25,
        max_weight_norm: float = 10.0,
        adam: bool = False,
    ):
        if not lr >= 0.0:
            raise ValueError(f"LAMB lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB betas must be in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"LAMB eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"LAMB weight_decay must be >= 0, got {weight_decay}")
        if min_trust is not None and not 0.0 <= min_trust < 1.0:
            raise ValueError(f"LAMB min_trust must be in [0, 1) or None, got {min_trust}")
        if not max_weight_norm > 0.0:
            raise ValueError(f"LAMB max_weight_norm must be > 0, got {max_weight_norm}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            min_trust=min_trust,
            max_weight_norm=max_weight_norm,
            adam=adam,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

                update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])

                # Norms stay on the device as 0-d tensors: no host sync per parameter.
                weight_norm = p.norm().clamp(max=group["max_weight_norm"])
                update_norm = update.norm()
                if group["adam"]:
                    trust = torch.ones_like(weight_norm)
                else:
                    either_zero = (weight_norm == 0) | (update_norm == 0)
                    trust = torch.where(
                        either_zero, torch.ones_like(weight_norm), weight_norm / update_norm
                    )
                    if group["min_trust"] is not None:
                        trust = trust.clamp(min=group["min_trust"])
                state["weight_norm"], state["update_norm"], state["trust_ratio"] = (
                    weight_norm,
                    update_norm,
                    trust,
                )
                p.sub_(update.mul_(trust * group["lr"]))
        return loss


def make_optimizer(
    kind: str, params: Iterable[torch.Tensor], lr: float, weight_decay: float, min_trust: float
) -> Optimizer:
    """'lamb': LAMB with minimum trust, the reference's betas (0.9, 0.999) and eps 1e-6; 'adam':
    torch's Adam."""
    if kind == "lamb":
        return LAMB(params, lr=lr, weight_decay=weight_decay, min_trust=min_trust)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'lamb' or 'adam', got {kind!r}")


def linear_warmup(optimizer: Optimizer, warmup: int) -> LambdaLR:
    """The learning rate times min(s + 1, warmup) / warmup at scheduler step s (0-based): linear
    from 1/warmup up to the full rate, then constant; no warmup when warmup is 0."""
    return LambdaLR(optimizer, lambda s: min(s + 1, warmup) / warmup if warmup > 0 else 1.0)
