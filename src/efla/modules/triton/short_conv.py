"""Short causal depthwise convolution with SiLU on token-major [tokens, C] rows, as a compile-friendly custom op.

    pre_t = sum_{j < W, j <= p_t} w_{W-1-j} x_{t-j},    y_t = silu(pre_t)

p_t is the token's position in its sequence (taps never cross a sequence start), so dense batches and packed
sequences are one code path. Eager PyTorch runs this as a transpose, a channel-first depthwise convolution and a SiLU,
keeps the padded input and the pre-activation, and hands the projection before it a transposed gradient (slow
matrix products); here the forward keeps only x and the backward recomputes pre:

    d_pre = dy silu'(pre),   dx_t = sum_j w_{W-1-j} d_pre_{t+j} [j <= p_{t+j}],   dw_{W-1-j} = sum_t d_pre_t x_{t-j}

dw is summed per block of tokens into a [blocks, W, C] float32 buffer, then over blocks.

A layer's q, k and v convolutions run as one op over their projections side by side, x [tokens, n C] (one matrix
product made them, ``modules/linear.py``): the third grid axis picks the block of C channels, the outputs are n separate
[tokens, C] tensors (the attention kernels read them contiguous), and x's gradient is one [tokens, n C] tensor, which
the projection's backward takes as it is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from efla.ops.varlen import document_index

_BLOCK_T, _BLOCK_C = 64, 64


@triton.jit
def _pre_activation(x, w, t, c, pos, tmask, cmask, XS, W: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """The pre-activation of a [BLOCK_T, BLOCK_C] tile; x's rows are XS elements apart."""
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(W):
        valid = tmask & (pos >= j)
        xv = tl.load(x + (t - j).to(tl.int64)[:, None] * XS + c[None, :], mask=valid[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += xv * tl.load(w + c * W + (W - 1 - j), mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _pick(i, a, b, c):
    """The i-th (0, 1, 2) of three tensors: one launch serves up to three convolutions (q, k and v)."""
    if i == 0:
        chosen = a
    elif i == 1:
        chosen = b
    else:
        chosen = c
    return chosen


@triton.jit
def _conv_fwd_kernel(x, w, pos_ptr, y0, y1, y2, total, C, W: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """Input i (grid axis 2) is x's channels [i C, (i + 1) C) (rows of grid-size * C elements), its output y_i."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tl.program_id(2)
    XS = tl.num_programs(2) * C
    y, x, w = _pick(i, y0, y1, y2), x + i * C, w + i * C * W
    tmask, cmask = t < total, c < C
    pos = tl.load(pos_ptr + t, mask=tmask, other=0)
    pre = _pre_activation(x, w, t, c, pos, tmask, cmask, XS, W, BLOCK_T, BLOCK_C)
    out = pre * tl.sigmoid(pre)
    tl.store(y + t.to(tl.int64)[:, None] * C + c[None, :], out.to(y.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _conv_bwd_pre_kernel(x, w, pos_ptr, dy0, dy1, dy2, dpre, dw_part, total, C, W: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """d_pre for a block of tokens, and the block's share of dw (dpre [N, tokens, C], dw_part [N, blocks, W, C])."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tl.program_id(2)
    XS = tl.num_programs(2) * C
    dy, x, w = _pick(i, dy0, dy1, dy2), x + i * C, w + i * C * W
    dpre += i.to(tl.int64) * total * C
    dw_part += i.to(tl.int64) * tl.num_programs(0) * W * C
    tmask, cmask = t < total, c < C
    mask = tmask[:, None] & cmask[None, :]
    pos = tl.load(pos_ptr + t, mask=tmask, other=0)
    pre = _pre_activation(x, w, t, c, pos, tmask, cmask, XS, W, BLOCK_T, BLOCK_C)
    s = tl.sigmoid(pre)
    g = tl.load(dy + t.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    d = g * s * (1.0 + pre * (1.0 - s))
    tl.store(dpre + t.to(tl.int64)[:, None] * C + c[None, :], d, mask=mask)
    for j in tl.static_range(W):
        valid = tmask & (pos >= j)
        xv = tl.load(x + (t - j).to(tl.int64)[:, None] * XS + c[None, :], mask=valid[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        tl.store(dw_part + (tl.program_id(0) * W + (W - 1 - j)).to(tl.int64) * C + c, tl.sum(d * xv, axis=0),
                 mask=cmask)


@triton.jit
def _conv_bwd_x_kernel(w, pos_ptr, dpre, dx, total, C, W: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """dx [tokens, n C]: input i's gradient into its block of channels."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tl.program_id(2)
    XS = tl.num_programs(2) * C
    dx, w = dx + i * C, w + i * C * W
    dpre += i.to(tl.int64) * total * C
    tmask, cmask = t < total, c < C
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(W):
        ahead = t + j
        pos_ahead = tl.load(pos_ptr + ahead, mask=ahead < total, other=-1)
        valid = (ahead < total) & (pos_ahead >= j)  # token t + j sees token t through tap j
        d = tl.load(dpre + ahead.to(tl.int64)[:, None] * C + c[None, :], mask=valid[:, None] & cmask[None, :],
                    other=0.0)
        acc += d * tl.load(w + c * W + (W - 1 - j), mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(dx + t.to(tl.int64)[:, None] * XS + c[None, :], acc.to(dx.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


def _grid(total: int, C: int, n: int) -> tuple[int, int, int]:
    return triton.cdiv(total, _BLOCK_T), triton.cdiv(C, _BLOCK_C), n


def _three(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The kernels' three pointer slots, the unused ones filled with the first tensor (never read: the launch's
    third grid axis covers only the given ones)."""
    return tensors + [tensors[0]] * (3 - len(tensors))


def _short_conv_forward(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
    """x [tokens, n C] contiguous (n = 1 to 3 inputs side by side), weight [n, C, W], positions [tokens] int32 ->
    n tensors [tokens, C]: silu(causal depthwise conv) of each input with its weight, in one launch."""
    n, C = weight.shape[:2]
    total = x.shape[0]
    ys = [x.new_empty(total, C) for _ in range(n)]
    with torch.cuda.device_of(x):
        _conv_fwd_kernel[_grid(total, C, n)](x, weight, positions, *_three(ys), total, C, W=weight.shape[-1],
                                             BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C, num_warps=4)
    return ys


short_conv_silu_op = torch.library.custom_op("efla::short_conv_silu", _short_conv_forward, mutates_args=())


@short_conv_silu_op.register_fake
def _short_conv_silu_fake(x, weight, positions):
    return [x.new_empty(x.shape[0], weight.shape[1]) for _ in range(weight.shape[0])]


def _short_conv_backward(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor,
                         dys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, dweight [n, C, W] float32)."""
    n, C, W = weight.shape
    total = x.shape[0]
    grid = _grid(total, C, n)
    dpre = torch.empty(n, total, C, device=x.device, dtype=torch.float32)
    dw_part = torch.empty(n, grid[0], W, C, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    with torch.cuda.device_of(x):
        _conv_bwd_pre_kernel[grid](x, weight, positions, *_three(dys), dpre, dw_part, total, C, W=W,
                                   BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C, num_warps=4)
        _conv_bwd_x_kernel[grid](weight, positions, dpre, dx, total, C, W=W, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C,
                                 num_warps=4)
    return dx, dw_part.sum(1).transpose(1, 2).contiguous()


short_conv_silu_backward = torch.library.custom_op("efla::short_conv_silu_backward", _short_conv_backward,
                                                   mutates_args=())


@short_conv_silu_backward.register_fake
def _short_conv_silu_backward_fake(x, weight, positions, dys):
    return torch.empty_like(x), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, positions = inputs
    ctx.save_for_backward(x, weight, positions)


def _gradients(ctx, dys, backward) -> tuple:
    """(dx, dweight, None) from ``backward``: the custom op or its function."""
    x, weight, positions = ctx.saved_tensors
    dys = [x.new_zeros(x.shape[0], weight.shape[1]) if dy is None else dy.contiguous() for dy in dys]
    dx, dw = backward(x, weight, positions, dys)
    return dx, dw.to(weight.dtype), None


def _backward(ctx, dys):
    return _gradients(ctx, dys, short_conv_silu_backward)


short_conv_silu_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerShortConv(torch.autograd.Function):
    """``short_conv_silu_op`` with its gradient outside torch.compile: the same functions without the custom ops'
    dispatch (host time, as ``efla.ops.triton.op.EagerChunk``); the outputs as a tuple."""

    @staticmethod
    def forward(ctx, x, weight, positions):
        ys = _short_conv_forward(x, weight, positions)
        _setup_context(ctx, (x, weight, positions), ys)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        return _gradients(ctx, dys, _short_conv_backward)


def short_conv_silu_split(x: torch.Tensor, weight: torch.Tensor, n: int,
                          cu_seqlens: torch.Tensor | None) -> list[torch.Tensor]:
    """silu(causal depthwise conv(x)) of x [B, T, n C] (each row a sequence, or packed sequences [1, T, n C] with
    cu_seqlens) with weight [n C, 1, W] (the n inputs' nn.Conv1d weights stacked), returned as n tensors
    [B, T, C]: a layer's q, k and v convolutions in one custom op and one launch each way. Zeros before each
    sequence's start; no host sync."""
    if not 1 <= n <= 3 or x.shape[-1] % n or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"short_conv_silu_split takes 1 to 3 inputs side by side in x and a weight per channel "
                         f"(got n={n}, x with {x.shape[-1]} channels, weight with {weight.shape[0]})")
    B, T, NC = x.shape
    C = NC // n
    index = torch.arange(B * T, device=x.device, dtype=torch.int32)
    if cu_seqlens is None:
        positions = index % T
    else:
        starts = cu_seqlens.to(device=x.device, dtype=torch.int32)  # int32 positions, as index
        positions = index - starts[document_index(starts, B * T)]
    conv = short_conv_silu_op if torch.compiler.is_compiling() else _EagerShortConv.apply
    ys = conv(x.reshape(B * T, NC).contiguous(), weight[:, 0].reshape(n, C, -1), positions)
    return [y.view(B, T, C) for y in ys]


def short_conv_silu(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv(x)) for x [B, T, C] (each row a sequence) or packed sequences x [1, T, C] with
    cu_seqlens; weight [C, 1, W] (nn.Conv1d's). Zeros before each sequence's start; no host sync."""
    return short_conv_silu_split(x, weight, 1, cu_seqlens)[0]
