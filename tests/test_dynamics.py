"""efla.dynamics: the matrix-exponential ground truth, the classical integrators and EFLA's exactness (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from efla import efla_attention
from efla.dynamics import (
    convergence_order,
    delta_step,
    efla_step,
    euler_step,
    exact_step,
    relative_error,
    rk2_step,
    rk4_step,
    solve_sequence,
)

F64 = torch.float64


def _problem(B: int, T: int, H: int, K: int, V: int, stiffness: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random k, v, beta, initial state; beta * ||k||^2 = stiffness per token when given, else random."""
    k = torch.randn(B, T, H, K, dtype=F64) / K**0.5
    v = torch.randn(B, T, H, V, dtype=F64)
    lam = k.square().sum(-1)
    beta = stiffness / lam if stiffness is not None else torch.rand(B, T, H, dtype=F64) * 3 / lam
    return k, v, beta, torch.randn(B, H, K, V, dtype=F64)


def _one_step(stiffness: torch.Tensor, K: int = 8, V: int = 5):
    """Random state, k, v and beta with beta * ||k||^2 = stiffness, one independent step per entry."""
    n = len(stiffness)
    k = torch.randn(n, K, dtype=F64)
    return torch.randn(n, K, V, dtype=F64), k, torch.randn(n, V, dtype=F64), stiffness / k.square().sum(-1)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 12), H=st.integers(1, 2), K=st.integers(1, 6), V=st.integers(1, 6),
       backend=st.sampled_from(["recurrent", "torch"]))
def test_operator_matches_matrix_exponential(B: int, T: int, H: int, K: int, V: int, backend: str) -> None:
    k, v, beta, s0 = _problem(B, T, H, K, V)
    q = torch.randn(B, T, H, K, dtype=F64)
    o, final = efla_attention(q, k, v, beta, initial_state=s0, output_final_state=True, backend=backend,
                              chunk_size=4)
    state, outputs = s0, []
    for t in range(T):
        state = exact_step(state, k[:, t], v[:, t], beta[:, t])
        outputs.append(K**-0.5 * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    assert relative_error(o, torch.stack(outputs, 1)) < 1e-12
    assert relative_error(final, state) < 1e-12


def test_solve_sequence_exact_is_the_step_by_step_matrix_exponential() -> None:
    k, v, beta, s0 = _problem(2, 9, 3, 4, 5)
    state = s0
    for t in range(k.shape[1]):
        state = exact_step(state, k[:, t], v[:, t], beta[:, t])
    assert relative_error(solve_sequence(k, v, beta, "exact", initial_state=s0), state) < 1e-14


def test_matrix_exponential_agrees_with_fine_rk4() -> None:
    """The ground truth, checked by a route that never calls matrix_exp."""
    state, k, v, beta = _one_step(torch.tensor([0.1, 1.0, 2.0], dtype=F64))
    assert relative_error(rk4_step(state, k, v, beta, steps=256), exact_step(state, k, v, beta)) < 1e-10


def test_euler_one_step_is_the_delta_rule() -> None:
    state, k, v, beta = _one_step(torch.rand(6, dtype=F64) * 3)
    delta = state - beta[:, None, None] * k[:, :, None] * (torch.einsum("nkv,nk->nv", state, k) - v)[:, None, :]
    assert torch.allclose(euler_step(state, k, v, beta), delta, rtol=1e-14, atol=1e-14)
    # Over a sequence: DeltaNet's operator (mode="delta", alpha = beta) with raw keys is Euler, token by token.
    k, v, beta, s0 = _problem(2, 10, 2, 4, 3)
    _, final = efla_attention(k, k, v, beta, initial_state=s0, output_final_state=True, mode="delta",
                              backend="recurrent")
    assert relative_error(solve_sequence(k, v, beta, "euler", initial_state=s0), final) < 1e-14


def test_rk2_midpoint_equals_heun_on_this_ode() -> None:
    state, k, v, beta = _one_step(torch.rand(4, dtype=F64) * 2)
    h = beta[:, None, None]

    def f(s: torch.Tensor) -> torch.Tensor:
        return k[:, :, None] * (v - torch.einsum("nkv,nk->nv", s, k))[:, None, :]

    heun = state + h / 2 * (f(state) + f(state + h * f(state)))
    assert relative_error(rk2_step(state, k, v, beta), heun) < 1e-14


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("rk2", 2), ("rk4", 4)])
def test_convergence_order(method: str, order: int) -> None:
    k, v, beta, s0 = _problem(2, 6, 1, 6, 6, stiffness=1.0)
    ref = solve_sequence(k, v, beta, "exact", initial_state=s0)
    substeps = [8, 16, 32, 64]
    errors = [relative_error(solve_sequence(k, v, beta, method, steps=n, initial_state=s0), ref) for n in substeps]
    assert convergence_order([1 / n for n in substeps], errors) == pytest.approx(order, abs=0.15)


