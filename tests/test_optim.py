"""LAMB with minimum trust against steps computed by hand."""

import math

import pytest
import torch

from shaq.optim import LAMB


def one_step(w0, g, **kwargs):
    w = torch.nn.Parameter(torch.tensor(w0))
    opt = LAMB([w], **kwargs)
    w.grad = torch.tensor(g)
    opt.step()
    return w.detach(), opt.state[w]


def test_first_step_by_hand():
    # m = 0.1 g, v = 0.001 g^2 -> u = 0.1 g / (sqrt(0.001) |g| + eps) + wd * w
    w0, g = [3.0, -4.0], [0.5, 2.0]
    lr, eps, wd = 0.1, 1e-6, 0.01
    u = [
        0.1 * gi / (math.sqrt(0.001) * abs(gi) + eps) + wd * wi
        for wi, gi in zip(w0, g, strict=True)
    ]
    w_norm = 5.0
    u_norm = math.hypot(*u)
    trust = w_norm / u_norm
    expected = [wi - lr * trust * ui for wi, ui in zip(w0, u, strict=True)]
    w, state = one_step(w0, g, lr=lr, eps=eps, weight_decay=wd, min_trust=0.25)
    assert trust > 0.25  # the floor does not bind here
    assert torch.allclose(w, torch.tensor(expected), atol=1e-6)
    assert state["trust_ratio"].item() == pytest.approx(trust, rel=1e-6)


def test_min_trust_floor_binds_for_small_weights():
    w0, g = [0.001, -0.002], [1.0, 1.0]
    u = 0.1 / (math.sqrt(0.001) + 1e-6)  # both coordinates, no decay
    raw_trust = math.hypot(*w0) / math.hypot(u, u)
    assert raw_trust < 0.25
    w, state = one_step(w0, g, lr=0.01, min_trust=0.25)
    assert state["trust_ratio"].item() == pytest.approx(0.25)
    assert torch.allclose(w, torch.tensor(w0) - 0.01 * 0.25 * u, atol=1e-7)
    # Without the floor the same step is the raw ratio.
    w, state = one_step(w0, g, lr=0.01, min_trust=None)
    assert state["trust_ratio"].item() == pytest.approx(raw_trust, rel=1e-5)


def test_weight_norm_is_clamped_at_ten():
    w0, g = [30.0, 40.0], [1.0, -1.0]  # ||w|| = 50, clamped to 10
    u = 0.1 / (math.sqrt(0.001) + 1e-6)
    trust = 10.0 / math.hypot(u, u)
    w, state = one_step(w0, g, lr=0.5)
    assert state["weight_norm"].item() == pytest.approx(10.0)
    assert torch.allclose(
        w, torch.tensor([30.0 - 0.5 * trust * u, 40.0 + 0.5 * trust * u]), atol=1e-5
    )


def test_zero_weights_get_trust_one():
    w, state = one_step([0.0, 0.0], [1.0, 2.0], lr=0.1)
    assert state["trust_ratio"].item() == 1.0
    u = [0.1 * g / (math.sqrt(0.001) * g + 1e-6) for g in (1.0, 2.0)]
    assert torch.allclose(w, torch.tensor([-0.1 * u[0], -0.1 * u[1]]), rtol=1e-6)


def test_second_step_uses_moments_without_bias_correction():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LAMB([w], lr=0.1, min_trust=None)
    m = v = 0.0
    value = 1.0
    for g in (2.0, -1.0):
        w.grad = torch.tensor([g])
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        u = m / (math.sqrt(v) + 1e-6)
        trust = min(abs(value), 10.0) / abs(u)
        value -= 0.1 * trust * u
        assert w.item() == pytest.approx(value, rel=1e-5)


def test_adam_mode_ignores_trust():
    w, state = one_step([30.0, 40.0], [1.0, -1.0], lr=0.5, adam=True)
    assert state["trust_ratio"].item() == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-1), dict(min_trust=1.0), dict(min_trust=-0.1), dict(eps=0), dict(betas=(1.0, 0.9))],
)
def test_bad_hyperparameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        LAMB([torch.nn.Parameter(torch.zeros(1))], **kwargs)
