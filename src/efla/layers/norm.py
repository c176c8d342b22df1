"""RMSNorm, and the gated RMSNorm applied to the attention output before o_proj."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from efla.layers.recompute import recompute


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, computed in float32 (bf16 sums of squares lose too much); x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x) * silu(gate), in float32; x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * weight.float()
    return (normed * F.silu(gate.float())).to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim. With recompute=True only x is kept for the backward (the float32
    intermediates are recomputed there)."""

    def __init__(self, dim: int, eps: float = 1e-6, recompute: bool = False) -> None:
        super().__init__()
        self.eps, self.recompute = eps, recompute
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return recompute(self._norm, x, self.weight, enabled=self.recompute)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * silu(gate): the output gate of DeltaNet-style layers (fla's FusedRMSNormGated)."""

    def _gated_norm(self, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, weight, self.eps)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return recompute(self._gated_norm, x, gate, self.weight, enabled=self.recompute)
