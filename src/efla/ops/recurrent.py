"""Step-by-step reference of the EFLA / delta-rule recurrence: the definition, one token at a time.

    S_t = (I - a_t k_t k_t^T) S_{t-1} + a_t k_t v_t^T,   o_t = scale * S_t^T q_t

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence over equal-length sequences.

    q, k: [B, T, H, K]; v: [B, T, H, V]; alpha: [B, T, H]; initial_state: [B, H, K, V] or None.
    Returns o: [B, T, H, V] and the final state [B, H, K, V], both in the compute dtype (float32 or float64).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    dtype = alpha.dtype
    q, k, v = (x.to(dtype) for x in (q, k, v))
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(T):
        k_t, v_t, a_t = k[:, t], v[:, t], alpha[:, t, :, None]
        # S^T k_t is the state's current prediction for v_t; the step moves it by a_t * ||k_t||^2 of the error.
        prediction = torch.einsum("bhkv,bhk->bhv", state, k_t)
        state = state + torch.einsum("bhk,bhv->bhkv", k_t, a_t * (v_t - prediction))
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o, state
