"""Chunkwise forward: the state pass (sequential over chunks) and the output pass (parallel over chunks).

With W, U0 from ``_wy_fwd_kernel`` and S the state entering a chunk (derivation in ``efla/ops/chunk.py``):

    u = U0 - W S,    S' = S + K^T u,    O = scale (Q S + tril(Q K^T) u)

The state pass keeps S [K, BV] in registers for one (sequence, head, V-block), stores every chunk's entering state h
and its u, and the final state. The output pass reads them back, one program per (chunk, head, V-block). At K <= 64
on a full GPU (``launch.output_in_state_pass``) the state pass forms O itself from the S and u at hand and stores
neither: there the output pass cost as much as the state pass, and the state pass's extra products are cheap.

Gated (GATED, G the chunk's cumulative log decay, D[t, i] = exp(G_t - G_i) for t >= i, G_C its value at the end;
the state pass reads G_C - G and G_C as the WY pass stored them):

    S' = exp(G_C) S + K^T diag(exp(G_C - G)) u,    O = scale (diag(exp(G)) Q S + (tril(Q K^T) * D) u)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from efla.ops.triton.decay import chunk_decay, decay_matrix, decay_matrix_of, stored_decay
from efla.ops.triton.launch import launch
from efla.ops.triton.tiles import (
    C,
    chunk_rows,
    initial_state,
    load_state_rows,
    seq_bounds,
    seq_chunk_rows,
    state_program,
    store_state,
    tile_offsets,
    token_values,
    v_block,
    v_cols,
)


@triton.jit
def _state_fwd_kernel(k, sums, w, u0, h, u, h0, ht, q, g, o, cu_seqlens, chunk_first, scale, H,
                      K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
                      STORE_HT: tl.constexpr, GATED: tl.constexpr, OUT: tl.constexpr, PREC: tl.constexpr):
    """One program per (sequence, head, V-block); loops over the sequence's chunks in order. With OUT it also forms
    each chunk's output O = scale (Q S + tril(Q K^T) u) (decayed if GATED) from the S and u at hand, and stores
    neither h nor u (the forward's only readers of them were the output pass)."""
    n, i_h, i_v = state_program(V, BV)
    bos, eos, c0 = seq_bounds(cu_seqlens, chunk_first, n)
    ov, vmask = v_cols(i_v, V, BV)
    r = tl.arange(0, C)
    kk = tile_offsets(r, H, K, tl.arange(0, K))
    vv = tile_offsets(r, H, V, ov)
    S = initial_state(h0, HAS_H0, n, i_h, H, K, V, BV, ov, vmask)
    for i in range(tl.cdiv(eos - bos, C)):
        if not OUT:
            store_state(h, S, (c0 + i).to(tl.int64), i_h, H, K, V, ov, vmask)
        rmask, tok = seq_chunk_rows(bos, eos, i, r, i_h, H)
        m = rmask[:, None] & vmask[None, :]
        w_tile = tl.load(w + tok * K + kk, mask=rmask[:, None], other=0.0)
        k_tile = tl.load(k + tok * K + kk, mask=rmask[:, None], other=0.0)
        Sc = S.to(w_tile.dtype)
        u_tile = tl.load(u0 + tok * V + vv, mask=m, other=0.0).to(tl.float32) - tl.dot(w_tile, Sc, input_precision=PREC)
        if GATED:  # read once per chunk, for the output (with OUT) and the state's update
            gc, to_end, g_end = stored_decay(sums, tok, r, rmask, tl.minimum(eos - bos - i * C, C), H)
        if OUT:
            q_tile = tl.load(q + tok * K + kk, mask=rmask[:, None], other=0.0)
            qk = tl.where(r[:, None] >= r[None, :], tl.dot(q_tile, tl.trans(k_tile), input_precision=PREC), 0.0)
            out = tl.dot(q_tile, Sc.to(q_tile.dtype), input_precision=PREC)
            if GATED:
                qk *= decay_matrix_of(token_values(g, tok, r, rmask, H), gc, r, PREC)
                out *= tl.exp(gc)[:, None]
            out += tl.dot(qk.to(w_tile.dtype), u_tile.to(w_tile.dtype), input_precision=PREC)
            tl.store(o + tok * V + vv, (scale * out).to(o.dtype.element_ty), mask=m)
        else:
            tl.store(u + tok * V + vv, u_tile.to(u.dtype.element_ty), mask=m)
        if GATED:  # K^T diag(exp(G_C - G)) u with the decay on u's [64, BV] rows, not on the [64, K] key tile
            u_tile *= tl.exp(to_end)[:, None]
            S *= tl.exp(g_end)
        S += tl.dot(tl.trans(k_tile), u_tile.to(k_tile.dtype), input_precision=PREC)
    if STORE_HT:
        store_state(ht, S, n, i_h, H, K, V, ov, vmask)


@triton.jit
def _out_kernel(q, k, g, u, h, o, chunk_seq, chunk_t0, cu_seqlens, scale, H,
                K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr):
    """One program per (chunk, head, V-block): O = scale (Q S + tril(Q K^T) u), decayed if GATED."""
    i_c, i_h, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    r, rmask, tok = chunk_rows(chunk_seq, chunk_t0, cu_seqlens, i_c, i_h, H)
    ov, vmask, m, vv = v_block(i_v, r, rmask, H, V, BV)
    BK: tl.constexpr = 64 if K > 64 else K  # a block of K columns, not of tokens
    qk = tl.zeros([C, C], dtype=tl.float32)
    out = tl.zeros([C, BV], dtype=tl.float32)
    for i_k in range(K // BK):  # K in blocks: the next block's loads overlap this block's products
        cols = i_k * BK + tl.arange(0, BK)
        kk = tile_offsets(r, H, K, cols)
        q_tile = tl.load(q + tok * K + kk, mask=rmask[:, None], other=0.0)
        k_tile = tl.load(k + tok * K + kk, mask=rmask[:, None], other=0.0)
        S = load_state_rows(h, i_c, i_h, H, K, V, cols, ov, vmask)
        qk += tl.dot(q_tile, tl.trans(k_tile), input_precision=PREC)
        out += tl.dot(q_tile, S.to(q_tile.dtype), input_precision=PREC)
    qk = tl.where(r[:, None] >= r[None, :], qk, 0.0)
    u_tile = tl.load(u + tok * V + vv, mask=m, other=0.0)
    if GATED:
        gv, gc, _to_end, _g_end = chunk_decay(g, tok, r, rmask, H)
        qk *= decay_matrix(gv, r, PREC)
        out *= tl.exp(gc)[:, None]
    out += tl.dot(qk.to(u_tile.dtype), u_tile, input_precision=PREC)
    tl.store(o + tok * V + vv, (scale * out).to(o.dtype.element_ty), mask=m)


def state_fwd(*, k, w, u0, h0, chunks, cu, store_ht: bool, prec: str, sums=None):
    """Launch the state pass: (h, u, ht), every chunk's entering state h ([chunks, H, K, V]; float32 for float32
    inputs, else the input dtype), u = U0 - W S, and the final states [N, H, K, V] float32 if ``store_ht`` (else
    None). Gated when the WY pass's sums of the log decays ([TT, H, 2] float32) are given."""
    H, K = k.shape[1:]
    h = k.new_empty(chunks.total, H, K, u0.shape[-1], dtype=torch.float32 if k.dtype == torch.float32 else k.dtype)
    u = torch.empty_like(u0)
    ht = _launch_state_fwd(k, w, u0, h0, chunks, cu, store_ht, prec, sums, h=h, u=u)
    return h, u, ht


def state_fwd_with_output(*, q, k, w, u0, h0, chunks, cu, store_ht: bool, prec: str, scale: float, sums=None,
                          g=None):
    """Launch the state pass that forms the output as it goes (``launch.output_in_state_pass``): (o, ht), o [TT, H, V]
    in the input dtype, with neither h nor u stored. Gated when sums and g ([TT, H] float32) are given."""
    o = torch.empty_like(u0)
    ht = _launch_state_fwd(k, w, u0, h0, chunks, cu, store_ht, prec, sums, q=q, g=g, o=o, scale=scale)
    return o, ht


def _launch_state_fwd(k, w, u0, h0, chunks, cu, store_ht, prec, sums, h=None, u=None, q=None, g=None, o=None,
                      scale=1.0):
    """One launch of ``_state_fwd_kernel`` writing h and u, or (given q) o; returns the final states or None."""
    H, K = k.shape[1:]
    V = u0.shape[-1]
    N = cu.numel() - 1
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if store_ht else None
    cfg = launch("state_fwd", K, V, k.element_size(), N * H)
    _state_fwd_kernel[(N * triton.cdiv(V, cfg.bv), H)](k, sums, w, u0, h, u, h0, ht, q, g, o, cu, chunks.first, scale,
                                                      H, K=K, V=V, BV=cfg.bv, HAS_H0=h0 is not None,
                                                      STORE_HT=store_ht, GATED=sums is not None,
                                                      OUT=q is not None, PREC=prec,
                                                      num_warps=cfg.warps, num_stages=cfg.stages)
    return ht


def output(*, q, k, u, h, chunks, cu, scale: float, prec: str, g=None):
    """Launch the output pass: O = scale (Q S + tril(Q K^T) u) per chunk (decayed when g is given), [TT, H, V] in
    the input dtype."""
    H, K = k.shape[1:]
    V = u.shape[-1]
    o = torch.empty_like(u)
    cfg = launch("out", K, V, q.element_size())
    _out_kernel[(chunks.total, H, triton.cdiv(V, cfg.bv))](q, k, g, u, h, o, chunks.seq, chunks.t0, cu, scale,
                                                           H, K=K, V=V, BV=cfg.bv, GATED=g is not None, PREC=prec,
                                                           num_warps=cfg.warps, num_stages=cfg.stages)
    return o
