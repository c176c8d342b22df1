"""Input projections of one tensor through several linear layers at once (``efla.modules.linear.linear_many``),
optionally after an RMSNorm (``efla.modules.elementwise.rms_norm_project``), with a fallback for layers that must run
as themselves (LoRA adapters, quantised or hooked linears, a hooked norm)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from efla.layers.norm import RMSNorm
from efla.modules.elementwise import rms_norm_project
from efla.modules.linear import linear_many


def has_hooks(module: nn.Module) -> bool:
    """Whether forward hooks are registered on the module: then its own call must run, not its weights directly."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (no subclass or wrapper) without bias or hooks: its output is x @ weight^T, so its
    weight can be used directly."""
    return type(module) is nn.Linear and module.bias is None and not has_hooks(module)


def project(x: torch.Tensor, linears: Sequence[nn.Module]) -> torch.Tensor:
    """[..., sum of the outputs]: each linear's output of x side by side, one matrix product when all are plain
    ``nn.Linear`` layers, else each module's own call concatenated."""
    if all(is_plain_linear(m) for m in linears):
        return linear_many(x, [m.weight for m in linears])
    return torch.cat([m(x) for m in linears], dim=-1)


def project_normed(x: torch.Tensor, norm: nn.Module, linears: Sequence[nn.Module]) -> torch.Tensor:
    """``project(norm(x), linears)``; when norm is an unhooked ``RMSNorm`` and every linear plain, one function that
    keeps x rather than norm(x) for the backward (which forms it again): one [tokens, hidden] tensor less per use."""
    if type(norm) is RMSNorm and not has_hooks(norm) and all(is_plain_linear(m) for m in linears):
        return rms_norm_project(x, norm.weight, norm.eps, [m.weight for m in linears])
    return project(norm(x), linears)
