"""Cross-entropy over rows of logits in one kernel: each row's loss, and the logits overwritten by their gradient.

For logits x [rows, V] (float32 or 16-bit, read in float32) and targets y [rows] (ignore_index: ignored), per row

    lse = log sum_j exp(x_j),    loss = lse - x_y,    d loss / d x_j = exp(x_j - lse) - [j == y]

(loss and gradient 0 on ignored rows). Two passes over the row: a running max and sum of exponentials per lane, then
the gradient, written over the logits in their own dtype. The PyTorch version of one chunk of the language-modelling
loss (``efla/models/loss.py``) casts the logits to float32, takes logsumexp, subtracts, exponentiates, masks and casts
back, a dozen passes over float32 copies; this reads the 16-bit logits twice and writes them once. A target outside
[0, V) that is not ignored gives a NaN loss rather than reading past the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096  # logits per lane block: 16 per thread at 8 warps


@triton.jit
def _cross_entropy_rows_kernel(x, y, loss, V, IGNORE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                               BLOCK: tl.constexpr):
    """One program per row: loss[row] and, if WRITE_GRAD, the row's gradient in place of its logits."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x + row * V
    cols = tl.arange(0, BLOCK)
    target = tl.load(y + row).to(tl.int64)
    counted = target != IGNORE
    valid = (target >= 0) & (target < V)
    # running max m and sum s of exp(x - m) per lane; lanes that have seen only padding keep m = -inf and s = 0
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        xv = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, xv)
        seen = m_new > float("-inf")
        s = tl.where(seen, s * tl.exp(m - m_new) + tl.exp(xv - m_new), 0.0)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - m_row), 0.0), 0))
    x_target = tl.load(x_row + target, mask=counted & valid, other=0.0).to(tl.float32)
    row_loss = tl.where(valid, lse - x_target, float("nan"))
    tl.store(loss + row, tl.where(counted, row_loss, 0.0))
    if WRITE_GRAD:
        for start in range(0, V, BLOCK):
            c = start + cols
            xv = tl.load(x_row + c, mask=c < V, other=0.0).to(tl.float32)
            grad = tl.exp(xv - lse) - tl.where(c == target, 1.0, 0.0)
            tl.store(x_row + c, tl.where(counted, grad, 0.0).to(x.dtype.element_ty), mask=c < V)


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, *, ignore_index: int,
                        write_grad: bool = True) -> None:
    """Write each row's cross-entropy into ``loss`` [rows] (float32) and, if ``write_grad``, replace ``logits``
    [rows, V] (contiguous) by the gradient of the summed loss with respect to them; ``targets`` [rows] int, rows
    whose target is ``ignore_index`` count 0."""
    rows, V = logits.shape
    if not (logits.is_contiguous() and loss.is_contiguous()):
        raise ValueError("cross_entropy_rows_ writes logits and loss in place: both must be contiguous")
    targets = targets.contiguous()  # a strided view of the targets (labels[::2]) is read as rows of stride 1
    with torch.cuda.device_of(logits):
        _cross_entropy_rows_kernel[(rows,)](logits, targets, loss, V, IGNORE=ignore_index, WRITE_GRAD=write_grad,
                                            BLOCK=min(_BLOCK, triton.next_power_of_2(V)), num_warps=8)
