"""The WY/UT system of a chunk, shared by the forward and the backward kernels, and the WY pass that writes it.

For one chunk of C = 64 tokens (derivation in ``efla/ops/chunk.py``) the kernels need alpha (computed from beta and
lambda = ||k||^2 read from the k tile already in registers, so alpha never goes to memory: ``step_sizes.py``), the
Gram matrix G = K K^T and T = (I + tril(diag(alpha) G, -1))^-1 (``chunk_t``). ``_wy_fwd_kernel`` writes
W = T diag(alpha) K and U0 = T diag(alpha) V, which the state pass consumes, and keeps T for the backward.

T is a unit lower-triangular inverse computed in two stages, both exact blocked forward substitution (stable, unlike a
Neumann-series product whose powers of A grow like binomials): the four 16 x 16 diagonal blocks by column
substitution, X <- (I - a_j e_j^T) X for j = 0..15, then two doubling steps
[[X1, 0], [A21, X2]]^-1 = [[X1, 0], [-X2 A21 X1, X2]] done as 64 x 64 matrix products on the tensor cores.

Gated (GATED, log decay g): with G the chunk's cumulative log decay and D[t, i] = exp(G_t - G_i) (t >= i; at float32
accuracy formed as the sum of g over tokens i+1..t, not as a difference: ``decay.py``), the system
is A = tril(diag(alpha) (K K^T * D), -1), W = T diag(alpha exp(G)) K and U0 = T diag(eta) V. alpha and the write
step eta are computed in the kernels from beta, lambda and g (``gated_step_sizes``), and their gradients taken on to
beta, lambda and g there (``step_size_slopes``), as ``efla/ops/alpha.py`` does in PyTorch: neither goes to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from efla.ops.triton.decay import decay_matrix_of, remaining_sums
from efla.ops.triton.launch import launch
from efla.ops.triton.step_sizes import gated_step_sizes, step_size
from efla.ops.triton.tiles import CHUNK, C, chunk_rows, tile_offsets, token_values, v_block


@triton.jit
def _unit_lower_inverse(A, PREC: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular 64 x 64 float32 A."""
    tl.static_assert(C == 64, "the blocked inverse is written for a chunk of 4 diagonal blocks of 16 rows")
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
def gram_matrix(k_tile, PREC: tl.constexpr):
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
def chunk_t(k, beta, g, t, tok, kk, r, rmask, H, K: tl.constexpr, EFLA: tl.constexpr, GATED: tl.constexpr,
             LOAD_T: tl.constexpr, PREC: tl.constexpr):
    """Load the chunk's [64, K] key tile and beta [64] (padding rows zero) and return them (beta in float32) with
    alpha, eta (the write step; alpha itself if not GATED), lambda = ||k||^2, T (input dtype), the log decays g [64]
    and their running sums G (if GATED, else zeros; g is read once, here): T is read from t if LOAD_T (stored by the
    training forward), else inverted from A = tril(diag(alpha) K K^T (* D if GATED), -1) as T = (I + A)^-1."""
    k_tile = tl.load(k + tok * K + kk, mask=rmask[:, None], other=0.0)
    b = token_values(beta, tok, r, rmask, H)
    if LOAD_T:
        lam = _key_norms(k_tile, rmask, r, PREC)
    else:
        gram = gram_matrix(k_tile, PREC)
        lam = _diagonal(gram, r)
    if GATED:
        gv = token_values(g, tok, r, rmask, H)
        gc = tl.cumsum(gv, 0)
        alpha, eta = gated_step_sizes(b, lam, gv, EFLA)
    else:
        gv = tl.zeros([C], dtype=tl.float32)
        gc = gv
        alpha = step_size(b, lam, EFLA)
        eta = alpha
    if LOAD_T:
        Td = tl.load(t + tok * C + tile_offsets(r, H, C, r), mask=rmask[:, None], other=0.0)
    else:
        A = alpha[:, None] * gram
        if GATED:
            A = A * decay_matrix_of(gv, gc, r, PREC)
        A = tl.where(r[:, None] > r[None, :], A, 0.0)
        Td = _unit_lower_inverse(A, PREC).to(k_tile.dtype)
    return k_tile, b, alpha, eta, lam, Td, gv, gc


@triton.jit
def erase_scale(alpha, gc, GATED: tl.constexpr):
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
    sum at float32 accuracy, ``remaining_sums``) for the state passes."""
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    r, rmask, tok = chunk_rows(chunk_seq, chunk_t0, cu_seqlens, i_c, i_h, H)
    kk = tile_offsets(r, H, K, tl.arange(0, K))
    k_tile, _b, alpha, write, _lam, Td, gv, gc = chunk_t(k, beta, g, t, tok, kk, r, rmask, H, K, EFLA, GATED,
                                                          LOAD_T, PREC)
    erase = erase_scale(alpha, gc, GATED)
    if GATED:
        tl.store(sums + (tok + r * H) * 2, gc, mask=rmask)
        tl.store(sums + (tok + r * H) * 2 + 1, remaining_sums(gv, gc, g, tok, r, rmask, H, PREC), mask=rmask)
    if STORE_T:
        tl.store(t + tok * C + tile_offsets(r, H, C, r), Td, mask=rmask[:, None])
    dt = k_tile.dtype  # operand dtype of the products below: the input's (16-bit inputs run at bf16/fp16 rate)
    w_tile = tl.dot(Td, (erase[:, None] * k_tile.to(tl.float32)).to(dt), input_precision=PREC)
    tl.store(w + tok * K + kk, w_tile.to(w.dtype.element_ty), mask=rmask[:, None])
    for i_v in range(tl.cdiv(V, BV)):
        _ov, _vmask, m, vv = v_block(i_v, r, rmask, H, V, BV)
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
