"""Tests of the building blocks: Boom, single-head attention, QRNN."""

import math

import pytest
import torch
from torch import nn

from shaq.nn import QRNN, Boom, QRNNState, SingleHeadAttention, forget_mult_reference, gelu


def test_gelu_is_the_sigmoid_approximation():
    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(gelu(x), x * torch.sigmoid(1.702 * x))
    # Close to, but not the same as, the erf form.
    assert (gelu(x) - nn.functional.gelu(x)).abs().max() > 1e-3


def test_gelu_gradient_is_the_formulas():
    x = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(gelu(x).sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    (x_ref * torch.sigmoid(1.702 * x_ref)).sum().backward()
    assert torch.allclose(grad, x_ref.grad)


def test_boom_sums_chunks_instead_of_projecting_down():
    torch.manual_seed(0)
    boom = Boom(8, expansion=4)
    x = torch.randn(2, 5, 8)
    u = gelu(boom.up(x))  # [2, 5, 32]
    expected = u[..., 0:8] + u[..., 8:16] + u[..., 16:24] + u[..., 24:32]
    assert torch.allclose(boom(x), expected, atol=1e-6)
    assert sum(p.numel() for p in boom.parameters()) == 8 * 32 + 32


def test_boom_without_shortcut_is_an_ordinary_ffn():
    torch.manual_seed(0)
    boom = Boom(8, expansion=4, shortcut=False)
    x = torch.randn(2, 5, 8)
    assert torch.allclose(boom(x), boom.down(gelu(boom.up(x))), atol=1e-6)
    assert sum(p.numel() for p in boom.parameters()) == (8 * 32 + 32) + (32 * 8 + 8)


def manual_attention(attn: SingleHeadAttention, query, kv):
    """Merity's attention written out with explicit loops over queries, for comparison."""
    g_q = torch.sigmoid(attn.qs)
    g_k = torch.sigmoid(attn.ks)
    c, f = attn.value_gate.linear(torch.sigmoid(attn.vs)).chunk(2)
    g_v = torch.sigmoid(f) * torch.tanh(c)
    q = attn.query_norm(attn.query(query)) * g_q
    k, v = kv * g_k, kv * g_v
    B, T, d = query.shape
    M = kv.shape[1] - T
    out = torch.zeros(B, T, d)
    weights = torch.zeros(B, T, M + T)
    for i in range(T):
        visible = M + i + 1  # all memory plus segment positions 0..i
        s = (k[:, :visible] @ q[:, i].unsqueeze(-1)).squeeze(-1) / math.sqrt(d)  # [B, visible]
        p = s.softmax(-1)
        weights[:, i, :visible] = p
        out[:, i] = (p.unsqueeze(-1) * v[:, :visible]).sum(1)
    return out, weights


@pytest.mark.parametrize("memory", [0, 7])
def test_attention_matches_a_manual_loop(memory):
    torch.manual_seed(0)
    attn = SingleHeadAttention(16).eval()
    with torch.no_grad():  # non-trivial gates
        attn.qs.normal_()
        attn.ks.normal_()
        attn.vs.normal_()
    query = torch.randn(3, 5, 16)
    kv = torch.randn(3, memory + 5, 16)
    expected_y, expected_w = manual_attention(attn, query, kv)
    y_fast, none = attn(query, kv)
    y_slow, w = attn(query, kv, return_weights=True)
    assert none is None
    assert torch.allclose(y_fast, expected_y, atol=1e-5)
    assert torch.allclose(y_slow, expected_y, atol=1e-5)
    assert torch.allclose(w, expected_w, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(3, 5))


def test_attention_gates_start_at_one_half_and_value_gate_can_flip_sign():
    attn = SingleHeadAttention(8)
    g_q, g_k, g_v = attn.gates()
    assert torch.equal(g_q, torch.full((8,), 0.5)) and torch.equal(g_k, torch.full((8,), 0.5))
    with torch.no_grad():
        attn.value_gate.linear.weight.zero_()
        attn.value_gate.linear.bias.copy_(torch.cat([-torch.ones(8), torch.ones(8)]))
    assert (attn.gates()[2] < 0).all()


def test_attention_without_overparam_uses_the_plain_sigmoid_gate():
    attn = SingleHeadAttention(8, overparam=False)
    assert attn.value_gate is None
    assert torch.equal(attn.gates()[2], torch.full((8,), 0.5))


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    attn = SingleHeadAttention(16, dropout=0.5)
    query, kv = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    attn.train()
    a, _ = attn(query, kv)
    b, _ = attn(query, kv)
    assert not torch.allclose(a, b)
    attn.eval()
    a, _ = attn(query, kv)
    b, _ = attn(query, kv)
    assert torch.equal(a, b)


def qrnn_by_hand(layer: QRNN, x, c0=None, x_prev=None):
    """The QRNN equations step by step, in the paper's convention."""
    B, T, _ = x.shape
    H = layer.hidden_size
    W, b = layer.gates.weight, layer.gates.bias
    c = torch.zeros(B, H) if c0 is None else c0
    prev = torch.zeros(B, layer.input_size) if x_prev is None else x_prev
    hs = []
    for t in range(T):
        inp = x[:, t] if layer.window == 1 else torch.cat([x[:, t], prev], -1)
        z, f, o = (inp @ W.T + b).chunk(3, -1)
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        c = f * c + (1 - f) * z
        hs.append(o * c)
        prev = x[:, t]
    return torch.stack(hs, 1), c


@pytest.mark.parametrize("window", [1, 2])
def test_qrnn_matches_its_equations_and_streams(window):
    torch.manual_seed(0)
    layer = QRNN(6, 10, window=window)
    x = torch.randn(3, 9, 6)
    c0 = torch.randn(3, 10)
    h, (c_last, x_last) = layer(x, QRNNState(c0, None))
    h_ref, c_ref = qrnn_by_hand(layer, x, c0)
    assert h.shape == (3, 9, 10) and c_last.shape == (3, 10)
    assert torch.allclose(h, h_ref, atol=1e-5) and torch.allclose(c_last, c_ref, atol=1e-5)
    assert torch.equal(x_last, x[:, -1])
    # Two segments with the carried state (the cell and the last input) equal one call.
    h1, state = layer(x[:, :4], QRNNState(c0, None))
    h2, (c2, _) = layer(x[:, 4:], state)
    assert torch.allclose(torch.cat([h1, h2], 1), h, atol=1e-5)
    assert torch.allclose(c2, c_last, atol=1e-5)


def test_qrnn_f_pooling_returns_the_cell():
    torch.manual_seed(0)
    layer = QRNN(4, 5, output_gate=False)
    x = torch.randn(2, 3, 4)
    h, (c_last, _) = layer(x)
    z, f = layer.gates(x).chunk(2, -1)
    assert torch.allclose(h, forget_mult_reference(torch.sigmoid(f), torch.tanh(z)), atol=1e-6)
    assert torch.equal(h[:, -1], c_last)


def test_qrnn_rejects_other_windows():
    with pytest.raises(ValueError, match="window"):
        QRNN(4, 4, window=3)
