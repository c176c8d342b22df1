"""The decay gate's per-chunk sums inside the kernels: running sums of the log decays g, the sums to the chunk's end,
and the decay matrix D[t, i] = exp(g_{i+1} + ... + g_t) (derivation in ``efla/ops/chunk.py``).

At float32 accuracy every span's sum is formed directly from g, never as a difference of running sums, which loses
float32 accuracy once a chunk's total decay is large; at "tf32" (16-bit inputs, or tf32 chosen) the differences are
taken, their loss far below the inputs' rounding (``_log_decay``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from efla.ops.triton.tiles import token_values


@triton.jit
def chunk_decay(g, tok, r, rmask, H):
    """The chunk's log decays g [64] (float32; 0 on padding rows) and, each a direct sum of them: G_t = g_0 + ... +
    g_t (from the chunk's start), G_C - G_t = the sum over the tokens after t (to its end) and G_C (the total). Never
    a difference of running sums, which loses float32 accuracy once the chunk's total decay is large. The sums to the
    end are a reverse scan of the decays read one row on (g_{t+1}), not a 64 x 64 masked reduction."""
    gv = token_values(g, tok, r, rmask, H)
    gc = tl.cumsum(gv, 0)
    return gv, gc, remaining_sums(gv, gc, g, tok, r, rmask, H, "ieee"), tl.sum(gv, 0)


@triton.jit
def remaining_sums(gv, gc, g, tok, r, rmask, H, PREC: tl.constexpr):
    """G_C - G_t, the sum of the log decays after each token t to the chunk's end, from the chunk's decays gv and
    their running sums gc. At float32 accuracy a reverse scan of g read one row on (``chunk_decay``); at "tf32" the
    difference of the total and gc, whose loss (about 1e-7 of |G| in the exponent) is far below 16-bit inputs'
    rounding (``_log_decay``): no second read of g and no second scan."""
    if PREC == "tf32":
        return tl.sum(gv, 0) - gc
    else:
        next_row = (r + 1) < tl.sum(rmask.to(tl.int32), 0)
        g_next = tl.load(g + tok + (r + 1) * H, mask=next_row, other=0.0).to(tl.float32)
        return tl.cumsum(g_next, 0, reverse=True)


@triton.jit
def _log_decay(gv, gc, r, PREC: tl.constexpr, TRANSPOSE: tl.constexpr):
    """[t, i] = g_{i+1} + ... + g_t for t >= i (callers mask the rest), laid out as [i, t] if TRANSPOSE, from the
    chunk's log decays gv and their running sums gc (G_t = g_0 + ... + g_t). At float32 accuracy ("tf32x3" or
    "ieee", float32 inputs) the sums are formed directly from gv, as one 64 x 64 product of the causal ones and the
    g's after each column: a difference of running sums G_t - G_i loses float32 accuracy once the chunk's total decay
    is large. At "tf32" (16-bit inputs, or tf32 chosen) that loss, about 1e-7 of |G| in the exponent, is far below
    the inputs' rounding, so the difference of gc is taken: no product, no layout changes, a few instructions (the
    state passes run this once per chunk on their sequential path). The transpose is built on its own rather than by
    tl.trans: Triton 3.4 to 3.7.0 on Hopper miscompiles 16-bit products whose operand is the transpose of another
    product's result (fla issue 640), which made the gated backward's bfloat16 gradients wrong by several percent."""
    if PREC == "tf32":
        if TRANSPOSE:
            return gc[None, :] - gc[:, None]
        else:
            return gc[:, None] - gc[None, :]
    else:
        if TRANSPOSE:
            later_t = tl.where(r[None, :] > r[:, None], gv[None, :], 0.0)  # [i, j]: g_j for tokens j after i
            return tl.dot(later_t, tl.where(r[:, None] <= r[None, :], 1.0, 0.0), input_precision=PREC)
        else:
            later = tl.where(r[:, None] > r[None, :], gv[:, None], 0.0)  # [j, i]: g_j for tokens j after i
            return tl.dot(tl.where(r[:, None] >= r[None, :], 1.0, 0.0), later, input_precision=PREC)


@triton.jit
def decay_matrix(gv, r, PREC: tl.constexpr, TRANSPOSE: tl.constexpr = False):
    """D[t, i] = exp(g_{i+1} + ... + g_t) for t >= i (every exponent <= 0), 0 above the diagonal; with TRANSPOSE its
    transpose, formed as such (``_log_decay``)."""
    return decay_matrix_of(gv, tl.cumsum(gv, 0), r, PREC, TRANSPOSE)


@triton.jit
def decay_matrix_of(gv, gc, r, PREC: tl.constexpr, TRANSPOSE: tl.constexpr = False):
    """``decay_matrix`` from the log decays gv and their running sums gc, when both are at hand."""
    causal = r[:, None] <= r[None, :] if TRANSPOSE else r[:, None] >= r[None, :]
    return tl.where(causal, tl.exp(tl.minimum(_log_decay(gv, gc, r, PREC, TRANSPOSE), 0.0)), 0.0)


@triton.jit
def stored_decay(sums, tok, r, rmask, rows, H):
    """The chunk's sums of log decays as the WY pass stored them (``_wy_fwd_kernel``, [TT, H, 2] float32):
    (G_t = g_0 + ... + g_t, G_C - G_t = the sum over the tokens after t, G_C) for its ``rows`` tokens. The
    sequential state passes read them rather than scan g each chunk: the scans' cross-warp round trips sat on their
    critical path and made them 2-3 times slower than the ungated passes with one program per multiprocessor."""
    at = sums + (tok + r * H) * 2
    gc = tl.load(at, mask=rmask, other=0.0)
    to_end = tl.load(at + 1, mask=rmask, other=0.0)
    return gc, to_end, tl.load(sums + (tok + (rows - 1) * H) * 2)
