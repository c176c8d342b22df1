"""The delta-rule ODE and its solvers: ground truth, classical integrators and EFLA's closed form.

Over one token the state S ([K, V]) follows, with the input held constant for a duration beta (zero-order hold),

    dS/dt = -A S + b,   A = k k^T,  b = k v^T,   i.e.   dS/dt = k (v^T - k^T S).

- ``exact_step``: the ground truth. With Y = [S; v^T] ((K+1) x V, v^T constant over the step) the affine ODE becomes
  linear, dY/dt = M Y with M = [[-A, k], [0, 0]], so Y(beta) = exp(beta M) Y(0) and S(beta) = E_11 S(0) + e_12 v^T
  with E = exp(beta M). ``torch.linalg.matrix_exp`` in float64 makes both the decay and the input term exact without
  the rank-one algebra EFLA relies on. (Augmenting with b = k v^T itself, M' = [[-A, b], [0, 0]] of size K + V, gives
  the same S; factoring b keeps the exponential (K+1) x (K+1), several times cheaper.)
- ``euler_step``, ``rk2_step``, ``rk4_step``: explicit Runge-Kutta methods with n sub-steps of size h = beta / n.
  One Euler step (n = 1) is DeltaNet's update S + beta k (v^T - k^T S) with the raw, unnormalised k. On this linear
  constant-coefficient ODE an s-stage order-s method applies the Taylor polynomial of exp of degree s, so every
  two-stage second-order method (midpoint, Heun) gives the same result; ``rk2_step`` is the midpoint rule. Along k
  the amplification per sub-step is 1 - x + ... with x = h ||k||^2: Euler and RK2 diverge for x > 2, RK4 for x > 2.79.
- ``efla_step``: EFLA's closed form S + alpha k (v^T - k^T S), alpha = (1 - e^(-beta lam)) / lam, lam = ||k||^2
  (exact because A^n = lam^(n-1) A), with efla's own ``alpha_from_beta``.
- ``solve_sequence``: any of the above token by token over [B, T, H, ...] sequences, efla's layout; EFLA runs
  through ``efla_attention`` (recurrent backend) itself, so the study measures the library's operator.
- ``relative_error`` and ``convergence_order``: the two measurements of ``efla exactness``.

The reference is not error-free either. Against 40-digit mpmath, the float64 matrix exponential (on its degree-18
path, see ``_matrix_exp``) is good to ~3e-16 for small steps but loses accuracy as beta * lam grows (~1.5e-15 at 3,
~5e-14 at 100: scaling and squaring), while EFLA's closed form stays within ~1e-16 throughout: at stiff steps EFLA's
measured "error" is the reference's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from efla.ops.alpha import alpha_from_beta
from efla.ops.interface import efla_attention

METHODS = ("exact", "efla", "euler", "rk2", "rk4")


def _velocity(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """dS/dt = k (v^T - k^T S) for state [..., K, V], k [..., K], v [..., V]."""
    error = v - torch.einsum("...kv,...k->...v", state, k)
    return k[..., :, None] * error[..., None, :]


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (got {steps!r})")


def _exact_propagator(k: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E_11 [..., K, K], e_12 [..., K]) of E = exp(beta M), M = [[-k k^T, k], [0, 0]], in float64.

    The solution over the step is S(beta) = E_11 S(0) + e_12 v^T (see the module docstring).
    """
    k, beta = k.to(torch.float64), beta.to(torch.float64)
    K = k.shape[-1]
    generator = k.new_zeros(*k.shape[:-1], K + 1, K + 1)
    generator[..., :K, :K] = -k[..., :, None] * k[..., None, :]
    generator[..., :K, K] = k
    propagator = _matrix_exp(beta[..., None, None] * generator)
    return propagator[..., :K, :K], propagator[..., :K, K]


def _matrix_exp(matrices: torch.Tensor) -> torch.Tensor:
    """torch.linalg.matrix_exp, always on its degree-18 path.

    On CPU a lone matrix gets a Taylor degree picked from its norm, and the degree-8 approximant has a wrong x^7
    coefficient (pytorch/pytorch#196592): with torch 2.13 we measured float64 errors up to ~1e-11 for one step at
    beta * lam ~ 0.005-0.05. Batches of two or more always take the degree-18 path, so a lone matrix is paired with a
    zero one.
    """
    flat = matrices.reshape(-1, *matrices.shape[-2:])
    if flat.shape[0] == 1:
        return torch.linalg.matrix_exp(torch.cat([flat, torch.zeros_like(flat)]))[:1].reshape(matrices.shape)
    return torch.linalg.matrix_exp(flat).reshape(matrices.shape)


