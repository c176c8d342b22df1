"""RMSNorm, and the gated RMSNorm applied to the attention output before o_proj."""

from __future__ import annotations

import torch
from torch import nn

from efla.modules.elementwise import rms_norm


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32 (bf16 sums of squares lose too much); keeps only x
    for the backward (``efla.modules.elementwise.rms_norm``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * silu(gate): the output gate of DeltaNet-style layers (fla's FusedRMSNormGated)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return rms_norm(x, self.weight, self.eps, gate)
