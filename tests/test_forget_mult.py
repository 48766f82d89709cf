"""Tests for shaq.nn.forget_mult: the reference loop, the fast Function (C++ extension and
pure-torch fallback) and the fused qrnn_pool."""

import importlib

import pytest
import torch

from shaq.nn import switches

# The module, not the function that shaq.nn re-exports under the same name.
fm = importlib.import_module("shaq.nn.forget_mult")


@pytest.fixture(params=["ext", "steps", "chunked"])
def impl(request, monkeypatch) -> str:
    """Run the test through the C++ extension and through both pure-torch paths: one op per
    time step (the CPU's) and the chunked scan (what CUDA and MPS use)."""
    probe = torch.zeros(1)
    if request.param == "ext":
        if not switches.use_extension:
            pytest.skip("extension disabled (SHAQ_NO_EXT=1)")
        if fm._load_extension() is None:
            pytest.skip("C++ extension unavailable (see the warning)")
        assert fm._extension_for(probe) is not None
    else:
        monkeypatch.setattr(switches, "use_extension", False)
        monkeypatch.setattr(switches, "scan_mode", request.param)
        assert fm._extension_for(probe) is None and fm._chunked(probe) == (
            request.param == "chunked"
        )
    return request.param


def _inputs(B: int, T: int, H: int, dtype=torch.float32, noncontiguous: bool = False):
    """Random f in (0, 1), z, c0, each a leaf requiring grad."""
    if noncontiguous:  # transposed f, strided z, transposed c0
        f = torch.rand(B, H, T, dtype=dtype).transpose(1, 2)
        z = torch.randn(B, T, 2 * H, dtype=dtype)[..., ::2]
        c0 = torch.randn(H, B, dtype=dtype).t()
        if min(B, T, H) > 1:  # with a size-1 dim a transpose can still count as contiguous
            assert not (f.is_contiguous() or z.is_contiguous() or c0.is_contiguous())
    else:
        f, z, c0 = (
            torch.rand(B, T, H, dtype=dtype),
            torch.randn(B, T, H, dtype=dtype),
            torch.randn(B, H, dtype=dtype),
        )
    return [x.requires_grad_() for x in (f, z, c0)]


def _value_and_grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> wrt inputs (None if unused)."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return out.detach(), grads


