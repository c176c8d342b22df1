"""Several linear projections of one input as one matrix product: ``linear_many(x, [W_1, ..., W_n])`` equals
``torch.cat([x @ W_1^T, ..., x @ W_n^T], -1)``.

A layer that projects the same x to q, k and v (or an MLP to its gate and up halves) runs n products forward and 2n
backward, and autograd adds the n input gradients together one element-wise pass at a time: at 16k tokens and
hidden size 1024 each add moves 96 MB. Here x meets the stacked weights once each way and x's gradient is one
product, with no adds. The stacked weight exists only inside each pass (the backward stacks it again): the forward
keeps x and the parameters themselves, as n separate ``F.linear`` calls would. Each weight gets its gradient in its
own dtype as a row block of one product, so float32 master weights under bfloat16 autocast behave as with
``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from efla.modules.recompute import recompute


def linear_many(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x [..., in] and weights [out_i, in] -> [..., sum(out_i)], the projections side by side in weights' order.
    Under autocast both operands are cast to its dtype, as ``F.linear`` would be."""
    if torch.compiler.is_compiling():  # the stacked weight recomputed in the backward, not kept
        return recompute(_stacked_linear, x, *weights)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    with torch.autocast(device, enabled=False):
        return _LinearMany.apply(x, *weights)


def _stacked_linear(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    return F.linear(x, torch.cat(weights))


def stack_weights(weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """The weights one under the other, in dtype: one concatenation, then one cast (not a cast per weight)."""
    return (torch.cat(weights) if len(weights) > 1 else weights[0]).to(dtype)


class _LinearMany(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *weights):
        ctx.save_for_backward(x, *weights)
        return F.linear(x, stack_weights(weights, x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, *weights = ctx.saved_tensors
        dx = dy.matmul(stack_weights(tuple(weights), x.dtype)) if ctx.needs_input_grad[0] else None
        if not any(ctx.needs_input_grad[1:]):
            return dx, *(None for _ in weights)
        dws = dy.flatten(0, -2).t().mm(x.flatten(0, -2)).split([w.shape[0] for w in weights])
        return dx, *(d.to(w.dtype) for d, w in zip(dws, weights, strict=True))
