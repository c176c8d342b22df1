"""``efla_attention``, the public entry point to the EFLA operator (and ``efla_final_state``, its state alone): checks
the arguments, resolves the defaults, and hands an ``AttentionCall`` to a backend of ``backends.BACKENDS``."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from efla.ops.backends import BACKENDS, chunkwise_final_state
from efla.ops.call import AttentionCall
from efla.ops.checks import assert_values, check_decay, check_inputs


def efla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "efla",
    backend: str = "auto",
    chunk_size: int = 64,
    check_beta: bool = True,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens_cpu: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Error-Free Linear Attention (or the delta rule, ``mode="delta"``) over a batch of sequences.

    For each head, with S_0 = initial_state (zeros if None) and S of shape [K, V]:

        alpha_t = (1 - exp(-beta_t ||k_t||^2)) / ||k_t||^2     (mode="efla"; alpha_t = beta_t for mode="delta")
        S_t     = (I - alpha_t k_t k_t^T) S_{t-1} + alpha_t k_t v_t^T
        o_t     = scale * S_t^T q_t

    With a decay gate g (gamma_t = exp(g_t)), gated EFLA, the exact step of dS/dt = -(c I + k k^T) S + k v^T with
    c = -g / beta (``efla/ops/recurrent.py``), or Gated DeltaNet for mode="delta" (eta_t = alpha_t = beta_t):

        eta_t   = beta_t * phi(beta_t ||k_t||^2 - g_t),   phi(x) = (1 - exp(-x)) / x
        S_t     = gamma_t (I - alpha_t k_t k_t^T) S_{t-1} + eta_t k_t v_t^T

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; one floating dtype (float16, bfloat16, float32 or float64).
        beta: [B, T, H], >= 0, any floating dtype: the step duration (DeltaNet's beta).
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] or None; N = B, or the number of sequences when cu_seqlens is given.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: [N + 1] int32/int64 cumulative lengths of sequences packed along T (then B must be 1); each
            sequence starts from its own initial state and never sees another's.
        mode: "efla" (exact step) or "delta" (DeltaNet's Euler step, same code path).
        backend: "recurrent" (step-by-step reference), "torch" (chunkwise, any device), "triton" (fused GPU kernels),
            "fla" (fla's chunk_delta_rule with alpha precomputed; needs fla-core), "auto" (triton for CUDA
            float16/bfloat16/float32 inputs when installed, else torch). Triton runs float32 with float32-accurate
            ("tf32x3") dot products unless torch.backends.cuda.matmul.allow_tf32 is set (other settings:
            ``efla.ops.triton.settings.kernel_settings``), and inference (no gradients) on
            sequences of at most 64 tokens with a fused recurrent kernel.
        chunk_size: tokens per chunk for the torch backend (fla takes 16/32/64); backend="triton" runs 64 and
            rejects other values, and where "auto" picks Triton it runs 64 whatever chunk_size says.
        check_beta: check beta >= 0 and not NaN (and finite in mode "delta"), and g <= 0. On the CPU a ValueError
            says which; on a GPU the check is a device-side assert, so it never waits for the GPU (an invalid value
            stops the process with "device-side assert triggered"; call ``efla.ops.checks.check_values(beta, mode)``
            for the message). Callers whose beta comes out of a sigmoid and g out of -softplus can turn it off.
        use_qk_l2norm_in_kernel: L2-normalise q and k before the operator, as fla's keyword does (in mode "efla"
            this fixes ||k|| = 1, so alpha = 1 - exp(-beta)); gradients flow through the normalisation.
        cu_seqlens_cpu: a host copy of cu_seqlens (fla's keyword); given, the sequence lengths are read from it
            instead of copying cu_seqlens from the GPU.
        g: [B, T, H] log decay (<= 0, any floating dtype) or None (no decay): gated EFLA / Gated DeltaNet, in every
            backend ("fla" maps to fla's chunk_gated_delta_rule).

    Returns:
        o: [B, T, H, V] in v's dtype, and the final state [N, H, K, V] (float32, float64 for float64 inputs) when
        output_final_state is True, else None. Differentiable in q, k, v, beta, g and initial_state.
    """
    _check_call(q, k, v, beta, initial_state, cu_seqlens, mode, backend, chunk_size, scale, cu_seqlens_cpu, check_beta,
                g)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if use_qk_l2norm_in_kernel:
        q, k = (F.normalize(x.float(), dim=-1, eps=1e-6).to(x.dtype) for x in (q, k))
    if q.shape[1] == 0:
        return _empty(q, v, initial_state, output_final_state, cu_seqlens)
    backend, chunk_size = _resolve_auto(backend, chunk_size, q)
    call = AttentionCall(q, k, v, beta, float(scale), g=g, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
                         mode=mode, chunk_size=chunk_size)
    return BACKENDS[backend](call)


