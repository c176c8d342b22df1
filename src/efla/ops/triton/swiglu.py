"""Fused SwiGLU: y = silu(a) b element-wise, and its backward from a and b alone (silu(a) b is never stored).

    s = sigmoid(a),   da = dy b s (1 + a (1 - s)),   db = dy a s
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(a, b, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    av = tl.load(a + offs, mask=mask, other=0.0).to(tl.float32)
    bv = tl.load(b + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y + offs, (av * tl.sigmoid(av) * bv).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(a, b, dy, da, db, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    av = tl.load(a + offs, mask=mask, other=0.0).to(tl.float32)
    bv = tl.load(b + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(av)
    tl.store(da + offs, (g * bv * s * (1.0 + av * (1.0 - s))).to(da.dtype.element_ty), mask=mask)
    tl.store(db + offs, (g * av * s).to(db.dtype.element_ty), mask=mask)


def swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for contiguous a, b of one shape and dtype."""
    y = torch.empty_like(a)
    with torch.cuda.device_of(a):
        _swiglu_fwd_kernel[(triton.cdiv(a.numel(), _BLOCK),)](a, b, y, a.numel(), BLOCK=_BLOCK, num_warps=4)
    return y


def swiglu_bwd(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    da, db = torch.empty_like(a), torch.empty_like(b)
    with torch.cuda.device_of(a):
        _swiglu_bwd_kernel[(triton.cdiv(a.numel(), _BLOCK),)](a, b, dy, da, db, a.numel(), BLOCK=_BLOCK, num_warps=4)
    return da, db