def test_reference_matches_hand_unrolled():
    torch.manual_seed(0)
    f, z, c0 = (x.detach() for x in _inputs(2, 3, 4))
    c1 = f[:, 0] * c0 + (1 - f[:, 0]) * z[:, 0]
    c2 = f[:, 1] * c1 + (1 - f[:, 1]) * z[:, 1]
    c3 = f[:, 2] * c2 + (1 - f[:, 2]) * z[:, 2]
    torch.testing.assert_close(fm.forget_mult_reference(f, z, c0), torch.stack([c1, c2, c3], dim=1))
    # Without c0 the first step is (1 - f_0) * z_0.
    torch.testing.assert_close(fm.forget_mult_reference(f, z)[:, 0], (1 - f[:, 0]) * z[:, 0])


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 1, 5), (1, 9, 3), (3, 17, 33)])
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("with_c0", [False, True])
def test_forget_mult_matches_reference(impl, shape, noncontiguous, with_c0):
    torch.manual_seed(1)
    f, z, c0 = _inputs(*shape, noncontiguous=noncontiguous)
    inputs = [f, z, c0] if with_c0 else [f, z]
    grad_out = torch.randn(shape)
    c, grads = _value_and_grads(fm.forget_mult, inputs, grad_out)
    c_ref, grads_ref = _value_and_grads(fm.forget_mult_reference, inputs, grad_out)
    torch.testing.assert_close(c, c_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("T", [0, 1, 2, 3, 4, 5, 8, 9, 10, 16, 17, 50])
def test_linear_scan_matches_a_loop(T):
    """The chunked scan of the torch path, across chunk boundaries and with padding; a
    includes exact 0s and 1s (a state wiped out or kept, where a division would fail)."""
    torch.manual_seed(T)
    a = torch.rand(2, T, 3, dtype=torch.float64)
    a[0, ::3] = 0.0
    a[1, ::4] = 1.0
    b, h0 = torch.randn(2, T, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    h, want = h0, []
    for t in range(T):
        h = a[:, t] * h + b[:, t]
        want.append(h)
    got = fm.linear_scan(a, b, h0)
    assert got.shape == (2, T, 3)
    if T:
        torch.testing.assert_close(got, torch.stack(want, dim=1))


def test_unknown_scan_mode_is_an_error(monkeypatch):
    monkeypatch.setattr(switches, "use_extension", False)
    monkeypatch.setattr(switches, "scan_mode", "fast")
    with pytest.raises(ValueError, match="scan_mode"):
        fm.forget_mult(torch.rand(1, 3, 2), torch.randn(1, 3, 2))


def test_forget_mult_c0_without_grad(impl):
    torch.manual_seed(2)
    f, z, c0 = _inputs(2, 5, 3)
    c0 = c0.detach()
    fm.forget_mult(f, z, c0).sum().backward()
    f_ref, z_ref = f.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    fm.forget_mult_reference(f_ref, z_ref, c0).sum().backward()
    torch.testing.assert_close(f.grad, f_ref.grad)
    torch.testing.assert_close(z.grad, z_ref.grad)


@pytest.mark.parametrize("with_c0", [False, True])
def test_forget_mult_gradcheck(impl, with_c0):
    torch.manual_seed(3)
    f, z, c0 = _inputs(2, 6, 3, dtype=torch.float64)
    inputs = (f, z, c0) if with_c0 else (f, z)
    assert torch.autograd.gradcheck(fm.forget_mult, inputs)


def test_segments_chain(impl):
    """Running two halves, carrying c[:, -1], equals running the whole sequence at once."""
    torch.manual_seed(4)
    f, z, c0 = (x.detach() for x in _inputs(2, 10, 4))
    whole = fm.forget_mult(f, z, c0)
    first = fm.forget_mult(f[:, :6], z[:, :6], c0)
    second = fm.forget_mult(f[:, 6:], z[:, 6:], first[:, -1])
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forget_mult_half_precision(impl, dtype):
    torch.manual_seed(5)
    f, z, c0 = (x.detach() for x in _inputs(2, 50, 8))
    f_h, z_h, c0_h = (x.to(dtype).requires_grad_() for x in (f, z, c0))
    c_h = fm.forget_mult(f_h, z_h, c0_h)
    assert c_h.dtype == dtype
    # Computed in float32 from the rounded inputs: only the output rounding differs.
    c_ref = fm.forget_mult_reference(f_h.float(), z_h.float(), c0_h.float())
    torch.testing.assert_close(c_h.float(), c_ref, atol=1e-2, rtol=1e-2)
    c_h.sum().backward()
    assert f_h.grad.dtype == dtype and z_h.grad.dtype == dtype and c0_h.grad.dtype == dtype


def test_forget_mult_rejects_bad_shapes():
    f, z, c0 = (x.detach() for x in _inputs(2, 3, 4))
    with pytest.raises(ValueError):
        fm.forget_mult(f, z[:, :, :3])
    with pytest.raises(ValueError):
        fm.forget_mult(f, z, c0[:, :3])


def test_failed_build_falls_back_with_warning(monkeypatch):
    """A compiler error makes the loader warn and return None instead of raising."""
    import torch.utils.cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Error building extension 'shaq_forget_mult'")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch"):
        assert fm._load_extension.__wrapped__() is None


# ----------------------------------------------------------------------------------------
# qrnn_pool


def _gates(B: int, T: int, H: int, output_gate: bool, dtype=torch.float32):
    n_gates = 3 if output_gate else 2
    gates = (2 * torch.randn(B, T, n_gates * H, dtype=dtype)).requires_grad_()
    c0 = torch.randn(B, H, dtype=dtype).requires_grad_()
    return gates, c0


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 1, 5), (3, 17, 33)])
@pytest.mark.parametrize("output_gate", [True, False])
@pytest.mark.parametrize("with_c0", [False, True])
def test_qrnn_pool_matches_reference(impl, shape, output_gate, with_c0):
    torch.manual_seed(6)
    B, T, H = shape
    gates, c0 = _gates(B, T, H, output_gate)
    inputs = [gates, c0] if with_c0 else [gates]
    grad_h, grad_c = torch.randn(B, T, H), torch.randn(B, H)

    def run(pool):
        h, c_last = (
            pool(*inputs, output_gate=output_gate) if with_c0 else pool(gates, None, output_gate)
        )
        grads = torch.autograd.grad([h, c_last], inputs, [grad_h, grad_c])
        return h.detach(), c_last.detach(), grads

    h, c_last, grads = run(fm.qrnn_pool)
    h_ref, c_last_ref, grads_ref = run(fm.qrnn_pool_reference)
    # The fused kernel's exp is a polynomial, so allow a few float32 ulps more than default.
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_last, c_last_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("output_gate", [True, False])
@pytest.mark.parametrize("with_c0", [False, True])
def test_qrnn_pool_gradcheck(impl, output_gate, with_c0):
    torch.manual_seed(7)
    gates, c0 = _gates(2, 5, 3, output_gate, dtype=torch.float64)
    if with_c0:
        assert torch.autograd.gradcheck(lambda g, c: fm.qrnn_pool(g, c, output_gate), (gates, c0))
    else:
        assert torch.autograd.gradcheck(lambda g: fm.qrnn_pool(g, None, output_gate), (gates,))


