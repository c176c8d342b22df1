"""Step-by-step reference of the EFLA / delta-rule recurrence, gated or not: the definition, one token at a time.

    S_t = gamma_t (I - a_t k_t k_t^T) S_{t-1} + e_t k_t v_t^T,   o_t = scale * S_t^T q_t

Ungated: gamma = 1 and e = a (EFLA's alpha, or DeltaNet's beta). Gated (log decay g_t = log gamma_t <= 0): Gated
DeltaNet has a = e = beta; gated EFLA is the exact solution over a step of duration beta of

    dS/dt = -(c I + k k^T) S + k v^T,   c = -g / beta >= 0.

c I and k k^T commute, so exp(-beta (c I + k k^T)) = gamma exp(-beta k k^T) = gamma (I - alpha k k^T) with EFLA's
alpha = beta phi(beta lam), phi(x) = (1 - e^-x) / x, lam = ||k||^2; and (c I + k k^T) k = (c + lam) k, so the input
term integrates to int_0^beta e^(-s (c + lam)) ds k v^T = beta phi(beta lam - g) k v^T: e = eta = beta phi(beta lam - g)
(``efla/ops/alpha.py``; checked against a matrix exponential in ``tests/ops/test_gated_math.py``). Gated EFLA therefore
has Gated DeltaNet's form with beta -> alpha and v -> (eta / alpha) v; 0 <= eta <= alpha.

Slow (a Python loop over T) but obviously right, differentiable by autograd, and exact in any dtype: every other
backend is tested against it in float64.
"""

from __future__ import annotations

import torch


def recurrent_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    g: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence over equal-length sequences.

    q, k: [B, T, H, K]; v: [B, T, H, V]; alpha (erase step a): [B, T, H]; initial_state: [B, H, K, V] or None;
    g: [B, T, H] log decay or None (no decay); eta: [B, T, H] write step e, or None for e = alpha.
    Returns o: [B, T, H, V] and the final state [B, H, K, V], both in the compute dtype (alpha's: float32 or float64).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    dtype = alpha.dtype
    q, k, v = (x.to(dtype) for x in (q, k, v))
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    decay = None if g is None else torch.exp(g.to(dtype))
    eta = None if eta is None else eta.to(dtype)
    outputs = []
    for t in range(T):
        k_t, v_t, a_t = k[:, t], v[:, t], alpha[:, t, :, None]
        if decay is not None:
            state = decay[:, t, :, None, None] * state
        # S^T k_t is the (decayed) state's prediction for v_t; the step erases a_t ||k_t||^2 of it and writes e_t v_t
        prediction = torch.einsum("bhkv,bhk->bhv", state, k_t)
        update = a_t * (v_t - prediction) if eta is None else eta[:, t, :, None] * v_t - a_t * prediction
        state = state + torch.einsum("bhk,bhv->bhkv", k_t, update)
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o, state
