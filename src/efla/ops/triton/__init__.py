"""Triton kernels for EFLA / the delta rule, and ``triton_efla``, the backend behind ``efla_attention``.

Chunk kernels (64 tokens per chunk) for training and long prompts: ``wy.py`` (alpha in-kernel, the WY system),
``chunk_fwd.py`` (state and output passes), ``chunk_bwd.py`` (reverse state pass, per-chunk gradients).
``fused_recurrent.py`` serves inference on short sequences (T <= 64, decode steps). ``tiles.py`` holds the
indexing they share (a chunk's rows, V-blocks, per-chunk states in the packed tensors). The references they are tested
against are ``efla/ops/chunk.py`` and ``efla/ops/recurrent.py``.

Every kernel works on sequences packed along T: equal-length batches are viewed as B sequences of T tokens, so one
code path serves both layouts. float32 inputs get float32-accurate dot products (``FP32_DOT_PRECISION``: "tf32x3"
by default, or exact "ieee") unless ``torch.backends.cuda.matmul.allow_tf32`` is set, the switch PyTorch users
already know for tf32 matmuls.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
import triton

from efla.ops.checks import sequence_lengths
from efla.ops.triton import launch
from efla.ops.triton.chunk_bwd import _grad_qk_kernel, _grad_wy_kernel, _state_bwd_kernel
from efla.ops.triton.chunk_fwd import _out_kernel, _state_fwd_kernel
from efla.ops.triton.fused_recurrent import _fused_recurrent_kernel
from efla.ops.triton.wy import CHUNK, _wy_fwd_kernel

__all__ = ["triton_efla"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (16, 32, 64, 128, 256)
RECURRENT_MAX_T = 64  # inference on sequences up to this length runs the fused recurrent kernel


class _Chunks:
    """Where each 64-token chunk lives in the packed sequence: per chunk its sequence and first token, per
    sequence the global index of its first chunk (rows of the per-chunk state tensors)."""

    def __init__(self, cu_seqlens: torch.Tensor, lengths: list[int] | None, batch: int, length: int):
        device = cu_seqlens.device
        if lengths is None:  # equal lengths: built on the device, no sync
            per_seq = triton.cdiv(length, CHUNK)
            self.seq = torch.arange(batch, device=device, dtype=torch.int32).repeat_interleave(per_seq)
            within = torch.arange(batch * per_seq, device=device, dtype=torch.int32) % per_seq
            self.t0 = self.seq * length + within * CHUNK
            self.first = torch.arange(batch, device=device, dtype=torch.int32) * per_seq
        else:
            counts = [triton.cdiv(n, CHUNK) for n in lengths]
            starts = list(itertools.accumulate(lengths, initial=0))
            seq = [i for i, c in enumerate(counts) for _ in range(c)]
            t0 = [starts[i] + j * CHUNK for i, c in enumerate(counts) for j in range(c)]
            first = list(itertools.accumulate(counts, initial=0))[:-1]
            self.seq, self.t0, self.first = (torch.tensor(x, dtype=torch.int32).to(device) for x in (seq, t0, first))
        self.total = self.seq.numel()


@dataclass
class _PackedPlan:
    """What a cu_seqlens tensor says, read once: its int32 copy, the sequence lengths and, built when the chunk kernels
    first need it (the fused recurrent path does not), the chunk map."""

    source: weakref.ref
    version: int | None
    T: int
    cu: torch.Tensor
    lengths: list[int]
    _chunks: _Chunks | None = None

    def chunks(self) -> _Chunks:
        if self._chunks is None:
            self._chunks = _Chunks(self.cu, self.lengths, 1, self.T)
        return self._chunks


_last_plan: _PackedPlan | None = None


def _packed_plan(cu_seqlens: torch.Tensor, T: int) -> _PackedPlan:
    """The plan of cu_seqlens for T packed tokens. Reading the lengths costs a host-device sync, and every layer of a
    model gets the same cu_seqlens tensor, so the plan of the last tensor seen is kept (keyed by identity, in-place
    version and T): one sync per batch instead of one per layer. Inference-mode tensors carry no version, so they are
    read every time."""
    global _last_plan
    version = None if cu_seqlens.is_inference() else cu_seqlens._version
    last = _last_plan
    if last is not None and last.source() is cu_seqlens and last.version == version and last.T == T:
        return last
    plan = _PackedPlan(weakref.ref(cu_seqlens), version, T, cu_seqlens.to(torch.int32),
                       sequence_lengths(cu_seqlens, T))
    _last_plan = None if version is None else plan
    return plan


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


def _chunk_fwd(q, k, v, beta, scale, h0, chunks, cu, efla, store_ht, keep, t=None, store_t=False):
    """Forward chunk passes on packed [TT, H, D] tensors: o, the final state, T (if ``store_t``: the training
    forward keeps it for the backward) and, if keep, h, u and w. A given ``t`` is T from the forward, loaded instead
    of inverting the triangular system again."""
    H, K = k.shape[1:]
    V = v.shape[-1]
    N = cu.numel() - 1
    prec = _precision(q.dtype)
    state_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    w, u0 = torch.empty_like(k), torch.empty_like(v)
    load_t = t is not None
    if store_t:
        t = k.new_empty(k.shape[0], H, CHUNK)
    cfg = launch.launch("wy_fwd", K, V, q.element_size())
    _wy_fwd_kernel[(chunks.total, H)](k, v, beta, w, u0, t, chunks.seq, chunks.t0, cu, H, K=K, V=V, BV=cfg.bv,
                                      EFLA=efla, STORE_T=store_t, LOAD_T=load_t, PREC=prec,
                                      num_warps=cfg.warps, num_stages=cfg.stages)
    h = k.new_empty(chunks.total, H, K, V, dtype=state_dtype)
    u = torch.empty_like(v)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if store_ht else None
    cfg = launch.launch("state_fwd", K, V, q.element_size())
    _state_fwd_kernel[(N, H, triton.cdiv(V, cfg.bv))](k, w, u0, h, u, h0, ht, cu, chunks.first, H, K=K, V=V,
                                                      BV=cfg.bv, HAS_H0=h0 is not None, STORE_HT=store_ht,
                                                      PREC=prec, num_warps=cfg.warps, num_stages=cfg.stages)
    o = None
    if not keep:
        o = torch.empty_like(v)
        cfg = launch.launch("out", K, V, q.element_size())
        _out_kernel[(chunks.total, H, triton.cdiv(V, cfg.bv))](q, k, u, h, o, chunks.seq, chunks.t0, cu, scale, H,
                                                               K=K, V=V, BV=cfg.bv, PREC=prec, num_warps=cfg.warps,
                                                               num_stages=cfg.stages)
    return o, ht, t, h, u, w


def _chunk_bwd(q, k, v, beta, scale, h0, do, dht, chunks, cu, efla, t):
    """Gradients of the chunk forward: recompute W, h, u (from the forward's T, or inverting again when t is None);
    reverse state pass; per-chunk gradients."""
    H, K = k.shape[1:]
    V = v.shape[-1]
    N = cu.numel() - 1
    prec = _precision(q.dtype)
    *_, h, u, w = _chunk_fwd(q, k, v, beta, scale, h0, chunks, cu, efla, store_ht=False, keep=True, t=t)
    dh = torch.empty_like(h)
    du = torch.empty_like(v)
    dh0 = k.new_empty(N, H, K, V, dtype=torch.float32) if h0 is not None else None
    cfg = launch.launch("state_bwd", K, V, q.element_size())
    _state_bwd_kernel[(N, H, triton.cdiv(V, cfg.bv))](q, k, w, do, du, dh, dht, dh0, cu, chunks.first, scale, H,
                                                      K=K, V=V, BV=cfg.bv, HAS_DHT=dht is not None,
                                                      STORE_DH0=h0 is not None, PREC=prec, num_warps=cfg.warps,
                                                      num_stages=cfg.stages)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dk_part = torch.empty_like(k)  # input dtype, as the dk it becomes part of
    dbeta = torch.empty_like(beta)
    cfg = launch.launch("grad_qk", K, V, q.element_size())
    _grad_qk_kernel[(chunks.total, H)](q, k, u, do, h, dh, dq, dk_part, chunks.seq, chunks.t0, cu, scale, H, K=K, V=V,
                                       BV=cfg.bv, PREC=prec, num_warps=cfg.warps, num_stages=cfg.stages)
    cfg = launch.launch("grad_wy", K, V, q.element_size())
    _grad_wy_kernel[(chunks.total, H)](k, v, beta, t, du, h, dk_part, dk, dv, dbeta, chunks.seq, chunks.t0, cu, H,
                                       K=K, V=V, BV=cfg.bv, EFLA=efla, LOAD_T=t is not None,
                                       KS_IN_LOOP=q.dtype == torch.float32 and K > 128, PREC=prec,
                                       num_warps=cfg.warps, num_stages=cfg.stages)
    return dq, dk, dv, dbeta, dh0


class _ChunkEFLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, h0, scale, chunks, cu, efla, output_final_state):
        store_t = launch.SAVE_T and any(ctx.needs_input_grad[:5])
        o, ht, t, *_ = _chunk_fwd(q, k, v, beta, scale, h0, chunks, cu, efla, output_final_state, keep=False,
                                  store_t=store_t)
        ctx.save_for_backward(q, k, v, beta, h0, t)
        ctx.scale, ctx.chunks, ctx.cu, ctx.efla = scale, chunks, cu, efla
        return o, ht

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dht):
        q, k, v, beta, h0, t = ctx.saved_tensors
        with torch.cuda.device_of(q):  # kernels launch on the current device
            dq, dk, dv, dbeta, dh0 = _chunk_bwd(q, k, v, beta, ctx.scale, h0, do.contiguous(),
                                                None if dht is None else dht.contiguous(), ctx.chunks, ctx.cu, ctx.efla,
                                                t)
        if dh0 is not None:
            dh0 = dh0.to(h0.dtype)
        return dq, dk, dv, dbeta, dh0, None, None, None, None, None


def _fused_recurrent(q, k, v, beta, scale, h0, cu, efla, output_final_state):
    H, K = k.shape[1:]
    V = v.shape[-1]
    N = cu.numel() - 1
    o = torch.empty_like(v)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    bv = min(V, 32 if K <= 128 else 16)
    _fused_recurrent_kernel[(N, H, triton.cdiv(V, bv))](q, k, v, beta, o, h0, ht, cu, scale, H, K=K, V=V, BV=bv,
                                                        EFLA=efla, HAS_H0=h0 is not None,
                                                        STORE_HT=output_final_state, num_warps=4)
    return o, ht


def triton_efla(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size):
    """``efla_attention``'s Triton backend (arguments as there, already checked); returns (o in v.dtype, state).

    Chunks are always 64 tokens (``chunk_size`` only tunes the PyTorch backend; the result does not depend on it).
    Inference (no gradient needed) on sequences of at most 64 tokens runs the fused recurrent kernel.
    """
    del chunk_size
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' takes float16, bfloat16 or float32 inputs (got {q.dtype}); "
                        "use backend='torch' for float64")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K not in _HEAD_DIMS or V not in _HEAD_DIMS:
        raise ValueError(f"backend='triton' needs head dims K and V in {_HEAD_DIMS} (got K={K}, V={V}); "
                         "use backend='torch' for other sizes")
    q, k, v = (x.reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v))
    beta = beta.reshape(B * T, H).contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    if cu_seqlens is None:
        cu = torch.arange(0, B + 1, device=q.device, dtype=torch.int32) * T
        lengths = None
    else:
        plan = _packed_plan(cu_seqlens, T)
        cu, lengths = plan.cu, plan.lengths
    efla = mode == "efla"
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, beta, h0))
    max_len = T if lengths is None else max(lengths, default=0)
    with torch.cuda.device_of(q):  # kernels launch on the current device
        if not needs_grad and max_len <= RECURRENT_MAX_T:
            o, ht = _fused_recurrent(q, k, v, beta, scale, h0, cu, efla, output_final_state)
        else:
            chunks = _Chunks(cu, None, B, T) if cu_seqlens is None else plan.chunks()
            o, ht = _ChunkEFLA.apply(q, k, v, beta, h0, scale, chunks, cu, efla, output_final_state)
    return o.view(B, T, H, V), ht