def test_qrnn_pool_noncontiguous_and_bf16(impl):
    torch.manual_seed(8)
    gates = torch.randn(2, 3 * 4, 7).transpose(1, 2)  # [B=2, T=7, 3H=12], not contiguous
    h, c_last = fm.qrnn_pool(gates)
    h_ref, c_last_ref = fm.qrnn_pool_reference(gates)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_last, c_last_ref, atol=1e-5, rtol=1e-5)
    h_bf, c_last_bf = fm.qrnn_pool(gates.bfloat16())
    assert (
        h_bf.dtype == torch.bfloat16 and c_last_bf.dtype == torch.float32
    )  # the carried cell stays float32
    h_ref_bf, _ = fm.qrnn_pool_reference(gates.bfloat16().float())
    torch.testing.assert_close(h_bf.float(), h_ref_bf, atol=1e-2, rtol=1e-2)


def test_qrnn_pool_extreme_preactivations(impl):
    """Saturated gates (|x| up to 1e4) give finite, correct values: no overflow in exp."""
    gates = torch.tensor(
        [[[1e4, -1e4, 1e4], [-1e4, 1e4, -1e4], [100.0, -100.0, 0.0]]]
    )  # B=1, T=3, H=1
    h, c_last = fm.qrnn_pool(gates, torch.full((1, 1), 0.5))
    # t=0: z=1, f=0 -> c=1, h=1.  t=1: f=1 keeps c=1, o=0 -> h=0.  t=2: z=1, f=0 -> c=1, o=0.5.
    torch.testing.assert_close(h, torch.tensor([[[1.0], [0.0], [0.5]]]))
    torch.testing.assert_close(c_last, torch.tensor([[1.0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(9)
    f, z, c0 = (x.detach() for x in _inputs(2, 9, 5))
    torch.testing.assert_close(
        fm.forget_mult(f.cuda(), z.cuda(), c0.cuda()).cpu(), fm.forget_mult(f, z, c0)
    )
    gates = torch.randn(2, 9, 15)
    for got, want in zip(fm.qrnn_pool(gates.cuda()), fm.qrnn_pool(gates), strict=True):
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
