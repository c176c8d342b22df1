"""eta_from_beta (gated EFLA's write step): value, limits and gradients against independent float64 formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from efla.ops.alpha import alpha_from_beta, eta_from_beta, gated_step_sizes

F64 = torch.float64


def _eta_exact(beta: float, lam: float, g: float) -> float:
    y = beta * lam - g
    return beta if y < 1e-300 else -math.expm1(-y) / y * beta  # below 1e-300, 1 - y/2 rounds to 1


def _eta(beta: float, lam: float, g: float, dtype=F64) -> float:
    return eta_from_beta(*(torch.tensor(x, dtype=dtype) for x in (beta, lam, g))).item()


@given(beta=st.floats(0, 50), lam=st.one_of(st.just(0.0), st.floats(1e-200, 1e4)),
       g=st.one_of(st.just(0.0), st.floats(-1e4, -1e-200)))
@settings(max_examples=300, deadline=None)
def test_eta_matches_closed_form_in_float64(beta, lam, g):
    assert _eta(beta, lam, g) == pytest.approx(_eta_exact(beta, lam, g), rel=1e-14, abs=1e-300)


def test_eta_limits_and_bounds():
    n = 1000
    beta = torch.rand(n, dtype=F64) * 10
    lam = torch.rand(n, dtype=F64) * 100
    g = -torch.rand(n, dtype=F64) * 20
    lam[::7] = 0
    g[::5] = 0
    alpha, eta = alpha_from_beta(beta, lam), eta_from_beta(beta, lam, g)
    assert torch.equal(eta[::5], alpha[::5])  # no decay: gated EFLA is EFLA, bit for bit
    phi_of_decay = torch.where(g == 0, 1.0, -torch.expm1(g) / -g.clamp(max=-1e-300))
    assert torch.allclose(eta[::7], beta[::7] * phi_of_decay[::7], rtol=1e-14, atol=0)  # lam = 0
    assert ((eta >= 0) & (eta <= alpha)).all()  # phi decreases: the write never exceeds the erase


def test_float32_eta_is_accurate_across_stiffness_and_decay():
    y = torch.logspace(-12, 4, 2000, dtype=F64)
    beta = torch.rand_like(y) + 0.1
    share = torch.rand_like(y)  # part of y from the key, the rest from the decay
    lam, g = share * y / beta, -(1 - share) * y
    ref = eta_from_beta(beta, lam, g)
    got = eta_from_beta(beta.float(), lam.float(), g.float())
    assert got.dtype == torch.float32
    assert ((got.double() - ref).abs() / ref).max() < 2e-6


def test_gradients_match_finite_differences_in_every_regime():
    # y = beta * lam - g from ~0 (series branch) through 1 (branch switch) to 1e4; lam and -g stay above the
    # finite-difference step, whose other side would leave the domain
    beta = torch.tensor([0.3, 1.0, 2.0, 0.7, 1e-3, 3.0, 0.9, 0.5], dtype=F64, requires_grad=True)
    lam = torch.tensor([1e-5, 0.5, 0.25, 3.0, 40.0, 100.0, 5e3, 1e-4], dtype=F64, requires_grad=True)
    g = torch.tensor([-1e-5, -0.5, -0.5005, -1e-4, -2.0, -0.01, -5e3, -30.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(eta_from_beta, (beta, lam, g), eps=1e-7, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gradients_have_known_limits_and_stay_finite(dtype):
    beta = torch.tensor([0.0, 0.0, 0.4, 0.4, 10.0, 1e4, 2.0], dtype=dtype, requires_grad=True)
    lam = torch.tensor([0.0, 3.0, 0.0, 2.0, 1e3, 1.0, 0.0], dtype=dtype, requires_grad=True)
    g = torch.tensor([0.0, -2.0, 0.0, -1e4, 0.0, -1e4, -1e-30], dtype=dtype, requires_grad=True)
    eta_from_beta(beta, lam, g).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (beta, lam, g))
    # at beta = 0, d eta / d beta = phi(-g): 1 for g = 0, (1 - e^-2) / 2 for g = -2
    assert beta.grad[0].item() == pytest.approx(1.0, rel=1e-6)
    assert beta.grad[1].item() == pytest.approx(-math.expm1(-2.0) / 2, rel=1e-6)
    # at lam = 0, g = 0: d eta / d lam = -beta^2 / 2 and d eta / d g = beta / 2 (phi'(0) = -1/2)
    assert lam.grad[2].item() == pytest.approx(-0.4**2 / 2, rel=1e-6)
    assert g.grad[2].item() == pytest.approx(0.4 / 2, rel=1e-6)
    assert g.grad[6].item() == pytest.approx(2.0 / 2, rel=1e-6)


def test_gated_step_sizes_per_mode():
    k = torch.randn(2, 5, 3, 8)
    beta = torch.rand(2, 5, 3)
    g = -torch.rand(2, 5, 3) * 3
    alpha, eta = gated_step_sizes(k, beta, g, "delta")
    assert torch.equal(alpha, beta) and torch.equal(eta, beta)
    alpha, eta = gated_step_sizes(k, beta, g, "efla")
    lam = k.double().square().sum(-1)
    y = beta.double() * lam - g.double()
    assert torch.allclose(alpha.double(), -torch.expm1(-beta.double() * lam) / lam, rtol=1e-6)
    assert torch.allclose(eta.double(), -torch.expm1(-y) / y * beta.double(), rtol=1e-6)
    alpha, eta = gated_step_sizes(k.double(), beta.double(), g.double(), "efla")
    assert alpha.dtype == F64 and eta.dtype == F64
