"""Chunkwise (WY / UT-transform) form of the EFLA / delta-rule recurrence in plain PyTorch.

Derivation. Within a chunk of C tokens starting from state S, write the state after token t as
S_t = S + sum_{i<=t} k_i u_i^T. The recurrence gives u_t = a_t (v_t - S^T k_t - sum_{i<t} (k_i^T k_t) u_i), i.e.

    (I + tril(diag(a) K K^T, -1)) U = diag(a) (V - K S)

so with W and U0 the solutions of that unit lower-triangular system for right-hand sides diag(a) K and diag(a) V,
U = U0 - W S. Then the chunk's outputs and the next state are

    O = scale * (Q S + tril(Q K^T) U),    S' = S + K^T U

(tril inclusive: o_t reads the state after token t). W and U0 depend on the chunk alone, so they are computed for all
chunks at once; only the C x K by K x V products that carry S run chunk after chunk. EFLA and DeltaNet differ only in
a (alpha from beta and ||k||^2, or beta itself), which arrives here already computed.
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

    lower = torch.tril(a * (k @ k.transpose(-1, -2)), diagonal=-1)
    system = lower + torch.eye(C, dtype=dtype, device=k.device)
    # one solve for both right-hand sides: W = system^-1 diag(a) K and U0 = system^-1 diag(a) V
    w, u0 = torch.linalg.solve_triangular(system, a * torch.cat([k, v], -1), upper=False, unitriangular=True).split(
        [K, V], dim=-1)
    qk = torch.tril(q @ k.transpose(-1, -2))

    state = k.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for i in range(n):
        u = u0[:, :, i] - w[:, :, i] @ state
        outputs.append(q[:, :, i] @ state + qk[:, :, i] @ u)
        state = state + k[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(outputs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]
    return scale * o, state
