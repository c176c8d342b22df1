"""Fused RMSNorm, optionally gated by silu(g), over the last dim of row-major rows: one program per block of rows.

    r = (mean(x^2) + eps)^(-1/2),   n = x r w,   y = n            (or y = n silu(g) with a gate)

The forward keeps only r per row; the backward recomputes x r from x (saved by the caller, in the input dtype) and
returns, with dn = dy (or dy silu(g)) and xh = x r:

    dx = r (w dn - xh mean(xh w dn)),   dw = sum_rows dn xh,   dg = dy n silu'(g),  silu'(g) = s (1 + g (1 - s))

dw is summed per program into a [programs, N] float32 buffer, then over programs by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(x, w, g, y, rstd, rows, N, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                         GATE: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    cmask = cols < N
    weight = tl.load(w + cols, mask=cmask, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + i
        if row < rows:
            xr = tl.load(x + row * N + cols, mask=cmask, other=0.0).to(tl.float32)
            r = 1.0 / tl.sqrt(tl.sum(xr * xr, axis=0) / N + eps)
            tl.store(rstd + row, r)
            out = xr * r * weight
            if GATE:
                gr = tl.load(g + row * N + cols, mask=cmask, other=0.0).to(tl.float32)
                out = out * gr * tl.sigmoid(gr)
            tl.store(y + row * N + cols, out.to(y.dtype.element_ty), mask=cmask)


@triton.jit
def _rms_norm_bwd_kernel(x, w, g, rstd, dy, dx, dg, dw_part, rows, N, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                         GATE: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    cmask = cols < N
    weight = tl.load(w + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + i
        if row < rows:
            xh = tl.load(x + row * N + cols, mask=cmask, other=0.0).to(tl.float32)
            r = tl.load(rstd + row)
            xh = xh * r
            dn = tl.load(dy + row * N + cols, mask=cmask, other=0.0).to(tl.float32)
            if GATE:
                gr = tl.load(g + row * N + cols, mask=cmask, other=0.0).to(tl.float32)
                s = tl.sigmoid(gr)
                tl.store(dg + row * N + cols, (dn * xh * weight * s * (1.0 + gr * (1.0 - s))).to(dg.dtype.element_ty),
                         mask=cmask)
                dn = dn * gr * s
            dw += dn * xh
            wdn = weight * dn
            grad = r * (wdn - xh * (tl.sum(xh * wdn, axis=0) / N))
            tl.store(dx + row * N + cols, grad.to(dx.dtype.element_ty), mask=cmask)
    tl.store(dw_part + tl.program_id(0).to(tl.int64) * N + cols, dw, mask=cmask)


def _layout(n: int) -> tuple[int, int]:
    """(BLOCK, rows per program): one power-of-two block per row; enough rows per program that the dw partials stay
    small (at most ~1k programs)."""
    return triton.next_power_of_2(n), 8


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None):
    """x, gate: [rows, N] contiguous; returns y (x's dtype) and r [rows] float32."""
    rows, N = x.shape
    block, per = _layout(N)
    y = torch.empty_like(x)
    rstd = x.new_empty(rows, dtype=torch.float32)
    with torch.cuda.device_of(x):
        _rms_norm_fwd_kernel[(triton.cdiv(rows, per),)](x, weight, gate, y, rstd, rows, N, eps, ROWS=per,
                                                        BLOCK=block, GATE=gate is not None, num_warps=4)
    return y, rstd


def rms_norm_bwd(x, weight, gate, rstd, dy):
    """Gradients (dx, dw float32, dg or None) of ``rms_norm_fwd``."""
    rows, N = x.shape
    block, per = _layout(N)
    programs = triton.cdiv(rows, per)
    dx = torch.empty_like(x)
    dg = None if gate is None else torch.empty_like(gate)
    dw_part = x.new_empty(programs, N, dtype=torch.float32)
    with torch.cuda.device_of(x):
        _rms_norm_bwd_kernel[(programs,)](x, weight, gate, rstd, dy, dx, dg, dw_part, rows, N, ROWS=per, BLOCK=block,
                                          GATE=gate is not None, num_warps=4)
    return dx, dw_part.sum(0), dg
