"""The language-modelling loss, computed without materialising the logits of every token.

    loss = sum_t CE(W h_t, y_t) / n        over the targets y_t != -100; n = num_items_in_batch or their count

The plain computation ``F.cross_entropy((h @ W.T).float(), y)`` holds float32 logits [N, V] and their gradient at
once: 2 x 4 x N x V bytes, 4.2 GB for one 8 x 2048 batch with a 32,000-token vocabulary, more than the model's
activations. ``linear_cross_entropy`` goes over the tokens in chunks instead. For each chunk it forms the logits,
adds the chunk's loss, turns the logits in place into their gradient (softmax minus the one-hot target, zero for
ignored targets) and multiplies that into the gradients of the hidden states and of W, all in the forward; the
backward only scales them by the incoming gradient. On CUDA the loss and gradient of a chunk are one Triton kernel
over the logits as the product left them (``efla/modules/triton/cross_entropy.py``: two reads and one write of 16-bit
logits); elsewhere PyTorch forms them from a float32 copy. Peak extra memory: one chunk of logits (128 MiB as they are
held) plus the two gradients, the size of h and (in float32) of W.

The matrix products run in the dtype the plain computation would use (the autocast dtype when autocast is on, else the
inputs'), so the logits and the loss are the plain ones; the gradient of W is summed over chunks in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from efla.modules import elementwise

IGNORE_INDEX = -100
_CHUNK_BYTES = 2**27  # logits per chunk as they are held: 1,048 tokens of float32 (2,097 of bf16) at 32,000 words


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    targets: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The mean next-token loss: sum of the token cross-entropies of ``hidden @ weight.T`` against ``targets``, over
    ``num_items_in_batch`` (transformers' Trainer passes the count over all accumulated micro-batches) or, when None,
    over the number of targets that count.

    hidden: [..., D]; weight: [V, D] (the lm_head), or None when hidden already holds the logits [..., V] (a head
    that is not a plain linear layer); targets: [...] int, aligned with hidden's positions, -100 ignored.
    Returns a float32 scalar (NaN when no target counts and num_items_in_batch is None, as F.cross_entropy).
    """
    if weight is None:
        loss_sum = F.cross_entropy(hidden.flatten(0, -2).float(), targets.flatten().to(hidden.device),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        loss_sum = linear_cross_entropy(hidden, weight, targets, chunk_size)
    count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    return loss_sum / (count.to(loss_sum.device) if torch.is_tensor(count) else count)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """sum_t CE(weight @ hidden_t, targets_t) over targets != -100, a float32 scalar, in chunks of ``chunk_size``
    tokens (default: 128 MiB of logits per chunk). hidden: [..., D]; weight: [V, D]; targets: [...] int."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have hidden's shape without its last dim: {tuple(hidden.shape[:-1])} "
                         f"(got {tuple(targets.shape)})")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[-1]}] (got {tuple(weight.shape)})")
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    fused = _fused(hidden)
    if chunk_size is None:
        held_bytes = compute_dtype.itemsize if fused else 4
        chunk_size = max(1, _CHUNK_BYTES // (held_bytes * weight.shape[0]))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                     targets.reshape(-1).to(hidden.device), chunk_size, compute_dtype, fused)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain computation ``linear_cross_entropy`` equals: all float32 logits at once (for tests)."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _fused(x: torch.Tensor) -> bool:
    """The Triton kernel where the other fused kernels run (CUDA); under torch.compile the PyTorch formulas, which
    the compiler fuses itself."""
    return elementwise.runs_fused_kernels(x) and not torch.compiler.is_compiling()


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, row_loss: torch.Tensor, need_grad: bool,
                         fused: bool) -> torch.Tensor | None:
    """Write the chunk's token losses into row_loss [chunk] and return d loss / d logits in the logits' dtype (None
    if not need_grad): softmax minus the one-hot target, zero where the target is ignored. ``fused``: through the
    Triton kernel, in place of the logits."""
    if fused:
        from efla.modules.triton.cross_entropy import cross_entropy_rows_

        cross_entropy_rows_(logits, targets, row_loss, ignore_index=IGNORE_INDEX, write_grad=need_grad)
        return logits if need_grad else None
    counted = targets != IGNORE_INDEX
    y = torch.where(counted, targets, 0)[:, None]
    logits32 = logits.float()
    log_z = logits32.logsumexp(-1)
    torch.mul(log_z - logits32.gather(1, y)[:, 0], counted, out=row_loss)
    if not need_grad:
        return None
    grad = logits32.sub_(log_z[:, None]).exp_()  # formed in place
    grad.scatter_add_(1, y, -torch.ones_like(y, dtype=grad.dtype))
    return grad.mul_(counted[:, None]).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients chunk by chunk in the forward (see the module docstring); hidden [N, D]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype, fused):  # type: ignore[override]
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            row_loss = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                grad_logits = _chunk_loss_and_grad(h[rows] @ w.t(), targets[rows], row_loss[rows],
                                                   need_hidden or need_weight, fused)
                if need_hidden:
                    grad_hidden[rows] = grad_logits @ w
                if need_weight:
                    grad_weight += grad_logits.t() @ h[rows]
            loss = row_loss.sum()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None
