"""Per-chunk pieces shared by the forward and backward kernels: EFLA's step size and the WY/UT system.

For one chunk of C = 64 tokens (derivation in ``efla/ops/chunk.py``) the kernels need alpha (computed here from beta
and lambda = ||k||^2 read from the k tile already in registers, so alpha never goes to memory), the Gram matrix
G = K K^T and T = (I + tril(diag(alpha) G, -1))^-1. ``_wy_fwd_kernel`` writes W = T diag(alpha) K and
U0 = T diag(alpha) V, which the state pass consumes, and keeps T for the backward.

T is a unit lower-triangular inverse computed in two stages, both exact blocked forward substitution (stable, unlike a
Neumann-series product whose powers of A grow like binomials): the four 16 x 16 diagonal blocks by column
substitution, X <- (I - a_j e_j^T) X for j = 0..15, then two doubling steps
[[X1, 0], [A21, X2]]^-1 = [[X1, 0], [-X2 A21 X1, X2]] done as 64 x 64 matrix products on the tensor cores.
The alpha series and phi' follow ``efla/ops/alpha.py``.

Gated (GATED, log decay g): with G the chunk's cumulative log decay and D[t, i] = exp(G_t - G_i) (t >= i; at float32
accuracy formed as the sum of g over tokens i+1..t, not as a difference, see ``_log_decay``), the system
is A = tril(diag(alpha) (K K^T * D), -1), W = T diag(alpha exp(G)) K and U0 = T diag(eta) V. alpha and the write
step eta are computed in the kernels from beta, lambda and g (``_gated_step_sizes``), and their gradients taken on to
beta, lambda and g there (``_step_size_slopes``), as ``efla/ops/alpha.py`` does in PyTorch: neither goes to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from efla.ops.triton.launch import launch
from efla.ops.triton.tiles import _chunk_rows, _tile_offsets, _token_values, _v_block

CHUNK = 64  # tokens per chunk in every Triton kernel


@triton.jit
def _phi(x):
    """(1 - e^-x) / x: Taylor series below 0.5 (Horner, 12 terms), the closed form above."""
    small = x < 0.5
    xs = tl.where(small, x, 0.0)
    series = tl.zeros_like(x) + 1.0
    for m in tl.static_range(13, 1, -1):  # phi = 1 - x/2 (1 - x/3 (1 - x/4 (...)))
        series = 1.0 - xs / m * series
    xl = tl.where(small, 1.0, x)
    return tl.where(small, series, (1.0 - tl.exp(-xl)) / xl)


@triton.jit
def _phi_prime(x):
    """d phi / dx: Taylor series below 1 (16 terms), (e^-x - phi(x)) / x above."""
    small = x < 1.0
    xs = tl.where(small, x, 0.0)
    series = tl.zeros_like(x) + 1.0
    # phi' = -1/2 (1 - x 2/(1*3) (1 - x 3/(2*4) (1 - ...))), ratio of terms n+1 and n is -x (n+1) / (n (n+2))
    for n in tl.static_range(15, 0, -1):
        series = 1.0 - xs * ((n + 1) / (n * (n + 2))) * series
    xl = tl.where(small, 1.0, x)
    return tl.where(small, -0.5 * series, (tl.exp(-xl) - _phi(xl)) / xl)


@triton.jit
def _step_size(beta, lam, EFLA: tl.constexpr):
    """alpha for EFLA (beta phi(x) below x = beta lam = 1, (1 - e^-x) / lam above, so x = inf or beta = inf give the
    exact limit 1 / lam; a zero key gives no step), beta itself for the delta rule."""
    if EFLA:
        x = tl.where(lam == 0.0, 0.0, beta * lam)
        large = x >= 1.0
        return tl.where(large, (1.0 - tl.exp(-x)) / tl.where(large, lam, 1.0),
                        tl.where(large, 0.0, beta) * _phi(tl.where(large, 0.0, x)))
    else:
        return beta


@triton.jit
def _gated_step_sizes(beta, lam, g, EFLA: tl.constexpr):
    """(alpha, eta), the erase and write steps of the gated recurrence: EFLA's alpha and eta = beta phi(beta lam - g)
    (alpha itself where g = 0, so no decay gives the ungated step bit for bit), or (beta, beta) for Gated DeltaNet."""
    if EFLA:
        alpha = _step_size(beta, lam, EFLA)
        y = tl.where(lam == 0.0, 0.0, beta * lam) - g
        return alpha, tl.where(g == 0.0, alpha, beta * _phi(y))
    else:
        return beta, beta


@triton.jit
def _step_size_slopes(beta, lam, g, alpha, EFLA: tl.constexpr, GATED: tl.constexpr):
    """The derivatives of alpha and eta (``_gated_step_sizes``; without GATED eta is alpha, so its own are 0):
    (d alpha / d beta, d alpha / d lambda, d eta / d beta, d eta / d lambda, d eta / d g), with ``efla/ops/alpha.py``'s
    identities: d alpha / d beta = e^-x, d eta / d beta = e^-y + g phi'(y) (two terms >= 0), d eta / d lambda =
    beta^2 phi'(y), d eta / d g = -beta phi'(y); x = beta lambda, y = x - g. The gradient kernel forms them before its
    V loop, where few registers are live, and only multiplies by them after it (computed after the loop, this math
    made the kernel spill)."""
    if EFLA:
        x = tl.where(lam == 0.0, 0.0, beta * lam)
        if GATED:
            y = x - g
            slope = _phi_prime(y)
            return (tl.exp(-x), _alpha_lam_grad(beta, lam, alpha), tl.exp(-y) + g * slope, beta * beta * slope,
                    -beta * slope)
        else:
            zero = tl.zeros_like(lam)
            return tl.exp(-x), _alpha_lam_grad(beta, lam, alpha), zero, zero, zero
    else:
        one, zero = tl.zeros_like(lam) + 1.0, tl.zeros_like(lam)
        return one, zero, one, zero, zero


@triton.jit
def _chunk_decay(g, tok, r, rmask, H):
    """The chunk's log decays g [64] (float32; 0 on padding rows) and, each a direct sum of them: G_t = g_0 + ... +
    g_t (from the chunk's start), G_C - G_t = the sum over the tokens after t (to its end) and G_C (the total). Never
    a difference of running sums, which loses float32 accuracy once the chunk's total decay is large. The sums to the
    end are a reverse scan of the decays read one row on (g_{t+1}), not a 64 x 64 masked reduction."""
    gv = _token_values(g, tok, r, rmask, H)
    gc = tl.cumsum(gv, 0)
    return gv, gc, _remaining_sums(gv, gc, g, tok, r, rmask, H, "ieee"), tl.sum(gv, 0)


@triton.jit
def _remaining_sums(gv, gc, g, tok, r, rmask, H, PREC: tl.constexpr):
    """G_C - G_t, the sum of the log decays after each token t to the chunk's end, from the chunk's decays gv and
    their running sums gc. At float32 accuracy a reverse scan of g read one row on (``_chunk_decay``); at "tf32" the
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
def _decay_matrix(gv, r, PREC: tl.constexpr, TRANSPOSE: tl.constexpr = False):
    """D[t, i] = exp(g_{i+1} + ... + g_t) for t >= i (every exponent <= 0), 0 above the diagonal; with TRANSPOSE its
    transpose, formed as such (``_log_decay``)."""
    return _decay_matrix_of(gv, tl.cumsum(gv, 0), r, PREC, TRANSPOSE)


@triton.jit
def _decay_matrix_of(gv, gc, r, PREC: tl.constexpr, TRANSPOSE: tl.constexpr = False):
    """``_decay_matrix`` from the log decays gv and their running sums gc, when both are at hand."""
    causal = r[:, None] <= r[None, :] if TRANSPOSE else r[:, None] >= r[None, :]
    return tl.where(causal, tl.exp(tl.minimum(_log_decay(gv, gc, r, PREC, TRANSPOSE), 0.0)), 0.0)


@triton.jit
def _stored_decay(sums, tok, r, rmask, rows, H):
    """The chunk's sums of log decays as the WY pass stored them (``_wy_fwd_kernel``, [TT, H, 2] float32):
    (G_t = g_0 + ... + g_t, G_C - G_t = the sum over the tokens after t, G_C) for its ``rows`` tokens. The
    sequential state passes read them rather than scan g each chunk: the scans' cross-warp round trips sat on their
    critical path and made them 2-3 times slower than the ungated passes with one program per multiprocessor."""
    at = sums + (tok + r * H) * 2
    gc = tl.load(at, mask=rmask, other=0.0)
    to_end = tl.load(at + 1, mask=rmask, other=0.0)
    return gc, to_end, tl.load(sums + (tok + (rows - 1) * H) * 2)


@triton.jit
def _alpha_lam_grad(beta, lam, alpha):
    """d alpha / d lam = beta^2 phi'(x): the series below x = 1, (beta e^-x - alpha) / lam above (beta e^-x taken as
    0 past x = 50, which also covers beta = inf), as ``efla/ops/alpha.py``."""
    x = tl.where(lam == 0.0, 0.0, beta * lam)
    large = x >= 1.0
    small_beta = tl.where(large, 0.0, beta)
    fresh = tl.where(large & (x <= 50.0), beta * tl.exp(-tl.minimum(x, 50.0)), 0.0)
    return tl.where(large, (fresh - alpha) / tl.where(large, lam, 1.0),
                    small_beta * small_beta * _phi_prime(tl.where(large, 0.0, x)))


@triton.jit
def _unit_lower_inverse(A, PREC: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular 64 x 64 float32 A."""
    i16 = tl.arange(0, 16)
    blk = tl.arange(0, 4)
    same = blk[:, None, None, None] == blk[None, None, :, None]  # [4, 1, 4, 1]: same 16-block
    D = tl.sum(tl.where(same, tl.reshape(A, [4, 16, 4, 16]), 0.0), axis=2)  # [4, 16, 16] diagonal blocks
    eye = tl.where(i16[:, None] == i16[None, :], 1.0, 0.0)
    X = tl.zeros([4, 16, 16], dtype=tl.float32) + eye[None, :, :]
    for j in tl.static_range(16):
        col = tl.sum(tl.where(i16[None, None, :] == j, D, 0.0), axis=2)  # D[:, :, j]
        row = tl.sum(tl.where(i16[None, :, None] == j, X, 0.0), axis=1)  # X[:, j, :]
        X = X - col[:, :, None] * row[:, None, :]
    T = tl.reshape(tl.where(same, tl.broadcast_to(tl.expand_dims(X, 2), [4, 16, 4, 16]), 0.0), [64, 64])
    r = tl.arange(0, 64)
    for lvl in tl.static_range(2):
        size = 16 << lvl
        lower_left = ((r[:, None] // size) != (r[None, :] // size)) & (
            (r[:, None] // (2 * size)) == (r[None, :] // (2 * size)))
        TA = tl.dot(T, tl.where(lower_left, A, 0.0), input_precision=PREC)
        T = T - tl.dot(TA, T, input_precision=PREC)
    return T


@triton.jit
def _gram(k_tile, PREC: tl.constexpr):
    """G = K K^T (float32) of a [64, K] key tile."""
    return _gram_of(k_tile, k_tile, PREC)


@triton.jit
def _gram_of(a, b, PREC: tl.constexpr):
    """A B^T (float32) of two [64, K] tiles of the same dtype: float32 at PREC, 16-bit at the tensor cores' rate."""
    if a.dtype == tl.float32:
        return tl.dot(a, tl.trans(b), input_precision=PREC)
    else:
        return tl.dot(a, tl.trans(b))


@triton.jit
def _diagonal(M, r):
    """The diagonal of a 64 x 64 tile, as a [64] vector in the tile's row layout."""
    return tl.sum(tl.where(r[:, None] == r[None, :], M, 0.0), axis=1)


@triton.jit
def _key_norms(k_tile, rmask, r, PREC: tl.constexpr):
    """lambda = ||k||^2 of a [64, K] key tile's rows (float32), read off the diagonal of K K^T. A row sum over K
    leaves the 64 values in the tile's load layout, which Triton 3.6 spreads over K, so every thread holds all 64
    and would run the step-size math (series, exponentials, divisions) for every row: on sm_90a at bf16 K = 128 that
    doubled the instruction count of the WY kernel (10,232 against 4,824) and of the gradient kernel (10,480 against
    4,784). On the diagonal of a tensor-core product each thread holds two rows. The second operand's padding rows are
    masked again (they are loaded as zeros) so that the compiler does not merge this product with the Gram matrix the
    gradient kernel forms after its V loop, which would keep a 64 x 64 float32 tile live across the loop."""
    return _diagonal(_gram_of(k_tile, tl.where(rmask[:, None], k_tile, 0.0).to(k_tile.dtype), PREC), r)


@triton.jit
def _chunk_t(k, beta, g, t, tok, kk, r, rmask, H, K: tl.constexpr, EFLA: tl.constexpr, GATED: tl.constexpr,
             LOAD_T: tl.constexpr, PREC: tl.constexpr):
    """Load the chunk's [64, K] key tile and beta [64] (padding rows zero) and return them (beta in float32) with
    alpha, eta (the write step; alpha itself if not GATED), lambda = ||k||^2, T (input dtype), the log decays g [64]
    and their running sums G (if GATED, else zeros; g is read once, here): T is read from t if LOAD_T (stored by the
    training forward), else inverted from A = tril(diag(alpha) K K^T (* D if GATED), -1) as T = (I + A)^-1."""
    k_tile = tl.load(k + tok * K + kk, mask=rmask[:, None], other=0.0)
    b = _token_values(beta, tok, r, rmask, H)
    if LOAD_T:
        lam = _key_norms(k_tile, rmask, r, PREC)
    else:
        gram = _gram(k_tile, PREC)
        lam = _diagonal(gram, r)
    if GATED:
        gv = _token_values(g, tok, r, rmask, H)
        gc = tl.cumsum(gv, 0)
        alpha, eta = _gated_step_sizes(b, lam, gv, EFLA)
    else:
        gv = tl.zeros([64], dtype=tl.float32)
        gc = gv
        alpha = _step_size(b, lam, EFLA)
        eta = alpha
    if LOAD_T:
        Td = tl.load(t + tok * 64 + _tile_offsets(r, H, 64, r), mask=rmask[:, None], other=0.0)
    else:
        A = alpha[:, None] * gram
        if GATED:
            A = A * _decay_matrix_of(gv, gc, r, PREC)
        A = tl.where(r[:, None] > r[None, :], A, 0.0)
        Td = _unit_lower_inverse(A, PREC).to(k_tile.dtype)
    return k_tile, b, alpha, eta, lam, Td, gv, gc


@triton.jit
def _erase_scale(alpha, gc, GATED: tl.constexpr):
    """The row scale of K in the WY system: alpha, or alpha exp(G) if GATED (gc: the running sums of the log decays,
    G_t = g_0 + ... + g_t); V's is the write step eta."""
    if GATED:
        return alpha * tl.exp(gc)
    else:
        return alpha


@triton.jit
def _wy_fwd_kernel(k, v, beta, g, w, u0, t, sums, chunk_seq, chunk_t0, cu_seqlens, H,
                   K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, EFLA: tl.constexpr, GATED: tl.constexpr,
                   STORE_T: tl.constexpr, LOAD_T: tl.constexpr, PREC: tl.constexpr):
    """One program per (chunk, head): W = T diag(alpha) K and U0 = T diag(alpha) V in the input dtype (gated:
    T diag(alpha exp(G)) K and T diag(eta) V). T ([TT, H, 64] rows, input dtype) is computed and, if STORE_T, stored
    for the backward; with LOAD_T it is read from t instead (the backward's recomputation, after a forward that
    stored it). Gated, it also stores each token's G_t and G_C - G_t in sums ([TT, H, 2] float32; G_C - G_t a direct
    sum at float32 accuracy, ``_remaining_sums``) for the state passes."""
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    r, rmask, tok = _chunk_rows(chunk_seq, chunk_t0, cu_seqlens, i_c, i_h, H)
    kk = _tile_offsets(r, H, K, tl.arange(0, K))
    k_tile, _b, alpha, write, _lam, Td, gv, gc = _chunk_t(k, beta, g, t, tok, kk, r, rmask, H, K, EFLA, GATED,
                                                          LOAD_T, PREC)
    erase = _erase_scale(alpha, gc, GATED)
    if GATED:
        tl.store(sums + (tok + r * H) * 2, gc, mask=rmask)
        tl.store(sums + (tok + r * H) * 2 + 1, _remaining_sums(gv, gc, g, tok, r, rmask, H, PREC), mask=rmask)
    if STORE_T:
        tl.store(t + tok * 64 + _tile_offsets(r, H, 64, r), Td, mask=rmask[:, None])
    dt = k_tile.dtype  # operand dtype of the products below: the input's (16-bit inputs run at bf16/fp16 rate)
    w_tile = tl.dot(Td, (erase[:, None] * k_tile.to(tl.float32)).to(dt), input_precision=PREC)
    tl.store(w + tok * K + kk, w_tile.to(w.dtype.element_ty), mask=rmask[:, None])
    for i_v in range(tl.cdiv(V, BV)):
        _ov, _vmask, m, vv = _v_block(i_v, r, rmask, H, V, BV)
        v_tile = tl.load(v + tok * V + vv, mask=m, other=0.0).to(tl.float32)
        u_tile = tl.dot(Td, (write[:, None] * v_tile).to(dt), input_precision=PREC)
        tl.store(u0 + tok * V + vv, u_tile.to(u0.dtype.element_ty), mask=m)


def wy_fwd(*, k, v, beta, chunks, cu, efla: bool, prec: str, t=None, store_t: bool = False, g=None):
    """Launch ``_wy_fwd_kernel`` on packed [TT, H, D] tensors: returns W, U0, T (stored now if ``store_t``, the
    given ``t`` loaded instead of inverting if it is not None, else None) and the chunk sums of the log decays the
    state passes read ([TT, H, 2] float32; None ungated). Gated when g ([TT, H] float32 log decay) is given."""
    H, K = k.shape[1:]
    V = v.shape[-1]
    w, u0 = torch.empty_like(k), torch.empty_like(v)
    load_t = t is not None
    if store_t:
        t = k.new_empty(k.shape[0], H, CHUNK)
    sums = None if g is None else g.new_empty(*g.shape, 2, dtype=torch.float32)
    cfg = launch("wy_fwd", K, V, k.element_size())
    _wy_fwd_kernel[(chunks.total, H)](k, v, beta, g, w, u0, t, sums, chunks.seq, chunks.t0, cu, H, K=K, V=V,
                                      BV=cfg.bv, EFLA=efla, GATED=g is not None, STORE_T=store_t, LOAD_T=load_t,
                                      PREC=prec, num_warps=cfg.warps, num_stages=cfg.stages)
    return w, u0, t, sums
