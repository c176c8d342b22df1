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

Gated (every function takes an optional ``g``, the log decay over the step, <= 0): the ODE gains a decay rate
c = -g / beta, dS/dt = -(c I + k k^T) S + k v^T. The ground truth exponentiates beta M = [[g I - beta A, beta k],
[0, 0]] (built from g, so beta = 0 with g < 0, a pure decay, is fine); the integrators' sub-steps add (g / n) S to
h dS/dt's delta-rule part; ``efla_step`` is gated EFLA, gamma (I - alpha k k^T) S + eta k v^T with
eta = beta phi(beta lam - g) (``efla/ops/recurrent.py`` derives it); ``delta_step`` is (Gated) DeltaNet,
gamma (I - beta k k^T) S + beta k v^T. Gated DeltaNet is not an Euler step of the gated ODE: it is the exact decay
followed by one Euler step of the ungated one (a first-order splitting), which writes beta k v^T where the exact
solution writes eta k v^T, eta = beta phi(-g) < beta for small keys: the input that arrives during the step decays
for the rest of it. Euler on the gated ODE itself is also first order, and unstable once -g / n > 2 as well.

The reference is not error-free either. Against 40-digit mpmath, the float64 matrix exponential (on its degree-18
path, see ``_matrix_exp``) is good to ~3e-16 for small steps but loses accuracy as beta * lam grows (~1.5e-15 at 3,
~5e-14 at 100: scaling and squaring), while EFLA's closed form stays within ~1e-16 throughout: at stiff steps EFLA's
measured "error" is the reference's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from efla.ops.alpha import alpha_from_beta, eta_from_beta
from efla.ops.interface import efla_attention

METHODS = ("exact", "efla", "delta", "euler", "rk2", "rk4")


