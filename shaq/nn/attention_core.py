"""The core of SHA-RNN's attention, computed fast: gates, softmax, weighted sum.

    y = softmax(dropout(q * g_q) (kv * g_k)^T / sqrt(d) + causal mask) dropout(kv * g_v)

`gated_attention` computes this for `shaq.nn.SingleHeadAttention` (the probabilities are
dropped out too). The gates are per-channel constants, so they move to where they are
cheapest without changing the function (only the rounding):

    (q * g_q) . (kv * g_k) = (q * g_q * g_k) . kv   the query takes both gates and 1/sqrt(d),
                                                     one multiply of [B, T, d];
    P (kv * g_v) = (P kv) * g_v                      the value gate multiplies the T outputs,
    dropout(kv * g_v) = dropout(kv) * g_v            and commutes with the values' dropout.

The keys and values are then the memory itself: no [B, M + T, d] product of the (up to 5000
positions long) memory is made, and a detached memory (`frozen`) needs no gradient at all.

On the CPU the rest runs in `_ExplicitAttention`, with a hand-written backward; elsewhere (and
under torch.compile) in `torch.nn.functional.scaled_dot_product_attention`.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from shaq.nn import switches
from shaq.nn.dropout import bernoulli_mask, dropout, masked_scale
from shaq.nn.onednn import mm


def gated_attention(
    q: Tensor,
    kv: Tensor,
    g_q: Tensor,
    g_k: Tensor,
    g_v: Tensor,
    p: float = 0.0,
    frozen: int = 0,
    return_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """softmax(dropout(q * g_q) (kv * g_k)^T / sqrt(d) + causal mask) dropout(kv * g_v), dropout p
    also on the probabilities, with query i of the T seeing every key up to position S - T + i.

    Args:
        q: [B, T, d] queries before their gate.
        kv: [B, S, d] keys and values before their gates, S >= T.
        g_q, g_k, g_v: [d] the query, key and value gates.
        p: dropout probability (0 in evaluation: nothing is dropped).
        frozen: how many leading positions of kv are a detached memory: their gradient is
            not computed and comes back as zeros (CPU path).
        return_weights: also return the probabilities [B, T, S] (before dropout).

    Returns:
        y [B, T, d] in q's dtype, and the probabilities or None.
    """
    T, d, S, dtype = q.shape[1], q.shape[2], kv.shape[1], q.dtype
    q = q * (g_q * g_k / math.sqrt(d))
    if p > 0:
        q = dropout(q, p)
    if return_weights or (q.device.type == "cpu" and not switches.compiling()):
        y, weights = _ExplicitAttention.apply(q, kv, p, frozen)
    else:
        # A head axis makes SDPA pick a fused kernel (flash, memory-efficient): with 3-D
        # inputs it takes the math one. The lower-right causal bias aligns the mask with
        # the end of the keys (query i sees key j when j <= i + M), where is_causal=True
        # would align it with their start, and needs no mask tensor on CUDA.
        v = dropout(kv, p) if p > 0 else kv
        y = F.scaled_dot_product_attention(
            q.unsqueeze(1),
            kv.unsqueeze(1),
            v.unsqueeze(1),
            attn_mask=causal_lower_right(T, S),
            dropout_p=p,
            scale=1.0,
        ).squeeze(1)
        weights = None
    return y.to(dtype) * g_v, weights if return_weights else None


class _ExplicitAttention(torch.autograd.Function):
    """y = dropout(softmax(q kv^T + causal mask)) @ dropout(kv), with a hand-written backward.

    q [B, T, d] arrives scaled (key gate and 1/sqrt(d) folded in), kv [B, S, d]; dropout p is
    applied to the values and to the probabilities, as in SHA-RNN. Returns y [B, T, d] and
    the probabilities P [B, T, S] before dropout (not differentiable).

    Used for the weights, and always on the CPU. There SDPA's fused (flash) kernel was measured
    no faster than explicit matmuls, cannot run on oneDNN (`shaq.nn.onednn`) and has no
    dropout, where its math fallback materialises an additive mask and a float dropout mask
    and keeps several [B, T, S] tensors for autograd. Here one batch entry at a time is
    computed into preallocated outputs, the masks are bool, and the backward skips the
    `frozen` leading positions of kv (a detached memory).

    Backward, per batch entry, with V = dropout(kv), Pd = dropout(P) and G = dL/dy:
        dPd = G V^T      dV = Pd^T G      dP = dropout'(dPd)      (the same mask and scale)
        dS = P * (dP - rowsum(dP * P))    (softmax; masked entries have P = 0, so dS = 0)
        dq = dS kv       dkv = dS^T q + dropout'(dV)
    """

    @staticmethod
    def forward(ctx, q: Tensor, kv: Tensor, p: float, frozen: int) -> tuple[Tensor, Tensor]:
        # At least float32 (a softmax over thousands of keys needs it), also under autocast.
        ctx.dtypes = q.dtype, kv.dtype
        dtype = torch.promote_types(torch.promote_types(q.dtype, kv.dtype), torch.float32)
        q, kv = q.to(dtype), kv.to(dtype)
        B, T, _ = q.shape
        S = kv.shape[1]
        keep_v = bernoulli_mask(kv.shape, 1 - p, kv.device) if p > 0 else None
        keep_p = bernoulli_mask((B, T, S), 1 - p, q.device) if p > 0 else None
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
        weights, y = q.new_empty(B, T, S), torch.empty_like(q)
        with torch.autocast(q.device.type, enabled=False):
            v = masked_scale(kv, keep_v, 1 / (1 - p)) if p > 0 else kv
            for i in range(B):
                scores = mm(q[i], kv[i].t())  # [T, S]
                scores[:, S - T :].masked_fill_(future, float("-inf"))  # query t sees keys <= M + t
                torch.softmax(scores, dim=-1, out=weights[i])
                y[i] = mm(
                    masked_scale(weights[i], keep_p[i], 1 / (1 - p)) if p > 0 else weights[i], v[i]
                )
        ctx.save_for_backward(q, kv, weights, keep_p, keep_v)
        ctx.p, ctx.frozen = p, frozen
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)  # no [B, T, S] zero tensor as the weights' "gradient"
        return y, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor, _grad_weights: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad_y is None:  # y unused (only the weights were): nothing to propagate
            return None, None, None, None
        q, kv, weights, keep_p, keep_v = ctx.saved_tensors
        p, n = ctx.p, ctx.frozen
        scale = 1 / (1 - p)
        v = masked_scale(kv, keep_v, scale) if p > 0 else kv
        need_q, need_kv = ctx.needs_input_grad[:2]
        dq = torch.empty_like(q) if need_q else None
        dkv = torch.empty_like(kv) if need_kv else None
        if need_kv:
            dkv[:, :n].zero_()  # the frozen memory's gradient
        for i in range(q.shape[0]):
            g, P = grad_y.select(0, i), weights[i]
            dP = mm(g, v[i].t())  # [T, S]
            if p > 0:
                masked_scale(dP, keep_p[i], scale, out=dP)
            dS = dP.sub_((dP * P).sum(dim=-1, keepdim=True)).mul_(P)
            if need_q:
                dq[i] = mm(dS, kv[i])
            if need_kv:
                Pd = masked_scale(P, keep_p[i], scale) if p > 0 else P
                dv = mm(Pd[:, n:].t(), g)  # [S - n, d]
                if p > 0:
                    masked_scale(dv, keep_v[i, n:], scale, out=dv)
                dkv[i, n:] = mm(dS[:, n:].t(), q[i]).add_(dv)
        q_dtype, kv_dtype = ctx.dtypes
        return (
            (dq.to(q_dtype) if need_q else None),
            (dkv.to(kv_dtype) if need_kv else None),
            None,
            None,
        )
