"""The layers' element-wise pieces that keep only their inputs for the backward: RMSNorm (optionally gated by
silu(gate); alone, with the linear layer after it, or with the several projections after it), SwiGLU (alone or with
the linear layer after it) and the q/k L2 normalisation (which keeps its output, the tensor the attention keeps
anyway).

Eager PyTorch keeps what each small op needs (x in float32, the normalised x, silu(a), ...): about 10 KB per token for
a 1024-wide RMSNorm and 16 KB for a 2816-wide SwiGLU. These functions keep their inputs in the input dtype (and one
float32 per row for RMSNorm and the L2 norm) and recompute the rest in the backward: on CUDA through fused Triton
kernels (``triton/rmsnorm.py``, ``triton/swiglu.py``, ``triton/l2norm.py`` beside this file), elsewhere through
the same formulas in PyTorch. Under torch.compile the fused functions with a projection after them are the plain
formulas in a region the compiler recomputes (``efla.modules.recompute``), so compiled code keeps what eager keeps.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from efla.modules.linear import stack_weights
from efla.modules.recompute import recompute

_TRITON = importlib.util.find_spec("triton") is not None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       gate: torch.Tensor | None = None) -> torch.Tensor:
    """x / rms(x) * weight over the last dim [* silu(gate)], in float32, returned in x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * weight.float()
    if gate is not None:
        y = y * F.silu(gate.float())
    return y.to(x.dtype)