def _apply_propagator(decay: torch.Tensor, drive: torch.Tensor, state: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return decay @ state + drive[..., :, None] * v.to(torch.float64)[..., None, :]


def exact_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Ground truth: the ODE solved over duration ``beta`` by the matrix exponential of the augmented system.

    state: [..., K, V]; k: [..., K]; v: [..., V]; beta: [...] (>= 0). Computed and returned in float64, [..., K, V].
    """
    decay, drive = _exact_propagator(k, beta)
    return _apply_propagator(decay, drive, state.to(torch.float64), v)


def euler_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, steps: int = 1
               ) -> torch.Tensor:
    """Explicit Euler, ``steps`` sub-steps of size beta / steps; steps=1 is DeltaNet's update with raw k.

    Shapes as ``exact_step``; computed in the inputs' dtype.
    """
    _check_steps(steps)
    h = (beta / steps)[..., None, None]
    for _ in range(steps):
        state = state + h * _velocity(state, k, v)
    return state


def rk2_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, steps: int = 1
             ) -> torch.Tensor:
    """Explicit midpoint rule (second order; Heun gives identical results on this ODE), ``steps`` sub-steps.

    Shapes as ``exact_step``; computed in the inputs' dtype.
    """
    _check_steps(steps)
    h = (beta / steps)[..., None, None]
    for _ in range(steps):
        state = state + h * _velocity(state + 0.5 * h * _velocity(state, k, v), k, v)
    return state


def rk4_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, steps: int = 1
             ) -> torch.Tensor:
    """Classical fourth-order Runge-Kutta, ``steps`` sub-steps of size beta / steps.

    Shapes as ``exact_step``; computed in the inputs' dtype.
    """
    _check_steps(steps)
    h = (beta / steps)[..., None, None]
    for _ in range(steps):
        k1 = _velocity(state, k, v)
        k2 = _velocity(state + 0.5 * h * k1, k, v)
        k3 = _velocity(state + 0.5 * h * k2, k, v)
        k4 = _velocity(state + h * k3, k, v)
        state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return state


def efla_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """EFLA's exact step: S + alpha k (v^T - k^T S) with alpha from ``alpha_from_beta`` (no sub-steps needed).

    Shapes as ``exact_step``; computed in float32 or better (float64 for float64 inputs).
    """
    alpha = alpha_from_beta(beta, k.square().sum(-1))
    state, k, v = (x.to(alpha.dtype) for x in (state, k, v))
    return state + alpha[..., None, None] * _velocity(state, k, v)


_INTEGRATORS: dict[str, Callable[..., torch.Tensor]] = {"euler": euler_step, "rk2": rk2_step, "rk4": rk4_step}


def solve_sequence(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    method: str,
    *,
    steps: int = 1,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """The state after a whole sequence, each token's ODE solved over its duration beta_t by ``method``.

    k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] (>= 0); initial_state: [B, H, K, V] or None (zeros).
    method: "exact" (matrix exponential, float64), "efla" (``efla_attention``, recurrent backend), or an integrator
    "euler" / "rk2" / "rk4" with ``steps`` sub-steps per token. Returns the final state [B, H, K, V].
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (got {method!r})")
    _check_steps(steps)
    B, T, H, K = k.shape
    state = k.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    if method == "efla":
        _, final = efla_attention(k, k, v, beta, initial_state=state, output_final_state=True, backend="recurrent")
        return final
    if method == "exact":
        # The propagators of all tokens are independent of the state: one batched matrix_exp, then T affine maps.
        decay, drive = _exact_propagator(k, beta)
        decay = decay.transpose(0, 1).contiguous()  # time-major: strided batched matmuls are ~10x slower on CPU
        state = state.to(torch.float64)
        for t in range(T):
            state = _apply_propagator(decay[t], drive[:, t], state, v[:, t])
        return state
    integrator = _INTEGRATORS[method]
    for t in range(T):
        state = integrator(state, k[:, t], v[:, t], beta[:, t], steps)
    return state


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over all entries (Frobenius), in float64."""
    ref = ref.to(torch.float64)
    return ((out.to(torch.float64) - ref).norm() / ref.norm()).item()


def convergence_order(step_sizes: list[float], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(step size): p where error ~ C h^p."""
    h = torch.tensor(step_sizes, dtype=torch.float64).log()
    e = torch.tensor(errors, dtype=torch.float64).log()
    h = h - h.mean()
    return ((h * (e - e.mean())).sum() / h.square().sum()).item()
