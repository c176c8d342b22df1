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

Gated (``efla/ops/recurrent.py``: S_t = gamma_t (I - a_t k_t k_t^T) S_{t-1} + e_t k_t v_t^T). Let G_t be the chunk's
log decay up to and including token t and D_ti = exp(G_t - G_i) for t >= i (0 above the diagonal): the decay that
token i's write sees by token t. With S_t = exp(G_t) S + sum_{i<=t} D_ti k_i u_i^T, the recurrence gives
u_t = e_t v_t - a_t exp(G_t) S^T k_t - a_t sum_{i<t} D_ti (k_i^T k_t) u_i, so

    (I + tril(diag(a) (K K^T * D), -1)) U = diag(e) V - diag(a exp(G)) K S
    O = scale * (diag(exp(G)) Q S + (tril(Q K^T) * D) U),    S' = exp(G_C) S + K^T diag(D_Ci) U

(* elementwise). The ungated form is D = 1, G = 0, e = a. G_t - G_i is summed directly over tokens i+1..t rather than
taken as a difference of running sums, which would cost float32 accuracy once the chunk's total decay is large.
Nothing overflows: every exponent is <= 0.
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
    g: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
    need_output: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Chunkwise recurrence over equal-length sequences (same contract as ``recurrent_fwd``).

    q, k: [B, T, H, K] (q unread without ``need_output``); v: [B, T, H, V]; alpha: [B, T, H]; initial_state:
    [B, H, K, V] or None; g: [B, T, H] log decay or None; eta: [B, T, H] write step, or None for alpha.
    Returns o: [B, T, H, V] (None when not ``need_output``: only the state recursion runs, which skips the Q K^T and
    output products, about 40 % of the forward's) and the final state [B, H, K, V] in the compute dtype (alpha's).
    """
    B, T, H, _ = k.shape
    C = chunk_size
    dtype = alpha.dtype
    pad = (-T) % C  # padded tokens have a = e = 0, k = 0 and g = 0: they leave the state untouched
    n = (T + pad) // C

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, H, n, C, D]
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        return x.view(B, n, C, H, -1).permute(0, 3, 1, 2, 4)

    def per_token(x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, H, n, C, 1]
        return F.pad(x.to(dtype), (0, 0, 0, pad)).view(B, n, C, H).permute(0, 3, 1, 2).unsqueeze(-1)

    q = to_chunks(q) if need_output else None  # a state-only call never reads q
    k, v = to_chunks(k), to_chunks(v)
    a = per_token(alpha)
    if g is None:
        if eta is not None:
            raise ValueError("chunk_fwd: eta (the gated write step) needs g")
        return _ungated(q, k, v, a, scale, initial_state, T, need_output)
    return _gated(q, k, v, a, per_token(eta if eta is not None else alpha), per_token(g), scale, initial_state, T,
                  need_output)


def _ungated(q, k, v, a, scale, initial_state, T, need_output):
    """The ungated chunk loop on [B, H, n, C, .] chunks (a: [B, H, n, C, 1])."""
    B, H, _, C, K = k.shape
    V, dtype = v.shape[-1], k.dtype
    # masks as multiplications: cheaper than torch.tril on CPU, in both directions of autograd
    causal = torch.ones(C, C, dtype=dtype, device=k.device).tril()
    transform = _UnitLowerInverse.apply((a * (k @ k.transpose(-1, -2))) * causal.tril(-1))

    state = k.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    states, pseudo_values = [], []
    # only the state recursion runs chunk by chunk; unbinding once avoids autograd writing a full-size zero gradient
    # for every indexed chunk
    for k_i, v_i, a_i, t_i in zip(*(x.unbind(2) for x in (k, v, a, transform)), strict=True):
        states.append(state)
        u = t_i @ (a_i * (v_i - k_i @ state))
        pseudo_values.append(u)
        state = state + k_i.transpose(-1, -2) @ u
    if not need_output:
        return None, state
    # O = Q S + tril(Q K^T) U for all chunks as one product: [Q, tril(Q K^T)] @ [S; U]
    qk = (q @ k.transpose(-1, -2)) * causal
    o = q @ torch.stack(states, dim=2) + qk @ torch.stack(pseudo_values, dim=2)
    return scale * _to_tokens(o, T), state


def _gated(q, k, v, a, e, g, scale, initial_state, T, need_output):
    """The gated chunk loop (module docstring) on [B, H, n, C, .] chunks; a, e, g: [B, H, n, C, 1]."""
    B, H, _, C, K = k.shape
    V, dtype = v.shape[-1], k.dtype
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    # log_decay[t, i] = g_{i+1} + ... + g_t for t >= i (0 on the diagonal), -inf above it: D = exp(log_decay).
    # later[i, j] = g_j for tokens j after i; summing it along j up to t gives log_decay[t, i].
    later = torch.where(~causal, g.transpose(-1, -2), 0.0)  # [B, H, n, C, C]; ~causal[i, j]: j > i
    log_decay = torch.where(causal, later.cumsum(-1).transpose(-1, -2), -torch.inf)
    decay = log_decay.exp()
    from_start = (g[..., :1, :] + log_decay[..., 0, None]).exp()  # exp(G_t): [B, H, n, C, 1]
    to_end = decay[..., -1, :, None]  # D_Ci: [B, H, n, C, 1]
    transform = _UnitLowerInverse.apply((a * (k @ k.transpose(-1, -2))) * decay * causal.tril(-1).to(dtype))

    state = k.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    states, pseudo_values = [], []
    chunks = (x.unbind(2) for x in (k, e * v, a * from_start, to_end, from_start[..., -1:, :], transform))
    for k_i, write_i, erase_i, to_end_i, total_i, t_i in zip(*chunks, strict=True):
        states.append(state)
        u = t_i @ (write_i - erase_i * (k_i @ state))
        pseudo_values.append(u)
        state = total_i * state + k_i.transpose(-1, -2) @ (to_end_i * u)
    if not need_output:
        return None, state
    qk = (q @ k.transpose(-1, -2)) * decay
    o = (from_start * q) @ torch.stack(states, dim=2) + qk @ torch.stack(pseudo_values, dim=2)
    return scale * _to_tokens(o, T), state


def _to_tokens(o: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, n, C, V] chunks -> [B, T, H, V], dropping the padding."""
    B, H, n, C, V = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]


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