def efla_final_state(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "efla",
    backend: str = "auto",
    chunk_size: int = 64,
    check_beta: bool = True,
    g: torch.Tensor | None = None,
) -> torch.Tensor:
    """The state after the last token of each sequence, [N, H, K, V] (float32, float64 for float64 inputs): what
    ``efla_attention(q, k, v, beta, output_final_state=True, ...)`` returns second, for callers that read the state
    alone (a classifier on the last token, a prompt encoded into a cache). It does not depend on q. The torch backend
    runs only the state recursion, skipping the Q K^T and output products (about 40 % of the chunkwise forward's
    work); the other backends compute the outputs and drop them. Arguments as in ``efla_attention``; differentiable
    in k, v, beta, g and initial_state."""
    _check_call(k, k, v, beta, initial_state, cu_seqlens, mode, backend, chunk_size, None, None, check_beta, g)
    if k.shape[1] == 0:
        return _empty(k, v, initial_state, True, cu_seqlens)[1]
    backend, chunk_size = _resolve_auto(backend, chunk_size, k)
    call = AttentionCall(k, k, v, beta, 1.0, g=g, initial_state=initial_state, output_final_state=True,
                         cu_seqlens=cu_seqlens, mode=mode, chunk_size=chunk_size)  # q = k: the outputs go unread
    if backend == "torch":
        return chunkwise_final_state(call)
    return BACKENDS[backend](call)[1]


def _check_call(q, k, v, beta, initial_state, cu_seqlens, mode, backend, chunk_size, scale, cu_seqlens_cpu,
                check_beta, g) -> None:
    """The argument checks of both entry points: shapes and settings, the decay gate, and (check_beta) the values."""
    check_inputs(q, k, v, beta, initial_state, cu_seqlens, mode, backend, chunk_size, scale, cu_seqlens_cpu)
    if g is not None:
        check_decay(g, beta)
    if check_beta:
        assert_values(beta, mode, g)


def _empty(q, v, initial_state, output_final_state, cu_seqlens):
    """T = 0: no tokens, so the output is empty and each sequence's state is its initial state."""
    B, _, H, K = q.shape
    o = v.new_empty(B, 0, H, v.shape[-1])
    if not output_final_state:
        return o, None
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        return o, q.new_zeros(N, H, K, v.shape[-1], dtype=dtype)
    return o, initial_state.to(dtype)


def _resolve_auto(backend: str, chunk_size: int, x: torch.Tensor) -> tuple[str, int]:
    """backend="auto": Triton for CUDA float16/bfloat16/float32 inputs when installed, else torch. chunk_size is the
    torch backend's setting; where "auto" picks Triton, its fixed chunk replaces it (a model configured with small
    chunks for the CPU runs unchanged on a GPU). An explicit backend keeps both as given."""
    if backend != "auto":
        return backend, chunk_size
    if x.is_cuda and x.dtype != torch.float64 and _triton_installed():
        from efla.ops.triton.tiles import CHUNK

        return "triton", CHUNK
    return "torch", chunk_size


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
