"""Recomputing cheap element-wise work in the backward instead of keeping its intermediate tensors.

Autograd keeps every intermediate an op needs for its gradient: an RMSNorm in float32 keeps its float32 input, the
inverse norm and the normalised product; SwiGLU keeps silu(gate) besides gate and up; the short convolution keeps its
padded input and its pre-activation. ``recompute(fn, *tensors)`` keeps only ``tensors`` (which, for the regions used
here, are small or kept anyway) and runs ``fn`` again in the backward to get the rest, costing one extra element-wise
pass and no matrix product. It is the "selective" activation checkpointing policy
(``EFLAPreTrainedModel.activation_checkpointing_enable``); the norms and SwiGLU keep only their inputs under every
policy (``efla.modules.elementwise``).

Under torch.compile the region becomes a ``torch.utils.checkpoint`` region whose element-wise work the compiler's
partitioner must recompute; its matrix products are kept, not formed again. Left to itself, the partitioner keeps
the products of the fused functions' plain formulas (each normalised input of a projection, the SwiGLU product, the
stacked projection weights): about 11 KB more per token and layer at the 340M preset's widths than the eager
functions, which recompute them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def recompute(fn: Callable[..., Any], *tensors: torch.Tensor, enabled: bool = True) -> Any:
    """fn(*tensors), saving only ``tensors`` for the backward and recomputing fn there.

    fn returns a tensor or a tuple of tensors, and must be a deterministic function of ``tensors`` alone: pass the
    parameters it uses among them (their gradients flow through), anything else it closes over is not
    differentiated. Without gradients, or with enabled=False, it is a plain call.
    """
    if not enabled or not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return fn(*tensors)
    if torch.compiler.is_compiling():  # a region the partitioner recomputes, but for its matrix products
        return torch.utils.checkpoint.checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=False,
                                                 context_fn=_keep_matrix_products)
    return _Recomputed.apply(fn, *tensors)


_MATRIX_PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                    torch.ops.aten.baddbmm.default}


def _products_saved(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep a region's matrix products (a projection's output that the next region reads is kept, as eager keeps it,
    not formed again); recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in _MATRIX_PRODUCTS else CheckpointPolicy.MUST_RECOMPUTE


def _keep_matrix_products() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_products_saved)


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *tensors):  # type: ignore[override]
        device = tensors[0].device.type
        ctx.fn, ctx.device = fn, device
        ctx.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        ctx.save_for_backward(*tensors)
        return fn(*tensors)

    @staticmethod
    def backward(ctx, *grad_outputs):  # type: ignore[override]
        needs = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs, strict=True)]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device, dtype=dtype, enabled=enabled):
            outputs = ctx.fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        used = [(out, grad) for out, grad in zip(outputs, grad_outputs, strict=True) if grad is not None]
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
        grads = iter(torch.autograd.grad([out for out, _ in used], wanted, [grad for _, grad in used],
                                         allow_unused=True))
        return None, *(next(grads) if need else None for need in needs)