def test_convergence_order_fit_recovers_a_power_law() -> None:
    h = [0.5, 0.25, 0.125]
    assert convergence_order(h, [3 * x**2.5 for x in h]) == pytest.approx(2.5, abs=1e-12)


def test_efla_step_is_exact_at_every_stiffness() -> None:
    x = torch.logspace(-4, 2, 13, dtype=F64)
    state, k, v, beta = _one_step(x)
    out, ref = efla_step(state, k, v, beta), exact_step(state, k, v, beta)
    for i in range(len(x)):
        error = relative_error(out[i], ref[i])
        # The error is the reference's: matrix_exp's scaling and squaring loses accuracy as beta * lam grows.
        assert error < 5e-15 * max(1.0, x[i].item()), (x[i].item(), error)


@pytest.mark.parametrize("stiffness", [0.5, 2.5, 10.0])
def test_efla_sequence_stays_at_round_off_at_every_length(stiffness: float) -> None:
    k, v, beta, s0 = _problem(2, 120, 1, 6, 6, stiffness=stiffness)
    ref = s0
    for end in (1, 30, 120):
        ref = solve_sequence(k[:, :end], v[:, :end], beta[:, :end], "exact", initial_state=s0)
        out = solve_sequence(k[:, :end], v[:, :end], beta[:, :end], "efla", initial_state=s0)
        assert relative_error(out, ref) < 1e-13 * max(1.0, stiffness)


def test_stiff_steps_break_euler_not_efla() -> None:
    # One step at beta * lam = 5: Euler overshoots along k by a factor |1 - 5| = 4, EFLA decays by e^-5.
    state, k, v, beta = _one_step(torch.full((4,), 5.0, dtype=F64))
    ref = exact_step(state, k, v, beta)
    assert relative_error(euler_step(state, k, v, beta), ref) > 0.5
    assert relative_error(efla_step(state, k, v, beta), ref) < 1e-13
    # A sequence at beta * lam = 3 per token: Euler's error grows without bound; EFLA's state stays bounded and exact.
    k, v, beta, s0 = _problem(2, 80, 1, 4, 4, stiffness=3.0)
    short, long = (solve_sequence(k[:, :T], v[:, :T], beta[:, :T], "exact", initial_state=s0) for T in (10, 80))
    euler_short, euler_long = (solve_sequence(k[:, :T], v[:, :T], beta[:, :T], "euler", initial_state=s0)
                               for T in (10, 80))
    assert relative_error(euler_long, long) > 1e3 * max(relative_error(euler_short, short), 1.0)
    efla = solve_sequence(k, v, beta, "efla", initial_state=s0)
    assert relative_error(efla, long) < 1e-13
    assert math.isfinite(efla.norm().item()) and efla.norm() < 10 * (s0.norm() + v.norm())


