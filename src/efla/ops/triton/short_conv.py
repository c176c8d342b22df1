"""Short causal depthwise convolution with SiLU on token-major [tokens, C] rows, as a compile-friendly custom op.

    pre_t = sum_{j < W, j <= p_t} w_{W-1-j} x_{t-j},    y_t = silu(pre_t)

p_t is the token's position in its sequence (taps never cross a sequence start), so dense batches and packed
sequences are one code path. Eager PyTorch runs this as a transpose, a channel-first depthwise convolution and a SiLU,
keeps the padded input and the pre-activation, and hands the projection before it a transposed gradient (slow
matrix products); here the forward keeps only x and the backward recomputes pre:

    d_pre = dy silu'(pre),   dx_t = sum_j w_{W-1-j} d_pre_{t+j} [j <= p_{t+j}],   dw_{W-1-j} = sum_t d_pre_t x_{t-j}

dw is summed per block of tokens into a [blocks, W, C] float32 buffer, then over blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_T, _BLOCK_C = 64, 64


@triton.jit
def _pre_activation(x, w, t, c, pos, tmask, cmask, C, W: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(W):
        valid = tmask & (pos >= j)
        xv = tl.load(x + (t - j).to(tl.int64)[:, None] * C + c[None, :], mask=valid[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += xv * tl.load(w + c * W + (W - 1 - j), mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(x, w, pos_ptr, y, total, C, W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask, cmask = t < total, c < C
    pos = tl.load(pos_ptr + t, mask=tmask, other=0)
    pre = _pre_activation(x, w, t, c, pos, tmask, cmask, C, W, BLOCK_T, BLOCK_C)
    out = pre * tl.sigmoid(pre)
    tl.store(y + t.to(tl.int64)[:, None] * C + c[None, :], out.to(y.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _conv_bwd_pre_kernel(x, w, pos_ptr, dy, dpre, dw_part, total, C, W: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """d_pre for a block of tokens, and the block's share of dw."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask, cmask = t < total, c < C
    mask = tmask[:, None] & cmask[None, :]
    pos = tl.load(pos_ptr + t, mask=tmask, other=0)
    pre = _pre_activation(x, w, t, c, pos, tmask, cmask, C, W, BLOCK_T, BLOCK_C)
    s = tl.sigmoid(pre)
    g = tl.load(dy + t.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    d = g * s * (1.0 + pre * (1.0 - s))
    tl.store(dpre + t.to(tl.int64)[:, None] * C + c[None, :], d, mask=mask)
    for j in tl.static_range(W):
        valid = tmask & (pos >= j)
        xv = tl.load(x + (t - j).to(tl.int64)[:, None] * C + c[None, :], mask=valid[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        tl.store(dw_part + (tl.program_id(0) * W + (W - 1 - j)).to(tl.int64) * C + c, tl.sum(d * xv, axis=0),
                 mask=cmask)


@triton.jit
def _conv_bwd_x_kernel(w, pos_ptr, dpre, dx, total, C, W: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask, cmask = t < total, c < C
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(W):
        ahead = t + j
        pos_ahead = tl.load(pos_ptr + ahead, mask=ahead < total, other=-1)
        valid = (ahead < total) & (pos_ahead >= j)  # token t + j sees token t through tap j
        d = tl.load(dpre + ahead.to(tl.int64)[:, None] * C + c[None, :], mask=valid[:, None] & cmask[None, :],
                    other=0.0)
        acc += d * tl.load(w + c * W + (W - 1 - j), mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(dx + t.to(tl.int64)[:, None] * C + c[None, :], acc.to(dx.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


def _grid(total: int, C: int) -> tuple[int, int]:
    return triton.cdiv(total, _BLOCK_T), triton.cdiv(C, _BLOCK_C)


@torch.library.custom_op("efla::short_conv_silu", mutates_args=())
def short_conv_silu_op(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [tokens, C], weight [C, W], positions [tokens] int32 -> silu(causal depthwise conv(x)) [tokens, C]."""
    y = torch.empty_like(x)
    total, C = x.shape
    with torch.cuda.device_of(x):
        _conv_fwd_kernel[_grid(total, C)](x, weight, positions, y, total, C, W=weight.shape[1], BLOCK_T=_BLOCK_T,
                                          BLOCK_C=_BLOCK_C, num_warps=4)
    return y


@short_conv_silu_op.register_fake
def _short_conv_silu_fake(x, weight, positions):
    return torch.empty_like(x)


@torch.library.custom_op("efla::short_conv_silu_backward", mutates_args=())
def short_conv_silu_backward(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor,
                             dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, dweight [C, W] float32)."""
    total, C = x.shape
    W = weight.shape[1]
    grid = _grid(total, C)
    dpre = torch.empty(total, C, device=x.device, dtype=torch.float32)
    dw_part = torch.empty(grid[0], W, C, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    with torch.cuda.device_of(x):
        _conv_bwd_pre_kernel[grid](x, weight, positions, dy, dpre, dw_part, total, C, W=W, BLOCK_T=_BLOCK_T,
                                   BLOCK_C=_BLOCK_C, num_warps=4)
        _conv_bwd_x_kernel[grid](weight, positions, dpre, dx, total, C, W=W, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C,
                                 num_warps=4)
    return dx, dw_part.sum(0).t().contiguous()


@short_conv_silu_backward.register_fake
def _short_conv_silu_backward_fake(x, weight, positions, dy):
    return torch.empty_like(x), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, positions = inputs
    ctx.save_for_backward(x, weight, positions)


def _backward(ctx, dy):
    x, weight, positions = ctx.saved_tensors
    dx, dw = short_conv_silu_backward(x, weight, positions, dy.contiguous())
    return dx, dw.to(weight.dtype), None


short_conv_silu_op.register_autograd(_backward, setup_context=_setup_context)


def short_conv_silu(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv(x)) for x [B, T, C] (each row a sequence) or packed sequences x [1, T, C] with
    cu_seqlens; weight [C, 1, W] (nn.Conv1d's). Zeros before each sequence's start; no host sync."""
    B, T, C = x.shape
    index = torch.arange(B * T, device=x.device, dtype=torch.int32)
    if cu_seqlens is None:
        positions = index % T
    else:
        starts = cu_seqlens.to(device=x.device, dtype=torch.int32)
        document = torch.searchsorted(starts[1:], index, right=True)
        positions = index - starts[document]
    y = short_conv_silu_op(x.reshape(B * T, C).contiguous(), weight[:, 0].contiguous(), positions.to(torch.int32))
    return y.view(B, T, C)
