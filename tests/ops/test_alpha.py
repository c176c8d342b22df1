"""alpha_from_beta: value, limits and gradients against independent float64 formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from efla.ops.alpha import alpha_from_beta, step_sizes


def _alpha_exact(beta: float, lam: float) -> float:
    x = beta * lam
    return beta if x < 1e-300 else -math.expm1(-x) / lam  # below 1e-300, 1 - x/2 rounds to 1


@given(beta=st.floats(0, 50), lam=st.one_of(st.just(0.0), st.floats(1e-200, 1e4)))
@settings(max_examples=200, deadline=None)
def test_alpha_matches_closed_form_in_float64(beta, lam):
    got = alpha_from_beta(torch.tensor(beta, dtype=torch.float64), torch.tensor(lam, dtype=torch.float64)).item()
    assert got == pytest.approx(_alpha_exact(beta, lam), rel=1e-14, abs=1e-300)


def test_alpha_is_beta_where_key_is_zero_and_lies_in_unit_interval_times_lambda():
    beta = torch.rand(1000, dtype=torch.float64) * 10
    lam = torch.rand(1000, dtype=torch.float64) * 100
    lam[::7] = 0
    alpha = alpha_from_beta(beta, lam)
    assert torch.equal(alpha[::7], beta[::7])
    # alpha * lambda = 1 - e^(-beta lambda) in [0, 1]: the state can never be amplified along k
    assert ((alpha * lam >= 0) & (alpha * lam <= 1 + 1e-15)).all()
    assert (alpha <= beta).all()


def test_float32_alpha_is_accurate_across_stiffness():
    x = torch.logspace(-12, 4, 2000, dtype=torch.float64)
    beta = torch.rand_like(x) + 0.1
    lam = x / beta
    ref = alpha_from_beta(beta, lam)
    got = alpha_from_beta(beta.float(), lam.float())
    assert got.dtype == torch.float32
    assert ((got.double() - ref).abs() / ref).max() < 1e-6


def test_gradients_match_finite_differences_in_every_regime():
    # x = beta * lam from ~0 (series branch) through 1 (branch switch) to 1e4 (saturated exponential);
    # lam stays above the finite-difference step, whose negative side would leave the domain
    beta = torch.tensor([0.3, 1.0, 2.0, 0.7, 1e-3, 3.0, 0.9], dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([1e-5, 0.999, 0.5005, 3.0, 40.0, 100.0, 1e4 / 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(alpha_from_beta, (beta, lam), eps=1e-7, atol=1e-9, rtol=1e-6)


def test_gradients_have_known_limits_and_stay_finite():
    beta = torch.tensor([0.0, 0.4, 0.4, 10.0, 1e4], dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.0, 0.0, 2.0, 1e3, 1.0], dtype=torch.float64, requires_grad=True)
    alpha_from_beta(beta, lam).sum().backward()
    assert torch.isfinite(beta.grad).all() and torch.isfinite(lam.grad).all()
    # d alpha / d beta = exp(-beta lam); d alpha / d lam -> -beta^2 / 2 as lam -> 0
    assert torch.allclose(beta.grad, torch.exp(-beta.detach() * lam.detach()))
    assert lam.grad[1].item() == pytest.approx(-0.4**2 / 2, rel=1e-12)
    assert lam.grad[0].item() == 0.0


def test_step_sizes_per_mode():
    k = torch.randn(2, 5, 3, 8)
    beta = torch.rand(2, 5, 3)
    assert torch.equal(step_sizes(k, beta, "delta"), beta)
    lam = k.double().square().sum(-1)
    expected = -torch.expm1(-beta.double() * lam) / lam
    assert torch.allclose(step_sizes(k, beta, "efla").double(), expected, rtol=1e-6)
