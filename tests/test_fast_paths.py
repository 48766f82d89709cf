"""The CPU fast paths compute what the plain torch ops compute: oneDNN matmuls, dropout, the
attention core, and the LSTM's precision under CPU autocast."""

import pytest
import torch
import torch.nn.functional as F

import shaq.nn.onednn as onednn
from shaq.nn import switches
from shaq.nn.attention_core import _ExplicitAttention
from shaq.nn.dropout import Dropout, bernoulli_mask, dropout


def grads(fn, *tensors):
    """fn(*tensors) and the gradients of a fixed random projection of it."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    torch.manual_seed(1)
    projection = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)  # same for any dtype
    (out * projection).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("transposed_input", [False, True])
def test_onednn_linear_matches_torch(transposed_input):
    torch.manual_seed(0)
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    x = x.transpose(0, 1) if transposed_input else x  # a non-contiguous input
    w, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    expected, expected_grads = grads(F.linear, x, w, b)
    got, got_grads = grads(onednn.linear, x.float(), w.float(), b.float())
    if onednn.onednn_available():  # it really ran on oneDNN
        assert (
            type(onednn.linear(x.float(), w.float().requires_grad_()).grad_fn).__name__
            == "_LinearBackward"
        )
    assert torch.allclose(got.double(), expected, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert torch.allclose(g.double(), e, atol=1e-5)


def test_onednn_mm_matches_torch_with_transposed_operands():
    torch.manual_seed(0)
    a = torch.randn(6, 4, dtype=torch.float64)
    b = torch.randn(5, 4, dtype=torch.float64)
    for x, y in [(a, b.t()), (a.t().contiguous().t(), b.t().contiguous())]:
        assert torch.allclose(onednn.mm(x.float(), y.float()).double(), x @ y, atol=1e-5)


def test_onednn_falls_back_to_torch_off_the_fast_path(monkeypatch):
    x, w = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(onednn.linear(x, w), F.linear(x, w))  # float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn.linear(x.float(), w.float()).dtype == torch.bfloat16  # autocast's own op
    monkeypatch.setattr(switches, "use_onednn", False)
    xf, wf = x.float().requires_grad_(), w.float()
    assert type(onednn.linear(xf, wf).grad_fn).__name__ != "_LinearBackward"


def test_linear_is_a_drop_in_for_nn_linear():
    """Same parameters, state_dict keys, repr and function as torch.nn.Linear."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(5, 3)
    layer = onednn.Linear(5, 3)
    layer.load_state_dict(plain.state_dict())  # strict: the same keys
    assert list(layer.state_dict()) == ["weight", "bias"] and repr(layer) == repr(plain)
    assert isinstance(layer, torch.nn.Linear)
    x = torch.randn(4, 2, 5)
    assert torch.allclose(layer(x), plain(x), atol=1e-6)
    if onednn.onednn_available():
        assert type(layer(x.requires_grad_()).grad_fn).__name__ == "_LinearBackward"


def test_dropout_mask_has_the_right_rate_and_is_reproducible():
    for keep in (0.9, 0.5, 0.25):
        mask = bernoulli_mask((3_000_000,), keep)  # three chunks, drawn in parallel
        assert abs(mask.float().mean().item() - keep) < 1e-3
    torch.manual_seed(7)
    a = bernoulli_mask((2, 1_500_000), 0.9)
    torch.manual_seed(7)
    b = bernoulli_mask((2, 1_500_000), 0.9)
    assert torch.equal(a, b)
    # Chunks are independent: neighbouring chunks do not repeat each other.
    flat = a.view(-1)
    assert not torch.equal(flat[: 1 << 20], flat[1 << 20 : 2 << 20])


@pytest.mark.parametrize("shape", [(1000, 50), (3, 1_000_000)])  # one chunk, several in threads
def test_dropout_scales_kept_elements_and_routes_the_gradient_through_them(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    y = dropout(x, 0.3)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.7)
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, kept.float() / 0.7)


def test_dropout_is_the_identity_in_eval_and_a_drop_in_for_nn_dropout():
    x = torch.randn(10, 10)
    layer = Dropout(0.5).eval()
    assert torch.equal(layer(x), x) and torch.equal(dropout(x, 0.5, training=False), x)
    assert isinstance(layer, torch.nn.Dropout) and layer.p == 0.5
    with pytest.raises(ValueError):
        dropout(x, 1.5)


