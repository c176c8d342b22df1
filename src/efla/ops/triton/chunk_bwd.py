"""Chunkwise backward: the reverse state pass (sequential), then two per-chunk gradient passes (parallel).

Per chunk, with S the entering state, dS' the gradient of the leaving state and P = tril(dO u^T):

    du  = scale triu(K Q^T) dO + K dS'              dS = dS' + scale Q^T dO - W^T du
    dQ  = scale (dO S^T + P K)                       dK = scale P^T Q + u dS'^T + ...
    dW  = -du S^T,  dU0 = du,  so dX_K = T^T dW = -dX_V S^T (accumulated over V blocks, no dW tile)

Through the WY system (Y = T X with X = [diag(a) K | diag(a) V], T = L^-1, L = I + tril(diag(a) G, -1), G = K K^T):
dX = T^T dY and dL = -dX X^T T^T = -(dX_K K^T + dX_V V^T) diag(a) T^T, kept strictly lower (dX_V V^T accumulates
per V block, dX_K K^T is one product after the V loop). Then

    da_i += sum_d (dX_K k + dX_V v)_id + sum_{j<i} dL_ij G_ij,    dG = diag(a) dL,    dK += a dX_K + (dG + dG^T) K

and da goes to beta and lambda = ||k||^2 as in ``efla/ops/alpha.py`` (dK += 2 dlambda k).

Gated (GATED; forward in ``chunk_fwd.py`` and ``wy.py``; c = exp(G_C - G), E = exp(G), X = [diag(a E) K | diag(e) V],
A = tril(diag(a) (G * D), -1)): the state terms become du = scale (triu(K Q^T) * D^T) dO + diag(c) K dS',
dS = exp(G_C) dS' + scale (diag(E) Q)^T dO - W^T du, dQ = scale (diag(E) dO S^T + (P * D) K), the u dS'^T term of dK
is scaled by c, dL = -(dX_K X_K^T + dX_V X_V^T) T^T, de = rowsum(dX_V * V), and the log decay collects, per token,

    dG_t = rowsum(Q * scale E dO S^T) + rowsum(Z) - colsum(Z) - c rowsum(K * u dS'^T)        (Z = (P * D) * Q K^T)
         + a E rowsum(dX_K * K) + rowsum(Z2) - colsum(Z2)                                   (Z2 = dL * A)
    dG_C = exp(G_C) <dS', S> + sum_t c_t rowsum(K * u dS'^T)_t

and dg_j = sum_{t >= j} dG_t + dG_C (G_t sums g up to t). ``_grad_qk_kernel`` forms the first line and dG_C, the
gradient pass through the WY system adds the second, then takes da and de on to beta, lambda and (directly, per
token) g through the step sizes' derivatives (``step_sizes.step_size_slopes``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from efla.ops.triton.decay import chunk_decay, decay_matrix, decay_matrix_of, stored_decay
from efla.ops.triton.launch import launch
from efla.ops.triton.step_sizes import step_size_slopes
from efla.ops.triton.tiles import (
    C,
    chunk_rows,
    initial_state,
    load_state,
    seq_bounds,
    seq_chunk_rows,
    state_program,
    store_state,
    tile_offsets,
    token_values,
    v_block,
    v_cols,
)
from efla.ops.triton.wy import chunk_t, erase_scale, gram_matrix


@triton.jit
def _state_bwd_kernel(q, k, g, sums, w, do, du, dh, dht, dh0, cu_seqlens, chunk_first, scale, H,
                      K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                      STORE_DH0: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr):
    """One program per (sequence, head, V-block); loops over chunks last to first, storing dS' and du. Gated, it
    reads the chunk sums of the log decays the WY pass stored, and g itself only at float32 accuracy."""
    n, i_h, i_v = state_program(V, BV)
    bos, eos, c0 = seq_bounds(cu_seqlens, chunk_first, n)
    ov, vmask = v_cols(i_v, V, BV)
    r = tl.arange(0, C)
    kk = tile_offsets(r, H, K, tl.arange(0, K))
    vv = tile_offsets(r, H, V, ov)
    dS = initial_state(dht, HAS_DHT, n, i_h, H, K, V, BV, ov, vmask)
    for j in range(tl.cdiv(eos - bos, C)):
        i = tl.cdiv(eos - bos, C) - 1 - j
        store_state(dh, dS, (c0 + i).to(tl.int64), i_h, H, K, V, ov, vmask)
        rmask, tok = seq_chunk_rows(bos, eos, i, r, i_h, H)
        m = rmask[:, None] & vmask[None, :]
        q_tile = tl.load(q + tok * K + kk, mask=rmask[:, None], other=0.0)
        k_tile = tl.load(k + tok * K + kk, mask=rmask[:, None], other=0.0)
        w_tile = tl.load(w + tok * K + kk, mask=rmask[:, None], other=0.0)
        do_tile = tl.load(do + tok * V + vv, mask=m, other=0.0)
        kq = tl.where(r[:, None] <= r[None, :], tl.dot(k_tile, tl.trans(q_tile), input_precision=PREC), 0.0)
        if GATED:
            gc, to_end, g_end = stored_decay(sums, tok, r, rmask, tl.minimum(eos - bos - i * C, C), H)
            gv = gc  # at "tf32" the decay matrix reads only the running sums; at float32 accuracy g itself
            if PREC != "tf32":
                gv = token_values(g, tok, r, rmask, H)
            kq *= decay_matrix_of(gv, gc, r, PREC, TRANSPOSE=True)
        # gated, the decays scale the [64, BV] tiles rather than the [64, K] ones: diag(c) (K dS') and
        # Q^T diag(E) dO, c = exp(G_C - G), E = exp(G)
        carried = tl.dot(k_tile, dS.to(k_tile.dtype), input_precision=PREC)
        if GATED:
            carried *= tl.exp(to_end)[:, None]
        du_tile = scale * tl.dot(kq.to(do_tile.dtype), do_tile, input_precision=PREC) + carried
        tl.store(du + tok * V + vv, du_tile.to(du.dtype.element_ty), mask=m)
        if GATED:
            dS *= tl.exp(g_end)
            do_tile = (tl.exp(gc)[:, None] * do_tile.to(tl.float32)).to(w_tile.dtype)
        dS += scale * tl.dot(tl.trans(q_tile), do_tile, input_precision=PREC)
        dS -= tl.dot(tl.trans(w_tile), du_tile.to(w_tile.dtype), input_precision=PREC)
    if STORE_DH0:
        store_state(dh0, dS, n, i_h, H, K, V, ov, vmask)


@triton.jit
def _grad_qk_kernel(q, k, g, u, do, h, dh, dq, dk_part, dg_part, chunk_seq, chunk_t0, cu_seqlens, scale, H,
                    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr):
    """One program per (chunk, head): dq, and the part of dk that does not go through alpha or T; if GATED also the
    part of dg that does not go through the WY system (module docstring)."""
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    r, rmask, tok = chunk_rows(chunk_seq, chunk_t0, cu_seqlens, i_c, i_h, H)
    kk = tile_offsets(r, H, K, tl.arange(0, K))
    dq_acc = tl.zeros([C, K], dtype=tl.float32)  # dO S^T
    dk_acc = tl.zeros([C, K], dtype=tl.float32)  # u dS'^T
    P = tl.zeros([C, C], dtype=tl.float32)  # dO u^T
    PT = tl.zeros([C, C], dtype=tl.float32)  # u dO^T (gated), P^T as its own product: see decay._log_decay
    state_dot = tl.zeros([K], dtype=tl.float32)  # row sums of dS' * S (gated): <dS', S> once summed
    for i_v in range(tl.cdiv(V, BV)):
        ov, vmask, m, vv = v_block(i_v, r, rmask, H, V, BV)
        u_tile = tl.load(u + tok * V + vv, mask=m, other=0.0)
        do_tile = tl.load(do + tok * V + vv, mask=m, other=0.0)
        S = load_state(h, i_c, i_h, H, K, V, ov, vmask)
        dS = load_state(dh, i_c, i_h, H, K, V, ov, vmask)
        if GATED:
            state_dot += tl.sum(S.to(tl.float32) * dS.to(tl.float32), axis=1)
        S = S.to(do_tile.dtype)
        dS = dS.to(u_tile.dtype)
        dq_acc += tl.dot(do_tile, tl.trans(S), input_precision=PREC)
        dk_acc += tl.dot(u_tile, tl.trans(dS), input_precision=PREC)
        P += tl.dot(do_tile, tl.trans(u_tile.to(do_tile.dtype)), input_precision=PREC)
        if GATED:
            PT += tl.dot(u_tile.to(do_tile.dtype), tl.trans(do_tile), input_precision=PREC)
    P = scale * tl.where(r[:, None] >= r[None, :], P, 0.0)
    k_tile = tl.load(k + tok * K + kk, mask=rmask[:, None], other=0.0)
    if GATED:
        q_tile = tl.load(q + tok * K + kk, mask=rmask[:, None], other=0.0)
        gv, gc, to_end, g_end = chunk_decay(g, tok, r, rmask, H)
        P *= decay_matrix(gv, r, PREC)
        dq_acc *= scale * tl.exp(gc)[:, None]
        z = P * tl.dot(q_tile, tl.trans(k_tile), input_precision=PREC)
        c = tl.exp(to_end)
        to_end_part = c * tl.sum(k_tile.to(tl.float32) * dk_acc, axis=1)  # c rowsum(K * u dS'^T)
        dk_acc *= c[:, None]
        dgc = tl.sum(q_tile.to(tl.float32) * dq_acc, axis=1) + tl.sum(z, axis=1) - tl.sum(z, axis=0) - to_end_part
        dg_end = tl.exp(g_end) * tl.sum(state_dot, axis=0) + tl.sum(to_end_part, axis=0)
        tl.store(dg_part + tok + r * H, tl.cumsum(dgc, 0, reverse=True) + dg_end, mask=rmask)
    else:
        dq_acc = scale * dq_acc
    dq_acc += tl.dot(P.to(k_tile.dtype), k_tile, input_precision=PREC)
    tl.store(dq + tok * K + kk, dq_acc.to(dq.dtype.element_ty), mask=rmask[:, None])
    if not GATED:  # loaded only now: the tile is not live while dq is formed
        q_tile = tl.load(q + tok * K + kk, mask=rmask[:, None], other=0.0)
    if GATED:
        PT = scale * tl.where(r[:, None] <= r[None, :], PT, 0.0) * decay_matrix(gv, r, PREC, TRANSPOSE=True)
        dk_acc += tl.dot(PT.to(q_tile.dtype), q_tile, input_precision=PREC)
    else:
        dk_acc += tl.dot(tl.trans(P.to(q_tile.dtype)), q_tile, input_precision=PREC)
    tl.store(dk_part + tok * K + kk, dk_acc.to(dk_part.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _grad_wy_kernel(k, v, beta, g, t_in, du, h, dk_part, dg_part, dk, dv, dbeta, dg, chunk_seq, chunk_t0, cu_seqlens, H,
                    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, EFLA: tl.constexpr, GATED: tl.constexpr,
                    LOAD_T: tl.constexpr, KS_IN_LOOP: tl.constexpr, PREC: tl.constexpr):
    """One program per (chunk, head): dv, dbeta and dk = dk_part + the terms through W, U0, T and alpha; if GATED
    also dg = dg_part + the terms through the WY system and the write step eta. T comes from t_in (stored by the
    training forward) if LOAD_T, else it is recomputed. dX_K K^T is one product after the V loop, or with KS_IN_LOOP
    (float32 K = 256, whose [64, K] x [K, 64] tf32x3 product needs more shared memory than a Hopper SM has)
    -dX_V (K S)^T accumulated per V block."""
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    r, rmask, tok = chunk_rows(chunk_seq, chunk_t0, cu_seqlens, i_c, i_h, H)
    kk = tile_offsets(r, H, K, tl.arange(0, K))
    k_tile, b, alpha, write, lam, Td, gv, gc = chunk_t(k, beta, g, t_in, tok, kk, r, rmask, H, K, EFLA, GATED,
                                                        LOAD_T, PREC)
    erase = erase_scale(alpha, gc, GATED)
    da_db, da_dlam, de_db, de_dlam, de_dg = step_size_slopes(b, lam, gv, alpha, EFLA, GATED)
    Tt = tl.trans(Td)
    dt = k_tile.dtype  # operand dtype of the products (float32 accumulation): the input's
    dxk = tl.zeros([C, K], dtype=tl.float32)  # T^T dW = -T^T du S^T = -dX_V S^T
    M = tl.zeros([C, C], dtype=tl.float32)  # dX_V V^T, then + dX_K K^T after the loop (gated: dX_V X_V^T, ...)
    da = tl.zeros([C], dtype=tl.float32)
    de = tl.zeros([C], dtype=tl.float32)  # gated: the write step's gradient
    for i_v in range(tl.cdiv(V, BV)):
        ov, vmask, m, vv = v_block(i_v, r, rmask, H, V, BV)
        du_tile = tl.load(du + tok * V + vv, mask=m, other=0.0).to(dt)
        S = load_state(h, i_c, i_h, H, K, V, ov, vmask).to(dt)
        dxv = tl.dot(Tt, du_tile, input_precision=PREC)
        dxv_d = dxv.to(dt)
        dxk -= tl.dot(dxv_d, tl.trans(S), input_precision=PREC)
        v_tile = tl.load(v + tok * V + vv, mask=m, other=0.0)
        tl.store(dv + tok * V + vv, (write[:, None] * dxv).to(dv.dtype.element_ty), mask=m)
        if GATED:
            de += tl.sum(dxv * v_tile.to(tl.float32), axis=1)
        else:
            da += tl.sum(dxv * v_tile.to(tl.float32), axis=1)
        if KS_IN_LOOP:
            ks = tl.dot(k_tile, S, input_precision=PREC)
            x_v = v_tile.to(tl.float32)
            if GATED:
                x_v *= write[:, None]
                ks *= erase[:, None]
            M += tl.dot(dxv_d, tl.trans((x_v - ks).to(dt)), input_precision=PREC)
        else:  # gated, X_V = diag(eta) V: the write step scales M's columns once, after the loop
            M += tl.dot(dxv_d, tl.trans(v_tile.to(dt)), input_precision=PREC)
    kf = k_tile.to(tl.float32)
    if not KS_IN_LOOP:
        if GATED:  # dX_V X_V^T + dX_K X_K^T with X_K = diag(alpha E) K: both as column scales of 64 x 64 tiles
            M = M * write[None, :] + tl.dot(dxk.to(dt), tl.trans(k_tile), input_precision=PREC) * erase[None, :]
        else:
            M += tl.dot(dxk.to(dt), tl.trans(k_tile), input_precision=PREC)
    # dX_K's last uses, so that it dies here; dk_part is loaded only at the end: neither [64, K] float32 tile is live
    # beside the 64 x 64 products below (the kernel ran out of registers and spilled when both were)
    d_erase = tl.sum(dxk * kf, axis=1)
    dk_acc = erase[:, None] * dxk
    if GATED:
        da += d_erase * tl.exp(gc)
        dgc = d_erase * erase
        dL = -tl.dot(M.to(dt), Tt, input_precision=PREC)
    else:
        da += d_erase
        dL = -tl.dot((M * alpha[None, :]).to(dt), Tt, input_precision=PREC)
    dL = tl.where(r[:, None] > r[None, :], dL, 0.0)
    gram = gram_matrix(k_tile, PREC)  # G again: cheaper than keeping it live through the V loop
    dG = alpha[:, None] * dL
    if GATED:
        decay = decay_matrix_of(gv, gc, r, PREC)
        gram *= decay
        dG *= decay
    da += tl.sum(dL * gram, axis=1)
    if GATED:
        z = alpha[:, None] * dL * gram  # dL * A
        dgc += tl.sum(z, axis=1) - tl.sum(z, axis=0)
        dg_tile = token_values(dg_part, tok, r, rmask, H) + tl.cumsum(dgc, 0, reverse=True) + de * de_dg
        tl.store(dg + tok + r * H, dg_tile.to(dg.dtype.element_ty), mask=rmask)
    db = da * da_db + de * de_db
    dlam = da * da_dlam + de * de_dlam
    dk_acc += tl.dot((dG + tl.trans(dG)).to(dt), k_tile, input_precision=PREC)
    if EFLA:
        dk_acc += (2.0 * dlam)[:, None] * k_tile.to(tl.float32)
    dk_acc += tl.load(dk_part + tok * K + kk, mask=rmask[:, None], other=0.0).to(tl.float32)
    tl.store(dk + tok * K + kk, dk_acc.to(dk.dtype.element_ty), mask=rmask[:, None])
    tl.store(dbeta + tok + r * H, db.to(dbeta.dtype.element_ty), mask=rmask)


def state_bwd(*, q, k, w, do, dht, h, has_h0: bool, chunks, cu, scale: float, prec: str, g=None, sums=None):
    """Launch the reverse state pass: the gradient dh of every chunk's entering state (like ``h``), du of the
    state-pass input u, and the initial states' gradient [N, H, K, V] float32 if ``has_h0`` (else None). Gated when g
    ([TT, H] log decay) is given, with the WY pass's sums of it (``wy_fwd``)."""
    H, K = k.shape[1:]
    V = do.shape[-1]
    N = cu.numel() - 1
    dh = torch.empty_like(h)
    du = torch.empty_like(do)
    dh0 = k.new_empty(N, H, K, V, dtype=torch.float32) if has_h0 else None
    cfg = launch("state_bwd", K, V, q.element_size(), N * H, gated=g is not None)
    _state_bwd_kernel[(N * triton.cdiv(V, cfg.bv), H)](q, k, g, sums, w, do, du, dh, dht, dh0, cu, chunks.first,
                                                      scale, H, K=K, V=V, BV=cfg.bv, HAS_DHT=dht is not None,
                                                      STORE_DH0=has_h0, GATED=g is not None, PREC=prec,
                                                      num_warps=cfg.warps, num_stages=cfg.stages)
    return dh, du, dh0


