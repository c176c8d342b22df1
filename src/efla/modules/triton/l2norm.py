"""Fused L2 normalisation over the last dim of row-major rows (the q/k norm): one program per block of rows.

    r = (||y||^2 + eps)^(-1/2),   n = y r

The backward needs only n (the output, which the attention that follows keeps anyway, so saving it costs nothing) and
r per row (float32):

    dy = r (dn - n (n . dn))

Eager PyTorch runs each side as about eight full passes over the rows in float32 (casts, squares, products); here each
side reads and writes every row once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROWS = 16  # rows per program


@triton.jit
def _l2_norm_fwd_kernel(y, n, r_out, rows, D, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    cmask = cols < D
    for i in range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + i
        if row < rows:
            yr = tl.load(y + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
            r = 1.0 / tl.sqrt(tl.sum(yr * yr, axis=0) + eps)
            tl.store(r_out + row, r)
            tl.store(n + row * D + cols, (yr * r).to(n.dtype.element_ty), mask=cmask)


@triton.jit
def _l2_norm_bwd_kernel(n, r_in, dn, dy, rows, D, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    cmask = cols < D
    for i in range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + i
        if row < rows:
            r = tl.load(r_in + row)
            nr = tl.load(n + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
            d = tl.load(dn + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
            grad = r * (d - nr * tl.sum(nr * d, axis=0))
            tl.store(dy + row * D + cols, grad.to(dy.dtype.element_ty), mask=cmask)


def l2_norm_fwd(y: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y: [rows, D] contiguous; returns n (y's dtype) and r [rows] float32."""
    rows, D = y.shape
    n = torch.empty_like(y)
    r = y.new_empty(rows, dtype=torch.float32)
    with torch.cuda.device_of(y):
        _l2_norm_fwd_kernel[(triton.cdiv(rows, _ROWS),)](y, n, r, rows, D, eps, ROWS=_ROWS,
                                                        BLOCK=triton.next_power_of_2(D), num_warps=4)
    return n, r


def l2_norm_bwd(n: torch.Tensor, r: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
    """The gradient of ``l2_norm_fwd`` with respect to its input (n's dtype), from its outputs n [rows, D] and r and
    the output gradient dn [rows, D]."""
    rows, D = n.shape
    dy = torch.empty_like(n)
    with torch.cuda.device_of(n):
        _l2_norm_bwd_kernel[(triton.cdiv(rows, _ROWS),)](n, r, dn, dy, rows, D, ROWS=_ROWS,
                                                        BLOCK=triton.next_power_of_2(D), num_warps=4)
    return dy