def attention_by_autograd(q, kv, p, keep_v, keep_p):
    """The attention core from torch ops, given the dropout masks."""
    T, S = q.shape[1], kv.shape[1]
    v = kv * keep_v / (1 - p) if p > 0 else kv
    allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    weights = (q @ kv.transpose(1, 2)).masked_fill(~allowed, float("-inf")).softmax(-1)
    dropped = weights * keep_p / (1 - p) if p > 0 else weights
    return dropped @ v, weights


@pytest.mark.parametrize("p, frozen", [(0.0, 0), (0.0, 4), (0.3, 0), (0.3, 4)])
def test_attention_core_backward_matches_autograd(p, frozen):
    """The hand-written backward against autograd, with the same dropout masks; the first
    `frozen` key positions get a zero gradient, the others their true one."""
    torch.manual_seed(0)
    B, T, S, d = 2, 5, 11, 8
    q, kv = torch.randn(B, T, d, dtype=torch.float64), torch.randn(B, S, d, dtype=torch.float64)
    g = torch.randn(B, T, d, dtype=torch.float64)
    torch.manual_seed(3)
    (y, weights), (dq, dkv) = run_core(q, kv, g, p, frozen)
    torch.manual_seed(3)  # the same draws, in the order the core makes them
    keep_v = bernoulli_mask(kv.shape, 1 - p) if p > 0 else None
    keep_p = bernoulli_mask((B, T, S), 1 - p) if p > 0 else None
    q_ref, kv_ref = q.clone().requires_grad_(), kv.clone().requires_grad_()
    y_ref, weights_ref = attention_by_autograd(q_ref, kv_ref, p, keep_v, keep_p)
    y_ref.backward(g)
    assert torch.allclose(y, y_ref) and torch.allclose(weights, weights_ref)
    assert torch.allclose(dq, q_ref.grad)
    assert torch.equal(dkv[:, :frozen], torch.zeros(B, frozen, d, dtype=torch.float64))
    assert torch.allclose(dkv[:, frozen:], kv_ref.grad[:, frozen:])


def run_core(q, kv, g, p, frozen):
    q, kv = q.clone().requires_grad_(), kv.clone().requires_grad_()
    y, weights = _ExplicitAttention.apply(q, kv, p, frozen)
    y.backward(g)
    return (y.detach(), weights), (q.grad, kv.grad)


def test_attention_trains_under_bf16_autocast():
    """The attention core computes in float32 whatever autocast hands it."""
    from shaq.nn import SingleHeadAttention

    torch.manual_seed(0)
    attn = SingleHeadAttention(16, dropout=0.1)
    query, kv = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 9, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = attn(query, kv, frozen=4)
    y.float().sum().backward()
    assert torch.isfinite(query.grad).all() and torch.equal(kv.grad[:, :4], torch.zeros(2, 4, 16))


def test_wide_lstm_stays_float32_under_cpu_bf16_autocast(monkeypatch):
    """LSTMs wider than switches.cpu_bf16_lstm_max_hidden run in float32 under CPU autocast,
    computing what they compute without autocast (from the bf16-rounded inputs), state
    included; narrower ones are left to autocast where the CPU has bf16 instructions (oneDNN
    has no bf16 LSTM without them)."""
    from shaq.device import cpu_has_bf16
    from shaq.nn import LSTM, LSTMState

    torch.manual_seed(0)
    narrow = LSTM(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        narrow_dtype = narrow(torch.randn(2, 5, 8))[0].dtype
    assert narrow_dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    monkeypatch.setattr(switches, "cpu_bf16_lstm_max_hidden", 4)
    lstm = LSTM(8, 8)
    x = torch.randn(2, 5, 8)
    state = LSTMState(torch.randn(2, 8), torch.randn(2, 8))
    want, want_state = lstm(x, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_state = lstm(x.bfloat16(), LSTMState(*(s.bfloat16() for s in state)))
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, lstm(x.bfloat16().float(), LSTMState(*(s.bfloat16().float() for s in state)))[0]
    )
    assert torch.allclose(got, want, atol=2e-2) and all(s.dtype == torch.float32 for s in got_state)
    assert torch.allclose(got_state[1], want_state[1], atol=2e-2)
