"""Chunkwise forward: the state pass (sequential over chunks) and the output pass (parallel over chunks).

With W, U0 from ``_wy_fwd_kernel`` and S the state entering a chunk (derivation in ``efla/ops/chunk.py``):

    u = U0 - W S,    S' = S + K^T u,    O = scale (Q S + tril(Q K^T) u)

The state pass keeps S [K, BV] in registers for one (sequence, head, V-block), stores every chunk's entering state h
and its u, and the final state. The output pass reads them back, one program per (chunk, head, V-block).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _state_fwd_kernel(k, w, u0, h, u, h0, ht, cu_seqlens, chunk_first, H,
                      K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
                      STORE_HT: tl.constexpr, PREC: tl.constexpr):
    """One program per (sequence, head, V-block); loops over the sequence's chunks in order."""
    n, i_h, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + n)
    eos = tl.load(cu_seqlens + n + 1)
    c0 = tl.load(chunk_first + n)
    ok = tl.arange(0, K)
    ov = i_v * BV + tl.arange(0, BV)
    vmask = ov < V
    state_offs = ok[:, None] * V + ov[None, :]
    r = tl.arange(0, 64)
    kk = r[:, None] * (H * K) + ok[None, :]  # int32 tile offsets, added to scalar int64 bases
    vv = r[:, None] * (H * V) + ov[None, :]
    S = tl.zeros([K, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + (n * H + i_h) * K * V + state_offs, mask=vmask[None, :], other=0.0).to(tl.float32)
    for i in range(tl.cdiv(eos - bos, 64)):
        chunk_state = ((c0 + i).to(tl.int64) * H + i_h) * K * V  # int64 scalar bases: offsets can pass 2^31
        tl.store(h + chunk_state + state_offs, S.to(h.dtype.element_ty), mask=vmask[None, :])
        rmask = bos + i * 64 + r < eos
        tok = (bos + i * 64).to(tl.int64) * H + i_h
        m = rmask[:, None] & vmask[None, :]
        w_tile = tl.load(w + tok * K + kk, mask=rmask[:, None], other=0.0)
        k_tile = tl.load(k + tok * K + kk, mask=rmask[:, None], other=0.0)
        Sc = S.to(w_tile.dtype)
        u_tile = tl.load(u0 + tok * V + vv, mask=m, other=0.0).to(tl.float32) - tl.dot(w_tile, Sc, input_precision=PREC)
        tl.store(u + tok * V + vv, u_tile.to(u.dtype.element_ty), mask=m)
        S += tl.dot(tl.trans(k_tile), u_tile.to(k_tile.dtype), input_precision=PREC)
    if STORE_HT:
        tl.store(ht + (n * H + i_h) * K * V + state_offs, S, mask=vmask[None, :])


@triton.jit
def _out_kernel(q, k, u, h, o, chunk_seq, chunk_t0, cu_seqlens, scale, H,
                K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """One program per (chunk, head, V-block): O = scale (Q S + tril(Q K^T) u)."""
    i_c, i_h, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    n = tl.load(chunk_seq + i_c)
    t0 = tl.load(chunk_t0 + i_c).to(tl.int64)  # int64: offsets can pass 2^31
    eos = tl.load(cu_seqlens + n + 1)
    r = tl.arange(0, 64)
    rmask = t0 + r < eos
    tok = t0 * H + i_h  # scalar int64 base, small int32 tile offsets
    ok = tl.arange(0, K)
    ov = i_v * BV + tl.arange(0, BV)
    vmask = ov < V
    m = rmask[:, None] & vmask[None, :]
    kk = r[:, None] * (H * K) + ok[None, :]
    vv = r[:, None] * (H * V) + ov[None, :]
    q_tile = tl.load(q + tok * K + kk, mask=rmask[:, None], other=0.0)
    k_tile = tl.load(k + tok * K + kk, mask=rmask[:, None], other=0.0)
    S = tl.load(h + (i_c * H + i_h) * K * V + (ok[:, None] * V + ov[None, :]), mask=vmask[None, :], other=0.0)
    u_tile = tl.load(u + tok * V + vv, mask=m, other=0.0)
    qk = tl.where(r[:, None] >= r[None, :], tl.dot(q_tile, tl.trans(k_tile), input_precision=PREC), 0.0)
    out = tl.dot(q_tile, S.to(q_tile.dtype), input_precision=PREC)
    out += tl.dot(qk.to(u_tile.dtype), u_tile, input_precision=PREC)
    tl.store(o + tok * V + vv, (scale * out).to(o.dtype.element_ty), mask=m)