def test_invalid_arguments() -> None:
    k, v, beta, s0 = _problem(1, 2, 1, 2, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        solve_sequence(k, v, beta, "rk3")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        euler_step(s0, k[:, 0], v[:, 0], beta[:, 0], steps=0)


def _gated_one_step(stiffness: torch.Tensor, decay: torch.Tensor, K: int = 8, V: int = 5):
    """_one_step plus a log decay g = -decay per entry."""
    state, k, v, beta = _one_step(stiffness, K, V)
    return state, k, v, beta, -decay


def test_gated_exact_step_agrees_with_fine_rk4_and_reduces_to_ungated() -> None:
    state, k, v, beta, g = _gated_one_step(torch.tensor([0.1, 1.0, 2.0], dtype=F64), torch.tensor([0.3, 1.0, 0.05],
                                                                                               dtype=F64))
    exact = exact_step(state, k, v, beta, g)
    assert relative_error(rk4_step(state, k, v, beta, steps=256, g=g), exact) < 1e-10
    assert relative_error(exact_step(state, k, v, beta, torch.zeros_like(g)), exact_step(state, k, v, beta)) < 1e-15
    # a pure decay (beta = 0): the state shrinks by exp(g), nothing is written
    zero = torch.zeros_like(beta)
    assert relative_error(exact_step(state, k, v, zero, g), g.exp()[:, None, None] * state) < 1e-15


@pytest.mark.parametrize("decay", [1e-3, 0.5, 5.0, 50.0])
def test_gated_efla_step_is_exact_at_every_stiffness(decay: float) -> None:
    x = torch.logspace(-4, 2, 13, dtype=F64)
    state, k, v, beta, g = _gated_one_step(x, torch.full_like(x, decay))
    out, ref = efla_step(state, k, v, beta, g), exact_step(state, k, v, beta, g)
    for i in range(len(x)):
        assert relative_error(out[i], ref[i]) < 5e-15 * max(1.0, x[i].item() + decay), (x[i].item(), decay)


def test_gated_integrators_converge_at_their_order() -> None:
    k, v, beta, s0 = _problem(2, 6, 1, 6, 6, stiffness=1.0)
    g = -torch.rand_like(beta) * 2
    ref = solve_sequence(k, v, beta, "exact", initial_state=s0, g=g)
    substeps = [8, 16, 32, 64]
    for method, order in (("euler", 1), ("rk2", 2), ("rk4", 4)):
        errors = [relative_error(solve_sequence(k, v, beta, method, steps=n, initial_state=s0, g=g), ref)
                  for n in substeps]
        assert convergence_order([1 / n for n in substeps], errors) == pytest.approx(order, abs=0.15), method
    assert relative_error(solve_sequence(k, v, beta, "efla", initial_state=s0, g=g), ref) < 1e-13


def test_gated_deltanet_is_decay_then_an_euler_step() -> None:
    state, k, v, beta, g = _gated_one_step(torch.rand(5, dtype=F64) * 2, torch.rand(5, dtype=F64) * 3)
    decayed = g.exp()[:, None, None] * state
    assert relative_error(delta_step(state, k, v, beta, g), euler_step(decayed, k, v, beta)) < 1e-15
    k, v, beta, s0 = _problem(2, 10, 2, 4, 3)
    g = -torch.rand_like(beta)
    state = s0
    for t in range(10):
        state = delta_step(state, k[:, t], v[:, t], beta[:, t], g[:, t])
    assert relative_error(solve_sequence(k, v, beta, "delta", initial_state=s0, g=g), state) < 1e-14
    # small keys: the exact step writes eta = beta phi(-g), Gated DeltaNet beta; at g = -1 that is 37% off
    state, k, v, beta, g = _gated_one_step(torch.full((4,), 1e-8, dtype=F64), torch.ones(4, dtype=F64))
    written = exact_step(torch.zeros_like(state), k, v, beta, g)
    gdn_written = delta_step(torch.zeros_like(state), k, v, beta, g)
    assert relative_error(written, gdn_written * -torch.expm1(torch.tensor(-1.0, dtype=F64))) < 1e-7
