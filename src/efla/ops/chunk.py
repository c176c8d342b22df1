"""Chunkwise (WY / UT-transform) form of the EFLA / delta-rule recurrence in plain PyTorch.

Derivation. Within a chunk of C tokens starting from state S, write the state after token t as
S_t = S + sum_{i<=t} k_i u_i^T. The recurrence gives u_t = a_t (v_t - S^T k_t - sum_{i<t} (k_i^T k_t) u_i), i.e.

    (I + tril(diag(a) K K^T, -1)) U = diag(a) (V - K S)

so U = T diag(a) (V - K S) with the UT transform T = (I + tril(diag(a) K K^T, -1))^-1. Then the chunk's outputs and
the next state are

    O = scale * (Q S + tril(Q K^T) U),    S' = S + K^T U

(tril inclusive: o_t reads the state after token t). T and tril(Q K^T) depend on the chunk alone, so they are
computed for all chunks at once, as are the outputs once every chunk's S and U are known; only U and S' run chunk
after chunk. (The GPU kernels precompute the WY pair W = T diag(a) K, U0 = T diag(a) V and form U = U0 - W S; on CPU
applying T inside the loop saves one of the three C x C products per chunk.) EFLA and DeltaNet differ only in a (alpha
from beta and ||k||^2, or beta itself), which arrives here already computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise recurrence over equal-length sequences (same contract as ``recurrent_fwd``).

    q, k: [B, T, H, K]; v: [B, T, H, V]; alpha: [B, T, H]; initial_state: [B, H, K, V] or None.
    Returns o: [B, T, H, V] and the final state [B, H, K, V] in the compute dtype (alpha's).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    dtype = alpha.dtype
    pad = (-T) % C  # padded tokens have a = 0 and k = 0: they leave the state untouched
    n = (T + pad) // C

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, H, n, C, D]
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        return x.view(B, n, C, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v = to_chunks(q), to_chunks(k), to_chunks(v)
    a = F.pad(alpha, (0, 0, 0, pad)).view(B, n, C, H).permute(0, 3, 1, 2).unsqueeze(-1)  # [B, H, n, C, 1]

    # masks as multiplications: cheaper than torch.tril on CPU, in both directions of autograd
    causal = torch.ones(C, C, dtype=dtype, device=k.device).tril()
    transform = _UnitLowerInverse.apply((a * (k @ k.transpose(-1, -2))) * causal.tril(-1))
    qk = (q @ k.transpose(-1, -2)) * causal

    state = k.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    states, pseudo_values = [], []
    # only the state recursion runs chunk by chunk; unbinding once avoids autograd writing a full-size zero gradient
    # for every indexed chunk
    for k_i, v_i, a_i, t_i in zip(*(x.unbind(2) for x in (k, v, a, transform)), strict=True):
        states.append(state)
        u = t_i @ (a_i * (v_i - k_i @ state))
        pseudo_values.append(u)
        state = state + k_i.transpose(-1, -2) @ u
    # O = Q S + tril(Q K^T) U for all chunks as one product: [Q, tril(Q K^T)] @ [S; U]
    o = q @ torch.stack(states, dim=2) + qk @ torch.stack(pseudo_values, dim=2)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]
    return scale * o, state


class _UnitLowerInverse(torch.autograd.Function):
    """(I + L)^-1 for a batch of strictly lower-triangular L.

    The backward uses the inverse itself, d(M^-1) = -M^-1 dM M^-1, so it costs two matrix products instead of the
    triangular solves autograd would run (slow for many small matrices on CPU). Only L's strictly lower part matters:
    the caller's mask discards the rest of the gradient.
    """

    @staticmethod
    def forward(ctx, lower: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
        inverse = torch.linalg.solve_triangular(lower + eye, eye.expand_as(lower), upper=False, unitriangular=True)
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (inverse,) = ctx.saved_tensors
        return -(inverse.mT @ grad @ inverse.mT)
