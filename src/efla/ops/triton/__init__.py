"""Triton kernels for EFLA / the delta rule, and ``triton_efla``, the backend behind ``efla_attention``.

Chunk kernels (``CHUNK`` = 64 tokens per chunk) for training and long prompts: ``wy.py`` (alpha in-kernel, the WY
system), ``chunk_fwd.py`` (state and output passes), ``chunk_bwd.py`` (reverse state pass, per-chunk gradients).
``fused_recurrent.py`` serves inference on short sequences (T <= 64, decode steps). Each file holds its kernels and
the launcher of each; ``op.py`` chains the launchers into ``torch.library`` custom ops (forward, backward, decode);
``plan.py`` maps chunks to packed sequences; ``tiles.py`` holds the indexing the kernels share; ``launch.py`` the
launch settings. The references they are tested against are ``efla/ops/chunk.py`` and ``efla/ops/recurrent.py``.

Every kernel works on sequences packed along T: equal-length batches are viewed as B sequences of T tokens, so one
code path serves both layouts. float32 inputs get float32-accurate dot products (``FP32_DOT_PRECISION``: "tf32x3"
by default, or exact "ieee") unless ``torch.backends.cuda.matmul.allow_tf32`` is set, the switch PyTorch users
already know for tf32 matmuls.
"""

from __future__ import annotations

import os

import torch

from efla.ops.triton import launch
from efla.ops.triton.op import EagerChunk, chunk_forward, fused_recurrent_eager, fused_recurrent_forward
from efla.ops.triton.wy import CHUNK

__all__ = ["CHUNK", "FP32_DOT_PRECISION", "triton_efla", "triton_gated_efla"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (16, 32, 64, 128, 256)
RECURRENT_MAX_T = 64  # inference on sequences up to this length runs the fused recurrent kernel

FP32_DOT_PRECISION = "tf32x3"
"""Dot products for float32 inputs: "tf32x3" (three tf32 tensor-core products per dot, float32-accurate) or "ieee"
(exact float32 FMA; slow, and compiling the gradient kernels takes minutes). Set it on this module to switch;
``torch.backends.cuda.matmul.allow_tf32 = True`` selects plain tf32 instead."""


def _precision(dtype: torch.dtype) -> str:
    """input_precision of dot products whose operands are float32 (for 16-bit inputs: intermediates only)."""
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    if FP32_DOT_PRECISION not in ("tf32x3", "ieee"):
        raise ValueError(f"FP32_DOT_PRECISION must be 'tf32x3' or 'ieee' (got {FP32_DOT_PRECISION!r})")
    return FP32_DOT_PRECISION


def _check(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> None:
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend='triton' needs CUDA tensors (q is on {q.device}): move the inputs to a GPU, or "
                           "use backend='torch' (or 'auto') on the CPU")
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' takes float16, bfloat16 or float32 inputs (got {q.dtype}); "
                        "use backend='torch' for float64")
    K, V = q.shape[-1], v.shape[-1]
    if K not in _HEAD_DIMS or V not in _HEAD_DIMS:
        raise ValueError(f"backend='triton' needs head dims K and V in {_HEAD_DIMS} (got K={K}, V={V}); "
                         "use backend='torch' for other sizes")
    if chunk_size != CHUNK:
        raise ValueError(f"backend='triton' always runs {CHUNK}-token chunks (got chunk_size={chunk_size}); leave "
                         f"chunk_size at {CHUNK} or use backend='torch'")


def triton_efla(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size, lengths_from):
    """``efla_attention``'s Triton backend (arguments as there, already checked); returns (o in v.dtype, state).

    Inference (no gradient needed) on at most 64 tokens runs the fused recurrent kernel, anything else the chunk
    kernels. ``lengths_from`` is cu_seqlens or its host copy: where the sequence lengths are read.
    """
    return _run(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, mode == "efla", chunk_size,
                lengths_from)


def triton_gated_efla(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size,
                      lengths_from):
    """``efla_attention``'s Triton backend with the decay gate g [B, T, H] (gated EFLA, or Gated DeltaNet).

    The kernels form alpha and the write step eta from beta, ||k||^2 and g, and take their gradients on to all three
    (``wy.py``); the decay itself is folded into the chunk kernels (``wy.py``, ``chunk_fwd.py``, ``chunk_bwd.py``)
    and the fused recurrent kernel.
    """
    B, T, H = q.shape[:3]
    return _run(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, mode == "efla", chunk_size,
                lengths_from, g=g.float().reshape(B * T, H).contiguous())


def _run(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, efla, chunk_size, lengths_from,
         g=None):
    _check(q, v, chunk_size)
    B, T, H = q.shape[:3]
    V = v.shape[-1]
    q, k, v = (x.reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v))
    beta = beta.reshape(B * T, H).contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    cu_cpu = lengths_from if lengths_from is not None and lengths_from is not cu_seqlens else None
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, beta, h0, g))
    compiling = torch.compiler.is_compiling()  # the custom ops there; outside, the same code without their dispatch
    if not needs_grad and T <= RECURRENT_MAX_T:
        recurrent = fused_recurrent_forward if compiling else fused_recurrent_eager
        o, ht = recurrent(q, k, v, beta, h0, cu_seqlens, B, scale, efla, output_final_state, g)
    else:
        chunk = chunk_forward if compiling else EagerChunk.apply
        o, ht, _ = chunk(q, k, v, beta, h0, cu_seqlens, cu_cpu, B, scale, efla, output_final_state,
                         launch.SAVE_T and needs_grad, _precision(q.dtype), g)
    return o.view(B, T, H, V), (ht if output_final_state else None)
