"""Where a program's tiles live in the packed tensors: token rows of a chunk, V-blocks, per-chunk states.

Tokens are packed along T, so q, k, w are [TT, H, K] and v, u, o are [TT, H, V]: row r of a chunk whose first token
has (token, head) index tok sits at (tok + r * H) * D. Offsets are split into a scalar int64 base (tok * D, which can
pass 2^31) and small int32 tile offsets. States h, dh, h0, ht are [rows, H, K, V] in float32 or the input dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

CHUNK = 64
"""Tokens per chunk in every chunk kernel: the rows of a program's tiles, the width of T, the chunk maps' stride."""
C = tl.constexpr(CHUNK)  # CHUNK as the kernels read it (Triton kernels read only constexpr globals)


@triton.jit
def chunk_rows(chunk_seq, chunk_t0, cu_seqlens, i_c, i_h, H):
    """Rows of chunk i_c (int64) for head i_h: r = 0..63, rmask (rows inside the sequence) and tok (int64)."""
    n = tl.load(chunk_seq + i_c)
    t0 = tl.load(chunk_t0 + i_c).to(tl.int64)
    eos = tl.load(cu_seqlens + n + 1)
    r = tl.arange(0, C)
    return r, t0 + r < eos, t0 * H + i_h


@triton.jit
def seq_bounds(cu_seqlens, chunk_first, n):
    """Sequence n's tokens [bos, eos) and the global index c0 of its first chunk (its row in per-chunk states)."""
    return tl.load(cu_seqlens + n), tl.load(cu_seqlens + n + 1), tl.load(chunk_first + n)


@triton.jit
def seq_chunk_rows(bos, eos, i, r, i_h, H):
    """Rows of chunk i of the sequence [bos, eos) for head i_h: rmask and tok (int64), as ``chunk_rows``."""
    return bos + i * C + r < eos, (bos + i * C).to(tl.int64) * H + i_h


@triton.jit
def token_values(ptr, tok, r, rmask, H):
    """A per-token [TT, H] tensor's values for the chunk's rows (0 on padding rows), in float32."""
    return tl.load(ptr + tok + r * H, mask=rmask, other=0.0).to(tl.float32)


@triton.jit
def tile_offsets(r, H, D: tl.constexpr, cols):
    """int32 offsets of the [64, len(cols)] tile of rows r, columns cols of a [TT, H, D] tensor, from tok * D."""
    return r[:, None] * (H * D) + cols[None, :]


@triton.jit
def state_program(V: tl.constexpr, BV: tl.constexpr):
    """(sequence n as int64, head, V-block) of a state-pass program on the grid (sequences x V-blocks, heads). The
    V-block varies fastest, so the programs that read one sequence's and head's tiles (keys, W, q, dO: the same for
    every V-block) are launched side by side and find them in L2; with the sequence fastest they were launched
    sequences x heads programs apart, in different waves once the programs outnumber the GPU's slots."""
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    return (pid // NV).to(tl.int64), tl.program_id(1), pid % NV


@triton.jit
def v_cols(i_v, V: tl.constexpr, BV: tl.constexpr):
    """Columns ov of V-block i_v and which of them exist (vmask)."""
    ov = i_v * BV + tl.arange(0, BV)
    return ov, ov < V


@triton.jit
def v_block(i_v, r, rmask, H, V: tl.constexpr, BV: tl.constexpr):
    """V-block i_v of a chunk: columns ov, vmask, the [64, BV] tile mask and the tile offsets from tok * V."""
    ov, vmask = v_cols(i_v, V, BV)
    return ov, vmask, rmask[:, None] & vmask[None, :], tile_offsets(r, H, V, ov)


@triton.jit
def _state_ptrs(ptr, idx, i_h, H, K: tl.constexpr, V: tl.constexpr, ov, rows=None):
    """Pointers to the [K, BV] block (columns ov) of state (idx, i_h), or to its rows ``rows`` (a block of K) if
    given; idx is int64."""
    if rows is None:
        rows = tl.arange(0, K)
    return ptr + (idx * H + i_h) * K * V + (rows[:, None] * V + ov[None, :])


@triton.jit
def load_state(ptr, idx, i_h, H, K: tl.constexpr, V: tl.constexpr, ov, vmask):
    """The [K, BV] block (columns ov) of state (idx, i_h), in the state's dtype."""
    return tl.load(_state_ptrs(ptr, idx, i_h, H, K, V, ov), mask=vmask[None, :], other=0.0)


@triton.jit
def load_state_rows(ptr, idx, i_h, H, K: tl.constexpr, V: tl.constexpr, rows, ov, vmask):
    """Rows ``rows`` (a block of K) and columns ov of state (idx, i_h), in the state's dtype."""
    return tl.load(_state_ptrs(ptr, idx, i_h, H, K, V, ov, rows), mask=vmask[None, :], other=0.0)


@triton.jit
def initial_state(ptr, PRESENT: tl.constexpr, idx, i_h, H, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, ov,
                   vmask):
    """The float32 [K, BV] state a sequential pass starts from: state (idx, i_h) of ptr if PRESENT, else zeros."""
    S = tl.zeros([K, BV], dtype=tl.float32)
    if PRESENT:
        S += load_state(ptr, idx, i_h, H, K, V, ov, vmask).to(tl.float32)
    return S


@triton.jit
def store_state(ptr, S, idx, i_h, H, K: tl.constexpr, V: tl.constexpr, ov, vmask):
    """Store S as the [K, BV] block (columns ov) of state (idx, i_h), cast to the state's dtype."""
    tl.store(_state_ptrs(ptr, idx, i_h, H, K, V, ov), S.to(ptr.dtype.element_ty), mask=vmask[None, :])
