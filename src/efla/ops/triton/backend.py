"""``backend="triton"``: ``efla_attention``'s Triton backend, which picks a pipeline of ``op.py`` for the call.

Inference (no gradient needed) on at most ``RECURRENT_MAX_T`` tokens runs the fused recurrent kernel, anything else
the chunk kernels. Outside torch.compile the pipelines are called directly, inside it as the custom ops the compiler
traces around. float32 inputs get the dot precision of the active ``KernelSettings`` (``settings.py``) unless
``torch.backends.cuda.matmul.allow_tf32`` is set.
"""

from __future__ import annotations

import os

import torch

from efla.ops.call import AttentionCall
from efla.ops.triton.op import EagerChunk, chunk_forward, fused_recurrent_eager, fused_recurrent_forward
from efla.ops.triton.settings import KernelSettings, active_settings
from efla.ops.triton.tiles import CHUNK

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (16, 32, 64, 128, 256)
RECURRENT_MAX_T = 64  # inference on sequences up to this length runs the fused recurrent kernel


def triton_attention(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the call (already checked by ``efla_attention``) on the Triton kernels: (o in v's dtype, final state
    [N, H, K, V] float32 or None). Gated when the call carries g: the kernels form alpha and the write step eta from
    beta, ||k||^2 and g, and fold the decay into every pass."""
    _check(call.q, call.v, call.chunk_size)
    B, T, H = call.q.shape[:3]
    V = call.v.shape[-1]
    q, k, v = (x.reshape(B * T, H, x.shape[-1]).contiguous() for x in (call.q, call.k, call.v))
    beta = call.beta.reshape(B * T, H).contiguous()
    g = None if call.g is None else call.g.float().reshape(B * T, H).contiguous()
    h0 = None if call.initial_state is None else call.initial_state.contiguous()
    efla = call.mode == "efla"
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, beta, h0, g))
    compiling = torch.compiler.is_compiling()  # the custom ops there; outside, the same code without their dispatch
    if not needs_grad and T <= RECURRENT_MAX_T:
        recurrent = fused_recurrent_forward if compiling else fused_recurrent_eager
        o, ht = recurrent(q, k, v, beta, h0, call.cu_seqlens, B, call.scale, efla, call.output_final_state, g)
    else:
        settings = active_settings()
        chunk = chunk_forward if compiling else EagerChunk.apply
        o, ht, _ = chunk(q, k, v, beta, h0, call.cu_seqlens, call.cu_seqlens_cpu, B, call.scale, efla,
                         call.output_final_state, settings.save_t and needs_grad, _precision(q.dtype, settings), g)
    return o.view(B, T, H, V), (ht if call.output_final_state else None)


def _precision(dtype: torch.dtype, settings: KernelSettings) -> str:
    """input_precision of dot products whose operands are float32 (for 16-bit inputs: intermediates only)."""
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return settings.fp32_dot_precision


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