def l2_normalize_reference(y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y / sqrt(||y||^2 + eps) over the last dim (fla's L2 norm), in float32 or better, returned in y's dtype."""
    y32 = y.to(torch.promote_types(y.dtype, torch.float32))
    return (y32 * torch.rsqrt(y32.square().sum(-1, keepdim=True) + eps)).to(y.dtype)


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim (the MLP's two projections side by side)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x (optionally times silu(gate), gate shaped like x); same values as
    ``rms_norm_reference``, saving only x (and gate) and the per-row scale."""
    if torch.compiler.is_compiling():
        return rms_norm_reference(x, weight, eps, gate)
    return _RMSNorm.apply(x, weight, gate, eps)


def l2_normalize(y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``l2_normalize_reference``, saving only its output and one scale per row (autograd would keep y in float32
    and more)."""
    if torch.compiler.is_compiling():
        return l2_normalize_reference(y, eps)
    return _L2Normalize.apply(y, eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``swiglu_reference``, saving only gate_up; its gradient is one tensor like it (no concatenation)."""
    if torch.compiler.is_compiling():
        return swiglu_reference(gate_up)
    return _SwiGLU.apply(gate_up)


def runs_fused_kernels(x: torch.Tensor) -> bool:
    """Whether x's functions here run their Triton kernels (CUDA tensors, Triton installed)."""
    return _TRITON and x.is_cuda


def _rms_norm_rows(x2: torch.Tensor, weight: torch.Tensor, g2: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in x2's dtype, rstd float32 per row) for rows x2 [rows, N] (and gate rows g2)."""
    if runs_fused_kernels(x2):
        from efla.modules.triton.rmsnorm import rms_norm_fwd

        return rms_norm_fwd(x2, weight.contiguous(), eps, g2)
    x32 = x2.float()
    rstd = torch.rsqrt(x32.square().mean(-1) + eps)
    y = x32 * rstd[:, None] * weight.float()
    return (y if g2 is None else y * F.silu(g2.float())).to(x2.dtype), rstd


def _rms_norm_rows_backward(x2, weight, g2, rstd, dy2):
    """(dx, dweight float32, dgate or None) of ``_rms_norm_rows`` for the output gradient rows dy2."""
    if runs_fused_kernels(x2):
        from efla.modules.triton.rmsnorm import rms_norm_bwd

        return rms_norm_bwd(x2, weight.contiguous(), g2, rstd, dy2.contiguous())
    return _rms_norm_backward(x2, weight, g2, rstd, dy2)


def _rows(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.reshape(-1, x.shape[-1]).contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gate, eps):
        x2, g2 = _rows(x), _rows(gate)
        y, rstd = _rms_norm_rows(x2, weight, g2, eps)
        ctx.save_for_backward(x2, weight, g2, rstd)
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, weight, g2, rstd = ctx.saved_tensors
        dx, dw, dg = _rms_norm_rows_backward(x2, weight, g2, rstd, dy.reshape(x2.shape))
        shape = dy.shape
        return dx.view(shape), dw.to(weight.dtype), None if dg is None else dg.view(shape), None


def rms_norm_linear(x: torch.Tensor, weight: torch.Tensor, eps: float, proj_weight: torch.Tensor,
                    gate: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over x's last dim (weight [N], optionally times silu(gate)), its rows of proj_weight.shape[1] values
    (x [..., H, N] -> [..., H N]) @ proj_weight^T: the attention's per-head output norm and o_proj as one function
    that keeps x (and gate), one float32 per norm row and the weights, not the normalised product, which the backward
    forms again (one element-wise pass). proj_weight is used in x's dtype (as autocast would) and gets its gradient
    in its own."""
    if torch.compiler.is_compiling():
        def norm_linear(x: torch.Tensor, weight: torch.Tensor, proj_weight: torch.Tensor,
                        *gate: torch.Tensor) -> torch.Tensor:
            normed = rms_norm_reference(x, weight, eps, *gate)
            return F.linear(normed.reshape(*normed.shape[:-2], -1), proj_weight.to(x.dtype))

        return recompute(norm_linear, x, weight, proj_weight, *(() if gate is None else (gate,)))
    return _RMSNormLinear.apply(x, weight, gate, eps, x.dtype, proj_weight).view(*x.shape[:-2], proj_weight.shape[0])


def rms_norm_project(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     proj_weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """RMSNorm over x's last dim (weight [N]) followed by the projections proj_weights ([out_i, N] each), their
    outputs side by side: ``linear_many(rms_norm(x, weight, eps), proj_weights)`` as one function that keeps x, one
    float32 per row and the weights, not the normalised x (a [tokens, N] tensor per block), which the backward
    forms again (one element-wise pass). Under autocast the normalised x and the weights meet in its dtype, as
    ``linear_many`` would have them."""
    if torch.compiler.is_compiling():
        def norm_project(x: torch.Tensor, weight: torch.Tensor, *proj_weights: torch.Tensor) -> torch.Tensor:
            return F.linear(rms_norm_reference(x, weight, eps), torch.cat(proj_weights))

        return recompute(norm_project, x, weight, *proj_weights)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        out = sum(w.shape[0] for w in proj_weights)  # not -1: x may have no rows (an empty shard)
        return _RMSNormLinear.apply(x, weight, None, eps, dtype, *proj_weights).view(*x.shape[:-1], out)


def _linear_grads(dout: torch.Tensor, inputs: torch.Tensor,
                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of inputs @ weight^T from dout (rows [M, in] and [M, out]; weight used in inputs' dtype): the
    inputs' and the weight's, the latter in the weight's own dtype."""
    return dout.mm(weight.to(inputs.dtype)), dout.t().mm(inputs).to(weight.dtype)


class _RMSNormLinear(torch.autograd.Function):
    """RMSNorm rows of x (and gate), read as rows of the projections' input width, @ the stacked projections^T in
    dtype: rows [M, sum of the outputs]. Keeps x, gate, one float32 per norm row and the weights."""

    @staticmethod
    def forward(ctx, x, weight, gate, eps, dtype, *proj_weights):
        x2, g2 = _rows(x), _rows(gate)
        y, rstd = _rms_norm_rows(x2, weight, g2, eps)
        ctx.save_for_backward(x2, weight, g2, rstd, *proj_weights)
        ctx.eps, ctx.dtype, ctx.shape = eps, dtype, x.shape
        return F.linear(y.to(dtype).view(-1, proj_weights[0].shape[1]), stack_weights(proj_weights, dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x2, weight, g2, rstd, *proj_weights = ctx.saved_tensors
        y = _rms_norm_rows(x2, weight, g2, ctx.eps)[0].to(ctx.dtype).view(-1, proj_weights[0].shape[1])
        dout = dout.reshape(y.shape[0], dout.shape[-1])
        dy = dout.mm(stack_weights(tuple(proj_weights), ctx.dtype))
        dprojs = dout.t().mm(y).split([w.shape[0] for w in proj_weights])
        dx, dw, dg = _rms_norm_rows_backward(x2, weight, g2, rstd, dy.view(x2.shape).to(x2.dtype))
        shape = ctx.shape
        return (dx.view(shape), dw.to(weight.dtype), None if dg is None else dg.view(shape), None, None,
                *(d.to(w.dtype) for d, w in zip(dprojs, proj_weights, strict=True)))


class _L2Normalize(torch.autograd.Function):
    """With r = (||y||^2 + eps)^(-1/2) and n = y r: dy_in = r (dn - n (n . dn)), from the output n and r alone. n is
    what the attention after the norm keeps too (one tensor, saved once), so the norm adds only r to a step's
    activations where saving its input would add a second [tokens, H, head_dim] copy. On CUDA (float64 aside) one
    fused Triton pass each way (``modules/triton/l2norm.py``); elsewhere the same formulas in PyTorch."""

    @staticmethod
    def forward(ctx, y, eps):
        ctx.fused = runs_fused_kernels(y) and y.dtype != torch.float64
        if ctx.fused:
            from efla.modules.triton.l2norm import l2_norm_fwd

            n, r = l2_norm_fwd(_rows(y), eps)
            n = n.view(y.shape)
        else:
            y32 = y.to(torch.promote_types(y.dtype, torch.float32))
            r = torch.rsqrt(y32.square().sum(-1, keepdim=True) + eps)
            n = (y32 * r).to(y.dtype)
        ctx.save_for_backward(n, r)
        return n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dn):
        n, r = ctx.saved_tensors
        if ctx.fused:
            from efla.modules.triton.l2norm import l2_norm_bwd

            return l2_norm_bwd(_rows(n), r, _rows(dn)).view(dn.shape), None
        n32 = n.to(r.dtype)
        d = dn.to(r.dtype)
        return (r * (d - n32 * (n32 * d).sum(-1, keepdim=True))).to(n.dtype), None


def _rms_norm_backward(x, weight, gate, rstd, dy):
    """The backward formulas of ``modules/triton/rmsnorm.py`` in PyTorch (float32)."""
    xh = x.float() * rstd[:, None]
    w = weight.float()
    dn = dy.float()
    dg = None
    if gate is not None:
        g = gate.float()
        s = torch.sigmoid(g)
        dg = (dn * xh * w * s * (1 + g * (1 - s))).to(gate.dtype)
        dn = dn * g * s
    dw = (dn * xh).sum(0)
    wdn = w * dn
    dx = rstd[:, None] * (wdn - xh * (xh * wdn).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw, dg


def _swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    if runs_fused_kernels(gate_up):
        from efla.modules.triton.swiglu import swiglu_fwd

        return swiglu_fwd(gate_up)
    return swiglu_reference(gate_up)


def _swiglu_backward(gate_up: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    if runs_fused_kernels(gate_up):
        from efla.modules.triton.swiglu import swiglu_bwd

        return swiglu_bwd(gate_up, dy.contiguous())
    a, b = gate_up.float().chunk(2, dim=-1)
    g = dy.float()
    s = torch.sigmoid(a)
    return torch.cat([g * b * s * (1 + a * (1 - s)), g * a * s], dim=-1).to(gate_up.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gate_up = gate_up.contiguous()
        ctx.save_for_backward(gate_up)
        return _swiglu_forward(gate_up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        return _swiglu_backward(*ctx.saved_tensors, dy)


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(silu(gate) * up) @ weight^T for gate_up = [gate | up], the SwiGLU MLP's down projection, saving gate_up and
    weight but not silu(gate) * up (the backward forms it again). weight is used in gate_up's dtype (as autocast
    would) and gets its gradient in its own."""
    if torch.compiler.is_compiling():
        return recompute(_swiglu_linear_reference, gate_up, weight)
    return _SwiGLULinear.apply(gate_up, weight)


def _swiglu_linear_reference(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(swiglu_reference(gate_up), weight.to(gate_up.dtype))


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight):
        gate_up = gate_up.contiguous()
        ctx.save_for_backward(gate_up, weight)
        return F.linear(_swiglu_forward(gate_up), weight.to(gate_up.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        gate_up, weight = ctx.saved_tensors
        dproduct, dw = _linear_grads(dy.flatten(0, -2), _swiglu_forward(gate_up).flatten(0, -2), weight)
        return _swiglu_backward(gate_up, dproduct.view(*dy.shape[:-1], weight.shape[1])), dw
