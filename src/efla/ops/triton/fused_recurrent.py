"""Fused recurrent forward for decoding and short sequences: one token at a time, the state kept in registers.

Exactly the definition (``efla/ops/recurrent.py``): per token, lambda = ||k||^2, alpha, then
S <- S + k (alpha (v - S^T k))^T and o = scale S^T q. No chunk padding and no WY system, so it wins over the chunk
kernels when T is short (decode steps, prompts of a few dozen tokens). Forward only: the dispatch sends anything that
needs gradients to the chunk kernels. Gated (GATED): S <- exp(g) S first, then S <- S + k (eta v - alpha S^T k)^T
with the step sizes of ``step_sizes.gated_step_sizes`` (for EFLA, or beta itself for Gated DeltaNet).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from efla.ops.triton.step_sizes import gated_step_sizes, step_size
from efla.ops.triton.tiles import initial_state, store_state, v_cols


@triton.jit
def _fused_recurrent_kernel(q, k, v, beta, g, o, h0, ht, cu_seqlens, scale, H,
                            K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, EFLA: tl.constexpr,
                            GATED: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr):
    """One program per (sequence, head, V-block); loops over the sequence's tokens."""
    n, i_h, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + n).to(tl.int64)  # int64: offsets can pass 2^31
    eos = tl.load(cu_seqlens + n + 1)
    ok = tl.arange(0, K)
    ov, vmask = v_cols(i_v, V, BV)
    S = initial_state(h0, HAS_H0, n, i_h, H, K, V, BV, ov, vmask)
    for t in range(bos, eos):
        k_t = tl.load(k + (t * H + i_h) * K + ok).to(tl.float32)
        q_t = tl.load(q + (t * H + i_h) * K + ok).to(tl.float32)
        v_t = tl.load(v + (t * H + i_h) * V + ov, mask=vmask, other=0.0).to(tl.float32)
        b_t = tl.load(beta + t * H + i_h).to(tl.float32)
        lam = tl.sum(k_t * k_t, axis=0)
        if GATED:
            g_t = tl.load(g + t * H + i_h).to(tl.float32)
            a_t, e_t = gated_step_sizes(b_t, lam, g_t, EFLA)
            S *= tl.exp(g_t)
            S += k_t[:, None] * (e_t * v_t - a_t * tl.sum(S * k_t[:, None], axis=0))[None, :]
        else:
            a_t = step_size(b_t, lam, EFLA)
            error = v_t - tl.sum(S * k_t[:, None], axis=0)  # v_t - S^T k_t
            S += k_t[:, None] * (a_t * error)[None, :]
        o_t = scale * tl.sum(S * q_t[:, None], axis=0)
        tl.store(o + (t * H + i_h) * V + ov, o_t.to(o.dtype.element_ty), mask=vmask)
    if STORE_HT:
        tl.debug_barrier()  # every thread has read h0 before any writes ht: the two may be one buffer (decode steps)
        store_state(ht, S, n, i_h, H, K, V, ov, vmask)


def fused_recurrent(*, q, k, v, beta, h0, cu, scale: float, efla: bool, output_final_state: bool, g=None,
                    final_state=None):
    """Launch the fused recurrent kernel on packed [TT, H, D] tensors: o (input dtype) and, if
    ``output_final_state``, the final states [N, H, K, V] float32 (else None), written into ``final_state`` when
    given (which may be h0 itself: an in-place step). Gated when g ([TT, H] log decay) is given."""
    H, K = k.shape[1:]
    V = v.shape[-1]
    N = cu.numel() - 1
    o = torch.empty_like(v)
    ht = None
    if output_final_state:
        ht = final_state if final_state is not None else k.new_empty(N, H, K, V, dtype=torch.float32)
    bv = min(V, 32 if K <= 128 else 16)
    _fused_recurrent_kernel[(N, H, triton.cdiv(V, bv))](q, k, v, beta, g, o, h0, ht, cu, scale, H, K=K, V=V,
                                                        BV=bv, EFLA=efla, GATED=g is not None, HAS_H0=h0 is not None,
                                                        STORE_HT=output_final_state, num_warps=4)
    return o, ht