def grad_qk(*, q, k, u, do, h, dh, chunks, cu, scale: float, prec: str, g=None):
    """Launch the per-chunk q/k gradient pass: dq, the part of dk that does not go through the WY system and, when g
    is given, the part of dg that does not ([TT, H] float32; else None)."""
    H, K = k.shape[1:]
    V = do.shape[-1]
    dq = torch.empty_like(q)
    dk_part = torch.empty_like(k)  # input dtype, as the dk it becomes part of
    dg_part = None if g is None else torch.empty_like(g, dtype=torch.float32)
    cfg = launch("grad_qk", K, V, q.element_size(), gated=g is not None)
    _grad_qk_kernel[(chunks.total, H)](q, k, g, u, do, h, dh, dq, dk_part, dg_part, chunks.seq, chunks.t0, cu, scale,
                                       H, K=K, V=V, BV=cfg.bv, GATED=g is not None, PREC=prec, num_warps=cfg.warps,
                                       num_stages=cfg.stages)
    return dq, dk_part, dg_part


def grad_wy(*, k, v, beta, t, du, h, dk_part, chunks, cu, efla: bool, prec: str, g=None, dg_part=None):
    """Launch the gradient pass through the WY system: dk (adding dk_part), dv and dbeta; when g is given (with
    grad_qk's dg_part) also dg (else None)."""
    H, K = k.shape[1:]
    V = v.shape[-1]
    dk, dv, dbeta = torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)
    dg = None if g is None else torch.empty_like(g)
    cfg = launch("grad_wy", K, V, k.element_size(), gated=g is not None)
    _grad_wy_kernel[(chunks.total, H)](k, v, beta, g, t, du, h, dk_part, dg_part, dk, dv, dbeta, dg,
                                       chunks.seq, chunks.t0, cu, H, K=K, V=V, BV=cfg.bv, EFLA=efla,
                                       GATED=g is not None, LOAD_T=t is not None,
                                       KS_IN_LOOP=k.dtype == torch.float32 and K > 128, PREC=prec,
                                       num_warps=cfg.warps, num_stages=cfg.stages)
    return dk, dv, dbeta, dg
