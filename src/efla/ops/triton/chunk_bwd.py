"""Chunkwise backward: the reverse state pass (sequential) and the per-chunk gradient pass (parallel).

Per chunk, with S the entering state, dS' the gradient of the leaving state and P = tril(dO u^T):

    du  = scale triu(K Q^T) dO + K dS'              dS = dS' + scale Q^T dO - W^T du
    dQ  = scale (dO S^T + P K)                       dK = scale P^T Q + u dS'^T + ...
    dW  = -du S^T,  dU0 = du

Through the WY system (Y = T X with X = [diag(a) K | diag(a) V], T = L^-1, L = I + tril(diag(a) G, -1), G = K K^T):
dX = T^T dY and dL = -dX X^T T^T = -(dX_K K^T + dX_V V^T) diag(a) T^T, kept strictly lower. Then

    da_i += sum_d (dX_K k + dX_V v)_id + sum_{j<i} dL_ij G_ij,    dG = diag(a) dL,    dK += a dX_K + (dG + dG^T) K

and da goes to beta and lambda = ||k||^2 as in ``efla/ops/alpha.py`` (dK += 2 dlambda k).
"""

from __future__ import annotations

import triton
import triton.language as tl

from efla.ops.triton.wy import _chunk_system, _phi_prime


@triton.jit
def _state_bwd_kernel(q, k, w, do, du, dh, dht, dh0, cu_seqlens, chunk_first, scale, H,
                      K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                      STORE_DH0: tl.constexpr, PREC: tl.constexpr):
    """One program per (sequence, head, V-block); loops over chunks last to first, storing dS' and du."""
    n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + n)
    eos = tl.load(cu_seqlens + n + 1)
    c0 = tl.load(chunk_first + n)
    ok = tl.arange(0, K)
    ov = i_v * BV + tl.arange(0, BV)
    vmask = ov < V
    state_offs = ok[:, None] * V + ov[None, :]
    r = tl.arange(0, 64)
    dS = tl.zeros([K, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + (n * H + i_h) * K * V + state_offs, mask=vmask[None, :], other=0.0).to(tl.float32)
    for j in range(tl.cdiv(eos - bos, 64)):
        i = tl.cdiv(eos - bos, 64) - 1 - j
        tl.store(dh + ((c0 + i) * H + i_h) * K * V + state_offs, dS.to(dh.dtype.element_ty), mask=vmask[None, :])
        rows = bos + i * 64 + r
        rmask = rows < eos
        kw_offs = (rows[:, None] * H + i_h) * K + ok[None, :]
        uv_offs = (rows[:, None] * H + i_h) * V + ov[None, :]
        m = rmask[:, None] & vmask[None, :]
        q_tile = tl.load(q + kw_offs, mask=rmask[:, None], other=0.0)
        k_tile = tl.load(k + kw_offs, mask=rmask[:, None], other=0.0)
        w_tile = tl.load(w + kw_offs, mask=rmask[:, None], other=0.0)
        do_tile = tl.load(do + uv_offs, mask=m, other=0.0)
        kq = tl.where(r[:, None] <= r[None, :], tl.dot(k_tile, tl.trans(q_tile), input_precision=PREC), 0.0)
        du_tile = scale * tl.dot(kq.to(do_tile.dtype), do_tile, input_precision=PREC)
        du_tile += tl.dot(k_tile, dS.to(k_tile.dtype), input_precision=PREC)
        tl.store(du + uv_offs, du_tile.to(du.dtype.element_ty), mask=m)
        dS += scale * tl.dot(tl.trans(q_tile), do_tile, input_precision=PREC)
        dS -= tl.dot(tl.trans(w_tile), du_tile.to(w_tile.dtype), input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + (n * H + i_h) * K * V + state_offs, dS, mask=vmask[None, :])


@triton.jit
def _grad_kernel(q, k, v, beta, u, du, do, h, dh, dq, dk, dv, dbeta, chunk_seq, chunk_t0, cu_seqlens, scale, H,
                 K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, EFLA: tl.constexpr, PREC: tl.constexpr):
    """One program per (chunk, head): dq, dk, dv, dbeta of the chunk (T recomputed from k and beta)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    n = tl.load(chunk_seq + i_c)
    t0 = tl.load(chunk_t0 + i_c)
    eos = tl.load(cu_seqlens + n + 1)
    r = tl.arange(0, 64)
    rows = t0 + r
    rmask = rows < eos
    ok = tl.arange(0, K)
    kq_offs = (rows[:, None] * H + i_h) * K + ok[None, :]
    q_tile = tl.load(q + kq_offs, mask=rmask[:, None], other=0.0)
    k_tile = tl.load(k + kq_offs, mask=rmask[:, None], other=0.0)
    b = tl.load(beta + rows * H + i_h, mask=rmask, other=0.0).to(tl.float32)
    alpha, lam, G, T = _chunk_system(k_tile, b, EFLA, PREC)
    Tt = tl.trans(T)
    kf = k_tile.to(tl.float32)

    dq_acc = tl.zeros([64, K], dtype=tl.float32)  # dO S^T
    dk_acc = tl.zeros([64, K], dtype=tl.float32)  # u dS'^T
    dw = tl.zeros([64, K], dtype=tl.float32)  # -du S^T
    P = tl.zeros([64, 64], dtype=tl.float32)  # dO u^T
    M = tl.zeros([64, 64], dtype=tl.float32)  # dX_K K^T + dX_V V^T
    da = tl.zeros([64], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        ov = i_v * BV + tl.arange(0, BV)
        vmask = ov < V
        m = rmask[:, None] & vmask[None, :]
        uv_offs = (rows[:, None] * H + i_h) * V + ov[None, :]
        state_offs = (i_c * H + i_h) * K * V + ok[:, None] * V + ov[None, :]
        v_tile = tl.load(v + uv_offs, mask=m, other=0.0)
        u_tile = tl.load(u + uv_offs, mask=m, other=0.0)
        du_tile = tl.load(du + uv_offs, mask=m, other=0.0)
        do_tile = tl.load(do + uv_offs, mask=m, other=0.0)
        S = tl.load(h + state_offs, mask=vmask[None, :], other=0.0).to(do_tile.dtype)
        dS = tl.load(dh + state_offs, mask=vmask[None, :], other=0.0).to(u_tile.dtype)
        dq_acc += tl.dot(do_tile, tl.trans(S), input_precision=PREC)
        dk_acc += tl.dot(u_tile, tl.trans(dS), input_precision=PREC)
        dw -= tl.dot(du_tile, tl.trans(S.to(du_tile.dtype)), input_precision=PREC)
        P += tl.dot(do_tile, tl.trans(u_tile.to(do_tile.dtype)), input_precision=PREC)
        dxv = tl.dot(Tt, du_tile.to(tl.float32), input_precision=PREC)
        vf = v_tile.to(tl.float32)
        tl.store(dv + uv_offs, (alpha[:, None] * dxv).to(dv.dtype.element_ty), mask=m)
        da += tl.sum(dxv * vf, axis=1)
        M += tl.dot(dxv, tl.trans(vf), input_precision=PREC)

    P = scale * tl.where(r[:, None] >= r[None, :], P, 0.0)
    dq_acc = scale * dq_acc + tl.dot(P.to(k_tile.dtype), k_tile, input_precision=PREC)
    tl.store(dq + kq_offs, dq_acc.to(dq.dtype.element_ty), mask=rmask[:, None])
    dk_acc += tl.dot(tl.trans(P.to(q_tile.dtype)), q_tile, input_precision=PREC)
    dxk = tl.dot(Tt, dw, input_precision=PREC)
    dk_acc += alpha[:, None] * dxk
    da += tl.sum(dxk * kf, axis=1)
    M += tl.dot(dxk, tl.trans(kf), input_precision=PREC)
    dL = -tl.dot(M * alpha[None, :], Tt, input_precision=PREC)
    dL = tl.where(r[:, None] > r[None, :], dL, 0.0)
    da += tl.sum(dL * G, axis=1)
    dG = alpha[:, None] * dL
    dk_acc += tl.dot(dG + tl.trans(dG), kf, input_precision=PREC)
    if EFLA:
        x = b * lam
        dk_acc += (2.0 * da * b * b * _phi_prime(x))[:, None] * kf
        db = da * tl.exp(-x)
    else:
        db = da
    tl.store(dk + kq_offs, dk_acc.to(dk.dtype.element_ty), mask=rmask[:, None])
    tl.store(dbeta + rows * H + i_h, db.to(dbeta.dtype.element_ty), mask=rmask)
