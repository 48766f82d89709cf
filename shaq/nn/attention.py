"""Merity's single-headed attention with a memory of earlier states.

One head, one matrix: only the query is projected (then layer-normalised). Keys and values
are the stored states themselves, scaled elementwise by learned sigmoid gates. Because keys
and values need no matmul, a long memory (5000 positions in the paper) is cheap to attend
over. The value gate is "over-parameterised": a constant vector pushed through a Linear
layer, which lets it flip sign and, after training, collapses to a plain vector.
Built step by step in the book's chapter "Single-headed attention with memory".
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from shaq.nn.dropout import bernoulli_mask, dropout, masked_scale
from shaq.nn.onednn import compiling, linear, mm


class Overparam(nn.Module):
    """Maps a vector z [d] to sigmoid(f) * tanh(c) where [c, f] = Linear(z), d -> 2d.

    Applied to a constant (sigmoid of a learned vector), so its output is a learned
    vector in (-1, 1) that can change sign; the Linear only reshapes the optimisation.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_model, 2 * d_model)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c, f = self.linear(z).chunk(2, dim=-1)
        return torch.sigmoid(f) * torch.tanh(c)


class SingleHeadAttention(nn.Module):
    """Single-head attention over [memory; current segment], as in SHA-RNN.

    q = LayerNorm(W_q a + b_q) * sigmoid(qs);  k = kv * sigmoid(ks);  v = kv * Overparam(sigmoid(vs))
    y = softmax(q k^T / sqrt(d) + causal mask) v

    No key, value or output projection. The causal mask is aligned to the *end* of the keys:
    query i of the segment sees all memory positions and segment positions <= i.
    Dropout (p = `dropout`) is applied to q and v (not k: a mask on q already reaches the
    dot product), and to the attention probabilities, as in the reference.

    Args:
        d_model: width d of queries, keys and values.
        dropout: dropout probability (the paper's `dropouth`).
        overparam: use the over-parameterised value gate (True in the paper); False uses
            sigmoid(vs) directly.
    """

    def __init__(self, d_model: int, dropout: float = 0.0, overparam: bool = True):
        super().__init__()
        self.d_model = d_model
        self.dropout = dropout
        self.query = nn.Linear(d_model, d_model)
        self.query_norm = nn.LayerNorm(d_model, eps=1e-12)
        # Gate vectors start at zero, i.e. every gate at sigmoid(0) = 0.5.
        self.qs = nn.Parameter(torch.zeros(d_model))
        self.ks = nn.Parameter(torch.zeros(d_model))
        self.vs = nn.Parameter(torch.zeros(d_model))
        self.value_gate = Overparam(d_model) if overparam else None

    def gates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three gate vectors (g_q, g_k, g_v), each [d]."""
        g_v = torch.sigmoid(self.vs)
        if self.value_gate is not None:
            g_v = self.value_gate(g_v)
        return torch.sigmoid(self.qs), torch.sigmoid(self.ks), g_v

    def forward(
        self, query: torch.Tensor, keys_values: torch.Tensor, return_weights: bool = False, *, frozen: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from the segment over memory plus segment.

        Args:
            query: [B, T, d], the (normalised) states of the current segment.
            keys_values: [B, M + T, d], the memory (M earlier positions) followed by the
                T positions of the current segment.
            return_weights: also return the attention probabilities.
            frozen: how many leading positions of keys_values are a detached memory
                (at most M). No gradient is computed for them: it comes back as zeros. With
                a 5000-position memory that skips most of the backward's work for the keys
                and values. Only the CPU path uses it.

        Returns:
            y [B, T, d] and, if asked, weights [B, T, M + T] (after softmax, before dropout).
        """
        B, T, d = query.shape
        S = keys_values.shape[1]
        if S < T:
            raise ValueError(f"keys_values must hold at least the {T} segment positions, got {S}")
        if not 0 <= frozen <= S - T:
            raise ValueError(f"frozen must be in [0, {S - T}] (the memory length), got {frozen}")
        g_q, g_k, g_v = self.gates()
        p = self.dropout if self.training else 0.0
        # The gates are per-channel constants, so they can move to where they are cheapest
        # without changing the function (only the rounding):
        #   q . (kv * g_k) = (q * g_k) . kv  and  q = LN(W a + b) * g_q, so g_q * g_k and the
        #       1/sqrt(d) of the scores scale the query LayerNorm's gain and bias;
        #   P (kv * g_v) = (P kv) * g_v, and dropout(kv * g_v) = dropout(kv) * g_v.
        # The keys are then the memory itself: no [B, M + T, d] product of the (up to 5000
        # positions long) memory is made, and the value gate multiplies only the T outputs.
        scale = g_q * g_k / math.sqrt(d)
        norm = self.query_norm
        q = F.layer_norm(linear(query, self.query.weight, self.query.bias), norm.normalized_shape,
                         norm.weight * scale, norm.bias * scale, norm.eps)  # [B, T, d]
        q = dropout(q, p, self.training)
        if return_weights or (query.device.type == "cpu" and not compiling()):
            y, weights = _ExplicitAttention.apply(q, keys_values, p, frozen)
        else:
            # A head axis makes SDPA pick a fused kernel (flash, memory-efficient): with 3-D
            # inputs it takes the math one. The lower-right causal bias aligns the mask with
            # the end of the keys (query i sees key j when j <= i + M), where is_causal=True
            # would align it with their start, and needs no mask tensor on CUDA.
            v = dropout(keys_values, p, self.training)
            y = F.scaled_dot_product_attention(
                q.unsqueeze(1), keys_values.unsqueeze(1), v.unsqueeze(1),
                attn_mask=causal_lower_right(T, S), dropout_p=p, scale=1.0,
            ).squeeze(1)
            weights = None
        return y.to(query.dtype) * g_v, weights if return_weights else None


