"""The gated EFLA step is the exact solution of the gated delta-rule ODE: checked against a float64 matrix exponential.

Over one token of duration beta, with decay rate c >= 0, dS/dt = -(c I + k k^T) S + k v^T. The claim (issue 17):

    S_t = gamma (I - alpha k k^T) S_{t-1} + eta k v^T,   gamma = exp(g), g = -beta c,
    alpha = beta phi(beta lam),  eta = beta phi(beta lam - g),  phi(x) = -expm1(-x) / x,  lam = ||k||^2.

The oracle here knows nothing of phi or of the rank-one algebra: it exponentiates the augmented generator
beta [[-(c I + k k^T), k], [0, 0]] (v^T held constant), built from c itself, and reads S(beta) off the result. The
closed form is written out independently of efla (plain Python floats through math.expm1), so this file checks the
mathematics the library is built on, not the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err

F64 = torch.float64


def _phi(x: float) -> float:
    return 1.0 if x == 0 else -math.expm1(-x) / x


def _closed_form(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: float, g: float) -> torch.Tensor:
    lam = k.square().sum().item()
    alpha = beta * _phi(beta * lam)
    eta = beta * _phi(beta * lam - g)
    kkT = k[:, None] * k[None, :]
    return math.exp(g) * (state - alpha * kkT @ state) + eta * k[:, None] * v[None, :]


def _matrix_exponential_solution(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: float, c: float
                                 ) -> torch.Tensor:
    """S(beta) of dS/dt = -(c I + k k^T) S + k v^T: exp(beta M) on Y = [S; v^T], M = [[-(c I + k k^T), k], [0, 0]]."""
    K = k.shape[0]
    generator = torch.zeros(K + 1, K + 1, dtype=F64)
    generator[:K, :K] = -(c * torch.eye(K, dtype=F64) + k[:, None] * k[None, :])
    generator[:K, K] = k
    # a batch of two: torch's CPU matrix_exp picks a low Taylor degree for a lone small matrix (see efla.dynamics)
    propagator = torch.linalg.matrix_exp(torch.stack([beta * generator, torch.zeros_like(generator)]))[0]
    return propagator[:K, :K] @ state + propagator[:K, K, None] * v[None, :]


def _random_step(K: int, V: int, key_norm: float, gen: torch.Generator):
    k = torch.randn(K, dtype=F64, generator=gen)
    k = k / k.norm() * key_norm
    return torch.randn(K, V, dtype=F64, generator=gen), k, torch.randn(V, dtype=F64, generator=gen)


# (beta, ||k||, decay rate c): random-looking middles and every extreme the formula has to survive
CASES = [
    (0.7, 1.3, 0.4), (2.0, 0.5, 3.0), (0.05, 2.0, 10.0), (1.0, 1.0, 0.0),  # ordinary; c = 0 is EFLA
    (0.9, 1e-7, 0.8), (1.5, 0.0, 2.0),  # lam -> 0 and lam = 0: eta -> beta phi(-g)
    (1.2, 0.9, 1e-12), (0.3, 1.1, 1e-9),  # g -> 0: eta -> alpha
    (1.0, 0.8, 60.0), (0.5, 2.0, 400.0),  # g very negative: gamma ~ 1e-26, 1e-87
    (3.0, 20.0, 0.5), (10.0, 10.0, 2.0),  # beta lam = 1200, 1000: stiff, alpha lam -> 1
    (1e-8, 1.0, 5e7),  # a tiny step with g = -0.5
]


@pytest.mark.parametrize(("beta", "key_norm", "c"), CASES)
def test_closed_form_is_the_matrix_exponential_solution(beta: float, key_norm: float, c: float) -> None:
    gen = torch.Generator().manual_seed(hash((beta, key_norm, c)) % 2**31)
    state, k, v = _random_step(6, 4, key_norm, gen)
    ref = _matrix_exponential_solution(state, k, v, beta, c)
    out = _closed_form(state, k, v, beta, -beta * c)
    stiffness = beta * (key_norm**2 + c)
    # scaling and squaring costs the oracle ~1e-16 per doubling of ||beta M||: the tolerance follows it
    assert rel_err(out, ref) < 1e-14 * max(1.0, stiffness), rel_err(out, ref)


def test_closed_form_on_random_draws() -> None:
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    for _ in range(50):
        beta, key_norm, c = (torch.rand(3, dtype=F64, generator=gen) * torch.tensor([3.0, 2.0, 4.0])).tolist()
        state, k, v = _random_step(5, 3, key_norm, gen)
        ref = _matrix_exponential_solution(state, k, v, beta, c)
        assert rel_err(_closed_form(state, k, v, beta, -beta * c), ref) < 1e-13


def test_matrix_exponential_oracle_agrees_with_fine_rk4() -> None:
    """The oracle itself, by a route that never calls matrix_exp: classical RK4 with 512 sub-steps."""
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    state, k, v = _random_step(5, 3, 1.2, gen)
    beta, c = 1.3, 0.9
    h, s = beta / 512, state.clone()

    def f(s: torch.Tensor) -> torch.Tensor:
        return -c * s - k[:, None] * (k @ s)[None, :] + k[:, None] * v[None, :]

    for _ in range(512):
        k1 = f(s)
        k2 = f(s + h / 2 * k1)
        k3 = f(s + h / 2 * k2)
        s = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + f(s + h * k3))
    assert rel_err(s, _matrix_exponential_solution(state, k, v, beta, c)) < 1e-11


def test_the_limits_the_issue_states() -> None:
    """g = 0 gives EFLA (eta = alpha); lam -> 0 gives eta = beta phi(-g); eta <= alpha always (phi decreasing)."""
    for beta, lam, g in ((0.7, 2.0, 0.0), (1.3, 0.0, -0.4), (2.0, 5.0, -3.0), (0.1, 1e-3, -1e-3)):
        alpha, eta = beta * _phi(beta * lam), beta * _phi(beta * lam - g)
        if g == 0:
            assert eta == alpha
        if lam == 0:
            assert eta == beta * _phi(-g) and alpha == beta
        assert 0 < eta <= alpha
