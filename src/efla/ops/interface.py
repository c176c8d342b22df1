"""``efla_attention``, the public entry point to the EFLA operator (and ``efla_final_state``, its state alone);
dispatches to a backend."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from efla.ops import varlen
from efla.ops.alpha import gated_step_sizes, step_sizes, unit_key_form
from efla.ops.checks import assert_values, check_decay, check_inputs, sequence_lengths
from efla.ops.chunk import chunk_fwd
from efla.ops.recurrent import recurrent_fwd


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
            float16/bfloat16/float32 inputs when installed, else torch). Triton runs float32 with exact ("ieee")
            dot products unless torch.backends.cuda.matmul.allow_tf32 is set, and inference (no gradients) on
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
    lengths_from = cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu
    if g is None:
        return _BACKENDS[backend]()(q, k, v, beta, float(scale), initial_state, output_final_state, cu_seqlens, mode,
                                    chunk_size, lengths_from)
    return _GATED_BACKENDS[backend]()(q, k, v, beta, g, float(scale), initial_state, output_final_state, cu_seqlens,
                                      mode, chunk_size, lengths_from)


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
    if backend != "torch":
        return efla_attention(k, k, v, beta, initial_state=initial_state, output_final_state=True,
                              cu_seqlens=cu_seqlens, mode=mode, backend=backend, chunk_size=chunk_size,
                              check_beta=False, g=g)[1]
    state_only = functools.partial(chunk_fwd, need_output=False)
    if g is None:
        run = _reference_backend(state_only)
        return run(k, k, v, beta, 1.0, initial_state, True, cu_seqlens, mode, chunk_size, cu_seqlens)[1]
    run = _gated_reference_backend(state_only)
    return run(k, k, v, beta, g, 1.0, initial_state, True, cu_seqlens, mode, chunk_size, cu_seqlens)[1]


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
        from efla.ops.triton.wy import CHUNK

        return "triton", CHUNK
    return "torch", chunk_size


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _reference_backend(kernel: Callable) -> Callable:
    """Wrap a PyTorch forward (recurrent or chunkwise) with alpha, varlen packing and output dtypes."""

    def run(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size, lengths_from):
        out_dtype = v.dtype
        if mode == "efla":  # unit keys, so that no product holds ||k||^2 (finite for any key norm and beta)
            k, v, alpha = unit_key_form(k, v, beta)
        else:
            alpha = step_sizes(k, beta, mode)
        alpha = alpha.to(torch.promote_types(q.dtype, torch.float32))
        o, state = _per_sequence(kernel, cu_seqlens, lengths_from, (q, k, v, alpha), scale, initial_state, chunk_size)
        if o is None:  # a state-only kernel (efla_final_state)
            return None, state
        return o.to(out_dtype), (state if output_final_state else None)

    return run


def _gated_reference_backend(kernel: Callable) -> Callable:
    """Wrap a PyTorch forward with the gated step sizes (alpha, eta), varlen packing and output dtypes."""

    def run(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size, lengths_from):
        dtype = torch.promote_types(q.dtype, torch.float32)
        alpha, eta = (x.to(dtype) for x in gated_step_sizes(k, beta, g, mode))
        g = g.to(dtype)

        def gated(q, k, v, alpha, g, eta, *args):
            return kernel(q, k, v, alpha, *args, g=g, eta=eta)

        o, state = _per_sequence(gated, cu_seqlens, lengths_from, (q, k, v, alpha, g, eta), scale, initial_state,
                                 chunk_size)
        if o is None:  # a state-only kernel (efla_final_state)
            return None, state
        return o.to(v.dtype), (state if output_final_state else None)

    return run


def _per_sequence(kernel: Callable, cu_seqlens: torch.Tensor | None, lengths_from: torch.Tensor | None,
                  tokens: tuple[torch.Tensor, ...], *args: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    """kernel(*tokens, *args) for per-token tensors [B, T, ...]; with packed sequences (cu_seqlens) each sequence
    becomes a padded row first and the output is packed back (``_per_packed_sequence``)."""
    if cu_seqlens is None:
        return kernel(*tokens, *args)
    return _per_packed_sequence(kernel, lengths_from, tokens, *args)


@torch.compiler.disable
def _per_packed_sequence(kernel: Callable, lengths_from: torch.Tensor, tokens: tuple[torch.Tensor, ...],
                         *args: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``_per_sequence`` on packed sequences, never traced: the lengths are read on the host and the shapes follow
    them, so traced it would recompile for every new set of lengths (torch.compile sees one graph break here; the
    Triton backend reads the lengths inside its custom ops and needs none)."""
    lengths = sequence_lengths(lengths_from, tokens[0].shape[1])
    o, state = kernel(*(varlen.unpack(x, lengths) for x in tokens), *args)
    return (None if o is None else varlen.pack(o, lengths)), state


def _gated_triton_backend() -> Callable:
    try:
        from efla.ops.triton import triton_gated_efla
    except ImportError as error:
        raise RuntimeError(f"backend='triton' needs the Triton kernels and a CUDA GPU ({error})") from error
    return triton_gated_efla


def _gated_fla_backend() -> Callable:
    try:
        from efla.ops.fla_backend import fla_gated_efla
    except ImportError as error:
        raise RuntimeError(f"backend='fla' needs fla-core: pip install 'efla[bench]' ({error})") from error
    return fla_gated_efla


def _triton_backend() -> Callable:
    try:
        from efla.ops.triton import triton_efla
    except ImportError as error:
        raise RuntimeError(f"backend='triton' needs the Triton kernels and a CUDA GPU ({error})") from error
    return triton_efla


def _fla_backend() -> Callable:
    try:
        from efla.ops.fla_backend import fla_efla
    except ImportError as error:
        raise RuntimeError(f"backend='fla' needs fla-core: pip install 'efla[bench]' ({error})") from error
    return fla_efla


_BACKENDS: dict[str, Callable[[], Callable]] = {
    "recurrent": lambda: _reference_backend(lambda q, k, v, a, scale, s0, _chunk: recurrent_fwd(q, k, v, a, scale, s0)),
    "torch": lambda: _reference_backend(chunk_fwd),
    "triton": _triton_backend,
    "fla": _fla_backend,
}

_GATED_BACKENDS: dict[str, Callable[[], Callable]] = {
    "recurrent": lambda: _gated_reference_backend(
        lambda q, k, v, a, scale, s0, _chunk, g, eta: recurrent_fwd(q, k, v, a, scale, s0, g=g, eta=eta)),
    "torch": lambda: _gated_reference_backend(chunk_fwd),
    "triton": _gated_triton_backend,
    "fla": _gated_fla_backend,
}
