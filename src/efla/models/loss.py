"""The language-modelling loss, computed without materialising the logits of every token.

    loss = sum_t CE(W h_t, y_t) / n        over the targets y_t != -100; n = num_items_in_batch or their count

The plain computation ``F.cross_entropy((h @ W.T).float(), y)`` holds float32 logits [N, V] and their gradient at
once: 2 x 4 x N x V bytes, 4.2 GB for one 8 x 2048 batch with a 32,000-token vocabulary, more than the model's
activations. ``linear_cross_entropy`` goes over the tokens in chunks instead. For each chunk it forms the logits in
float32, adds the chunk's loss, turns the logits in place into their gradient (softmax minus the one-hot target, zero
for ignored targets) and multiplies that into the gradients of the hidden states and of W, all in the forward; the
backward only scales them by the incoming gradient. Peak extra memory: one chunk of logits [chunk, V] plus the two
gradients, the size of h and (in float32) of W.

The matrix products run in the dtype the plain computation would use (the autocast dtype when autocast is on, else the
inputs'), so the logits and the loss are the plain ones; the gradient of W is summed over chunks in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 2**25  # logits per chunk (128 MiB in float32): 1,048 tokens at a 32,000-token vocabulary


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
    tokens (default: about 2**25 logits per chunk). hidden: [..., D]; weight: [V, D]; targets: [...] int."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have hidden's shape without its last dim: {tuple(hidden.shape[:-1])} "
                         f"(got {tuple(targets.shape)})")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[-1]}] (got {tuple(weight.shape)})")
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                     targets.reshape(-1).to(hidden.device), chunk_size, compute_dtype)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain computation ``linear_cross_entropy`` equals: all float32 logits at once (for tests)."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients chunk by chunk in the forward (see the module docstring); hidden [N, D]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype):  # type: ignore[override]
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            for start in range(0, h.shape[0], chunk_size):
                h_chunk, y = h[start:start + chunk_size], targets[start:start + chunk_size]
                counted = y != IGNORE_INDEX
                y = torch.where(counted, y, 0)[:, None]
                logits = (h_chunk @ w.t()).float()  # [chunk, V]
                log_z = logits.logsumexp(-1)
                loss += ((log_z - logits.gather(1, y)[:, 0]) * counted).sum()
                if not (need_hidden or need_weight):
                    continue
                # d loss / d logits = softmax - one_hot(target), zero where the target is ignored: formed in place
                grad_logits = logits.sub_(log_z[:, None]).exp_()
                grad_logits.scatter_add_(1, y, -torch.ones_like(y, dtype=grad_logits.dtype))
                grad_logits = grad_logits.mul_(counted[:, None]).to(compute_dtype)
                if need_hidden:
                    grad_hidden[start:start + chunk_size] = grad_logits @ w
                if need_weight:
                    grad_weight += grad_logits.t() @ h_chunk
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
        return grad_hidden, grad_weight, None, None, None