def _velocity(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """dS/dt = k (v^T - k^T S) for state [..., K, V], k [..., K], v [..., V]."""
    error = v - torch.einsum("...kv,...k->...v", state, k)
    return k[..., :, None] * error[..., None, :]


def _increment(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, hg: torch.Tensor | None
               ) -> torch.Tensor:
    """h dS/dt of the gated ODE for a sub-step of size h whose log decay is hg (= g / n; None for no decay)."""
    step = h * _velocity(state, k, v)
    return step if hg is None else step + hg * state


def _sub_steps(beta: torch.Tensor, g: torch.Tensor | None, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sub-step size h = beta / n and its log decay g / n, shaped to scale a [..., K, V] state."""
    _check_steps(steps)
    return (beta / steps)[..., None, None], (None if g is None else (g / steps)[..., None, None])


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (got {steps!r})")


def _exact_propagator(k: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(E_11 [..., K, K], e_12 [..., K]) of E = exp(beta M), beta M = [[g I - beta k k^T, beta k], [0, 0]], in float64.

    The solution over the step is S(beta) = E_11 S(0) + e_12 v^T (see the module docstring).
    """
    k, beta = k.to(torch.float64), beta.to(torch.float64)
    K = k.shape[-1]
    generator = k.new_zeros(*k.shape[:-1], K + 1, K + 1)
    generator[..., :K, :K] = -k[..., :, None] * k[..., None, :]
    generator[..., :K, K] = k
    generator = beta[..., None, None] * generator
    if g is not None:
        generator[..., :K, :K] += g.to(torch.float64)[..., None, None] * torch.eye(K, dtype=torch.float64)
    propagator = _matrix_exp(generator)
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


def exact_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               g: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth: the ODE solved over duration ``beta`` by the matrix exponential of the augmented system.

    state: [..., K, V]; k: [..., K]; v: [..., V]; beta: [...] (>= 0); g: [...] log decay (<= 0) or None.
    Computed and returned in float64, [..., K, V].
    """
    decay, drive = _exact_propagator(k, beta, g)
    return _apply_propagator(decay, drive, state.to(torch.float64), v)


def euler_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, steps: int = 1,
               g: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit Euler, ``steps`` sub-steps of size beta / steps; steps=1 is DeltaNet's update with raw k.

    Shapes as ``exact_step`` (g: the log decay over the whole step, or None); computed in the inputs' dtype.
    """
    h, hg = _sub_steps(beta, g, steps)
    for _ in range(steps):
        state = state + _increment(state, k, v, h, hg)
    return state


def rk2_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, steps: int = 1,
             g: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit midpoint rule (second order; Heun gives identical results on this ODE), ``steps`` sub-steps.

    Shapes as ``exact_step`` (g: the log decay over the whole step, or None); computed in the inputs' dtype.
    """
    h, hg = _sub_steps(beta, g, steps)
    for _ in range(steps):
        state = state + _increment(state + 0.5 * _increment(state, k, v, h, hg), k, v, h, hg)
    return state


def rk4_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, steps: int = 1,
             g: torch.Tensor | None = None) -> torch.Tensor:
    """Classical fourth-order Runge-Kutta, ``steps`` sub-steps of size beta / steps.

    Shapes as ``exact_step`` (g: the log decay over the whole step, or None); computed in the inputs' dtype.
    """
    h, hg = _sub_steps(beta, g, steps)
    for _ in range(steps):
        k1 = _increment(state, k, v, h, hg)
        k2 = _increment(state + 0.5 * k1, k, v, h, hg)
        k3 = _increment(state + 0.5 * k2, k, v, h, hg)
        k4 = _increment(state + k3, k, v, h, hg)
        state = state + (k1 + 2 * k2 + 2 * k3 + k4) / 6
    return state


def efla_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
              g: torch.Tensor | None = None) -> torch.Tensor:
    """EFLA's exact step: S + alpha k (v^T - k^T S) with alpha from ``alpha_from_beta`` (no sub-steps needed);
    gated, gamma (I - alpha k k^T) S + eta k v^T with eta from ``eta_from_beta``.

    Shapes as ``exact_step``; computed in float32 or better (float64 for float64 inputs).
    """
    lam = k.square().sum(-1)
    alpha = alpha_from_beta(beta, lam)
    state, k, v = (x.to(alpha.dtype) for x in (state, k, v))
    if g is None:
        return state + alpha[..., None, None] * _velocity(state, k, v)
    eta = eta_from_beta(beta, lam, g)[..., None]
    state = torch.exp(g.to(alpha.dtype))[..., None, None] * state
    prediction = torch.einsum("...kv,...k->...v", state, k)
    return state + k[..., :, None] * (eta * v - alpha[..., None] * prediction)[..., None, :]


def delta_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               g: torch.Tensor | None = None) -> torch.Tensor:
    """DeltaNet's step, gamma (I - beta k k^T) S + beta k v^T (Gated DeltaNet with g; ``euler_step`` without).

    Shapes as ``exact_step``; computed in the inputs' dtype.
    """
    if g is not None:
        state = torch.exp(g)[..., None, None] * state
    return state + beta[..., None, None] * _velocity(state, k, v)


_INTEGRATORS: dict[str, Callable[..., torch.Tensor]] = {"euler": euler_step, "rk2": rk2_step, "rk4": rk4_step}


def solve_sequence(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    method: str,
    *,
    steps: int = 1,
    initial_state: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
) -> torch.Tensor:
    """The state after a whole sequence, each token's ODE solved over its duration beta_t by ``method``.

    k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] (>= 0); initial_state: [B, H, K, V] or None (zeros);
    g: [B, T, H] log decay per token (<= 0) or None. method: "exact" (matrix exponential, float64), "efla" or
    "delta" (``efla_attention``, recurrent backend: (gated) EFLA, (Gated) DeltaNet), or an integrator
    "euler" / "rk2" / "rk4" with ``steps`` sub-steps per token. Returns the final state [B, H, K, V].
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (got {method!r})")
    _check_steps(steps)
    B, T, H, K = k.shape
    state = k.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    if method in ("efla", "delta"):
        _, final = efla_attention(k, k, v, beta, initial_state=state, output_final_state=True, backend="recurrent",
                                  mode=method, g=g)
        return final
    if method == "exact":
        # The propagators of all tokens are independent of the state: one batched matrix_exp, then T affine maps.
        decay, drive = _exact_propagator(k, beta, g)
        decay = decay.transpose(0, 1).contiguous()  # time-major: strided batched matmuls are ~10x slower on CPU
        state = state.to(torch.float64)
        for t in range(T):
            state = _apply_propagator(decay[t], drive[:, t], state, v[:, t])
        return state
    integrator = _INTEGRATORS[method]
    for t in range(T):
        state = integrator(state, k[:, t], v[:, t], beta[:, t], steps, None if g is None else g[:, t])
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
