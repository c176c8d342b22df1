"""Fused SwiGLU: y = silu(a) b element-wise for gate_up = [a | b] (rows of 2 N: the MLP's gate and up projections
side by side, as one matrix product makes them), and its backward from gate_up alone (silu(a) b is never stored),
written as one [a | b]-shaped gradient:

    s = sigmoid(a),   da = dy b s (1 + a (1 - s)),   db = dy a s
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _halves(offs, N):
    """Offsets of a and b in gate_up for flat offsets into the [rows, N] output."""
    a_at = (offs // N) * (2 * N) + offs % N
    return a_at, a_at + N


@triton.jit
def _swiglu_fwd_kernel(gate_up, y, n, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a_at, b_at = _halves(offs, N)
    av = tl.load(gate_up + a_at, mask=mask, other=0.0).to(tl.float32)
    bv = tl.load(gate_up + b_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(y + offs, (av * tl.sigmoid(av) * bv).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gate_up, dy, d_gate_up, n, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a_at, b_at = _halves(offs, N)
    av = tl.load(gate_up + a_at, mask=mask, other=0.0).to(tl.float32)
    bv = tl.load(gate_up + b_at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(av)
    tl.store(d_gate_up + a_at, (g * bv * s * (1.0 + av * (1.0 - s))).to(d_gate_up.dtype.element_ty), mask=mask)
    tl.store(d_gate_up + b_at, (g * av * s).to(d_gate_up.dtype.element_ty), mask=mask)


def swiglu_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a contiguous gate_up [..., 2 N] = [a | b] -> [..., N]."""
    N = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], N)
    with torch.cuda.device_of(gate_up):
        _swiglu_fwd_kernel[(triton.cdiv(y.numel(), _BLOCK),)](gate_up, y, y.numel(), N, BLOCK=_BLOCK, num_warps=4)
    return y


def swiglu_bwd(gate_up: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The gradient of gate_up (its shape) from the output's, dy [..., N] contiguous."""
    N = gate_up.shape[-1] // 2
    d_gate_up = torch.empty_like(gate_up)
    with torch.cuda.device_of(gate_up):
        _swiglu_bwd_kernel[(triton.cdiv(dy.numel(), _BLOCK),)](gate_up, dy, d_gate_up, dy.numel(), N, BLOCK=_BLOCK,
                                                               num_warps=4)
    return d_gate_up
