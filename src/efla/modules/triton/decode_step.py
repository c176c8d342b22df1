"""One decode step of an EFLA layer over its in-place state, in two kernels (``EFLAttention.step`` holds the
PyTorch reference and the dispatch):

    conv_step       for each of q, k, v (one program per row and head): the short convolution's new output
                    silu(sum_j w_j x_{t-j}) from the cached window and the new input, the window shifted in place,
                    q (and k in mode "delta") L2-normalised; and beta = sigmoid(b logits) in float32
    recurrent_step  the fused recurrent kernel on one token per row, reading and writing the recurrent state in place

A decode step of a 340M model otherwise runs about forty small kernels per layer (concatenations, the convolution,
SiLU, norms, copies of the new states into the cache); a CUDA graph replays them without launch overhead, but their
own time still added up to more than the weights' read.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from efla.ops.triton.fused_recurrent import fused_recurrent


@triton.jit
def _conv_step_kernel(proj, weight, window, act, beta, C, H, eps, D: tl.constexpr, W: tl.constexpr,
                      WP: tl.constexpr, L2_K: tl.constexpr):
    """Program (row b, segment s): channels s * D ... of the row's q | k | v (segment s // H: 0 q, 1 k, 2 v).

    proj [B, 3 C + H] holds the projections of q, k, v and beta's logits; weight [3 C, W]; window [B, 3 C, W - 1]
    the last W - 1 inputs of every channel (oldest first), shifted in place; act [B, 3 C] the activations."""
    b, s = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = s * D + tl.arange(0, D)
    cols = tl.arange(0, WP)
    past_mask = cols < W - 1
    row = proj + b * (3 * C + H)
    x = tl.load(row + c).to(tl.float32)
    cells = window + (b * 3 * C + c)[:, None] * (W - 1) + cols[None, :]
    past = tl.load(cells, mask=past_mask[None, :], other=0.0).to(tl.float32)  # [D, WP]
    taps = tl.load(weight + c[:, None] * W + cols[None, :], mask=past_mask[None, :], other=0.0).to(tl.float32)
    pre = tl.sum(past * taps, axis=1) + tl.load(weight + c * W + (W - 1)).to(tl.float32) * x
    # the window moves one to the left: column j takes column j + 1 (a [WP, WP] shift, in registers), the last x
    shift = tl.where(cols[:, None] == cols[None, :] + 1, 1.0, 0.0)
    moved = tl.sum(past[:, :, None] * shift[None, :, :], axis=1)
    moved = tl.where(cols[None, :] == W - 2, x[:, None], moved)
    tl.debug_barrier()  # every thread has read the window before any thread writes it
    tl.store(cells, moved.to(window.dtype.element_ty), mask=past_mask[None, :])
    y = pre * tl.sigmoid(pre)
    if (s < H) | (L2_K & (s < 2 * H)):
        y = y * tl.rsqrt(tl.sum(y * y, axis=0) + eps)
    tl.store(act + b * 3 * C + c, y.to(act.dtype.element_ty))
    if s < H:
        logit = tl.load(row + 3 * C + s).to(tl.float32)
        tl.store(beta + b * H + s, tl.sigmoid(logit))


def conv_step(proj: torch.Tensor, weight: torch.Tensor, window: torch.Tensor, num_heads: int, l2_k: bool,
              eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(act [B, 3 C] in proj's dtype, beta [B, H] float32) from proj [B, 3 C + H] and the weight [3 C, W]; the
    window [B, 3 C, W - 1] (W >= 2) advances in place."""
    B = proj.shape[0]
    C3, W = weight.shape
    C, H = C3 // 3, num_heads
    act = proj.new_empty(B, C3)
    beta = proj.new_empty(B, H, dtype=torch.float32)
    _conv_step_kernel[(B, 3 * H)](proj, weight, window, act, beta, C, H, eps, D=C // H, W=W,
                                  WP=triton.next_power_of_2(W - 1), L2_K=l2_k, num_warps=1 if C // H <= 64 else 2)
    return act, beta


def _conv_step_in_place(proj: torch.Tensor, weight: torch.Tensor, window: torch.Tensor, num_heads: int,
                        l2_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.cuda.device_of(proj):
        return conv_step(proj.contiguous(), weight.contiguous(), window, num_heads, l2_k)


conv_step_op = torch.library.custom_op("efla::conv_step_", _conv_step_in_place, mutates_args=("window",))


def conv_step_in_place(proj: torch.Tensor, weight: torch.Tensor, window: torch.Tensor, num_heads: int,
                       l2_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv_step`` (the window advanced in place): through the custom op under torch.compile, else called directly
    (the op's dispatch costs host time in every eager decode step)."""
    step = conv_step_op if torch.compiler.is_compiling() else _conv_step_in_place
    return step(proj, weight, window, num_heads, l2_k)


@conv_step_op.register_fake
def _conv_step_fake(proj, weight, window, num_heads, l2_k):
    return proj.new_empty(proj.shape[0], weight.shape[0]), proj.new_empty(proj.shape[0], num_heads,
                                                                          dtype=torch.float32)


@functools.lru_cache(maxsize=32)
def _one_token_rows(batch: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of ``batch`` sequences of one token, made once (not a kernel in every decode step)."""
    return torch.arange(batch + 1, device=device, dtype=torch.int32)


def _recurrent_step_in_place(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                             state: torch.Tensor, scale: float, efla: bool, g: torch.Tensor | None = None
                             ) -> torch.Tensor:
    with torch.cuda.device_of(q):
        o, _ = fused_recurrent(q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), beta=beta.contiguous(), h0=state,
                               cu=_one_token_rows(q.shape[0], q.device), scale=scale, efla=efla,
                               output_final_state=True, g=g, final_state=state)
    return o


recurrent_step_op = torch.library.custom_op("efla::recurrent_step_", _recurrent_step_in_place, mutates_args=("state",))


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
                   scale: float, efla: bool, g: torch.Tensor | None = None) -> torch.Tensor:
    """o [B, H, V] of one token per row (q, k [B, H, K], v [B, H, V], beta [B, H]; gated with the log decay g
    [B, H]), the state [B, H, K, V] float32 advanced in place: through the custom op under torch.compile, else
    called directly."""
    step = recurrent_step_op if torch.compiler.is_compiling() else _recurrent_step_in_place
    return step(q, k, v, beta, state, scale, efla, g)


@recurrent_step_op.register_fake
def _recurrent_step_fake(q, k, v, beta, state, scale, efla, g=None):
    return torch.empty_like(v)
