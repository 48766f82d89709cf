"""Mixed precision computes what float32 computes, on the path GPUs take.

Off the CPU the QRNN pooling runs on torch ops (no C++ extension) with the chunked scan; these
tests run that path on the CPU with bf16 inputs, so CI checks what a GPU run would compute.
"""

import pytest
import torch

from shaq.models import SHAQ, SHARNN, SHARNNConfig
from shaq.nn import switches
from shaq.nn.forget_mult import qrnn_pool, qrnn_pool_reference


@pytest.fixture
def gpu_path(monkeypatch):
    """The QRNN pooling as it runs on a GPU: torch ops and the chunked scan."""
    monkeypatch.setattr(switches, "use_extension", False)
    monkeypatch.setattr(switches, "scan_mode", "chunked")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs() / (want.abs() + 1e-3)).mean().item()


def test_bf16_gates_with_long_memory_match_float64(gpu_path):
    """Forget pre-activations around +5 (sigmoid 0.95-1.0: the long-memory regime) over
    T = 1024. The reference is float64 on the same bf16-rounded gates, so what remains is the
    rounding of h to bf16 at the output (at most 2^-9 relative) and of nothing else: with the
    nonlinearities taken in bf16, sigmoid(f) is exactly 1.0 from f = 6.5 on, those cells
    freeze and their forget-gate gradient is zero (mean relative error in h then about 8e-2)."""
    torch.manual_seed(0)
    B, T, H = 4, 1024, 64
    z, f, o = torch.randn(B, T, H), torch.randn(B, T, H) * 1.5 + 5, torch.randn(B, T, H)
    gates = torch.cat([z, f, o], dim=-1).bfloat16().requires_grad_()
    exact = gates.detach().double().requires_grad_()

    h, c_last = qrnn_pool(gates)
    h_ref, c_ref = qrnn_pool_reference(exact)
    assert (
        h.dtype == torch.bfloat16 and c_last.dtype == torch.float32
    )  # the carried cell stays float32
    assert _relative_error(h, h_ref) < 3e-3
    assert _relative_error(c_last, c_ref) < 1e-5  # float32 throughout: no bf16 rounding at all

    weights = torch.randn(B, T, H)
    (h.float() * weights).sum().backward()
    (h_ref * weights.double()).sum().backward()
    for k, name in enumerate("zfo"):
        got, want = (
            gates.grad[..., k * H : (k + 1) * H].double(),
            exact.grad[..., k * H : (k + 1) * H],
        )
        assert (got - want).norm() / want.norm() < 1e-2, name  # bf16 rounding of the gradient
    saturated = gates.detach()[..., H : 2 * H] >= 6.5
    assert saturated.sum() > 1000  # the regime under test is really there
    assert (gates.grad[..., H : 2 * H][saturated] != 0).all()  # no frozen cell


@pytest.mark.parametrize("model_class", [SHAQ, SHARNN])
def test_whole_model_under_cpu_bf16_autocast_matches_float32(model_class, gpu_path):
    """Four segments with carried state and memory, under bf16 autocast and in float32. Every
    matmul input is rounded to bf16 (8 significant bits), so logits of an untrained model
    (|logit| < 1) differ by a few 1e-3; the mean loss, an average over 256 bytes, far less.
    The carried recurrent states must be float32 whatever autocast does."""
    torch.manual_seed(0)
    model = model_class(SHARNNConfig.smoke()).eval()
    x = torch.randint(0, 256, (4, 4 * 64 + 1))
    results = {}
    for bf16 in (False, True):
        state, losses, logits = None, [], []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for s in range(4):
                out = model(
                    x[:, s * 64 : (s + 1) * 64],
                    state=state,
                    targets=x[:, s * 64 + 1 : (s + 1) * 64 + 1],
                )
                state = out.state
                losses.append(out.loss.item())
                logits.append(out.logits.float())
        results[bf16] = losses, logits, state
    (losses32, logits32, _), (losses16, logits16, state16) = results[False], results[True]
    assert all(t.dtype == torch.float32 for layer in state16.rnn for t in layer)
    assert max(abs(a - b) for a, b in zip(losses32, losses16, strict=True)) < 1e-3
    assert max((a - b).abs().max().item() for a, b in zip(logits32, logits16, strict=True)) < 2e-2