class _ExplicitAttention(torch.autograd.Function):
    """y = dropout(softmax(q kv^T + causal mask)) @ dropout(kv), with a hand-written backward.

    q [B, T, d] arrives scaled (gates and 1/sqrt(d) folded in), kv [B, S, d]; dropout p is
    applied to the values and to the probabilities, as in SHA-RNN. Returns y [B, T, d] and
    the probabilities P [B, T, S] before dropout (not differentiable).

    Used for the weights, and always on the CPU. There SDPA's fused (flash) kernel is no
    faster than explicit matmuls, cannot run on oneDNN (`shaq.nn.onednn`, about twice as
    fast as MKL here) and has no dropout, where its math fallback materialises an additive
    mask and a float dropout mask and keeps several [B, T, S] tensors for autograd. Here
    one batch entry at a time is computed into preallocated outputs, the masks are bool,
    and the backward skips the `frozen` leading positions of kv (a detached memory).

    Backward, per batch entry, with V = dropout(kv), Pd = dropout(P) and G = dL/dy:
        dPd = G V^T      dV = Pd^T G      dP = dropout'(dPd)      (the same mask and scale)
        dS = P * (dP - rowsum(dP * P))    (softmax; masked entries have P = 0, so dS = 0)
        dq = dS kv       dkv = dS^T q + dropout'(dV)
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, kv: torch.Tensor, p: float, frozen: int) -> tuple[torch.Tensor, torch.Tensor]:
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
                scores[:, S - T:].masked_fill_(future, float("-inf"))  # query t sees keys <= M + t
                torch.softmax(scores, dim=-1, out=weights[i])
                y[i] = mm(masked_scale(weights[i], keep_p[i], 1 / (1 - p)) if p > 0 else weights[i], v[i])
        ctx.save_for_backward(q, kv, weights, keep_p, keep_v)
        ctx.p, ctx.frozen = p, frozen
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)  # no [B, T, S] zero tensor as the weights' "gradient"
        return y, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor, _grad_weights: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
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
        return (dq.to(q_dtype) if need_q else None), (dkv.to(kv_dtype) if need_kv else None), None, None
