"""``AttentionCall``: one checked call of the EFLA operator, as every backend receives it."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionCall:
    """What ``efla_attention`` hands a backend once its arguments are checked and its defaults resolved.

    q, k: [B, T, H, K] (T >= 1; q is k in ``efla_final_state``, which reads no output); v: [B, T, H, V]; beta, and
    g when given: [B, T, H]. g is the log decay of gated EFLA / Gated DeltaNet, None for the ungated operator: the one
    place the gate is optional. scale is a number (K ** -0.5 already filled in). cu_seqlens: [N + 1] offsets of
    sequences packed along T (B = 1) or None; cu_seqlens_cpu: its host copy when the caller has one. mode: "efla" or
    "delta"; chunk_size: the torch backend's chunk length (Triton's is fixed). Shapes, dtypes and devices are as
    ``efla_attention`` documents and checks them.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor
    scale: float
    g: torch.Tensor | None = None
    initial_state: torch.Tensor | None = None
    output_final_state: bool = False
    cu_seqlens: torch.Tensor | None = None
    cu_seqlens_cpu: torch.Tensor | None = None
    mode: str = "efla"
    chunk_size: int = 64

    @property
    def gated(self) -> bool:
        """Whether the call carries a decay gate."""
        return self.g is not None

    @property
    def lengths_source(self) -> torch.Tensor | None:
        """Where the packed sequences' lengths are read: the host copy when given (no device sync), else cu_seqlens."""
        return self.cu_seqlens if self.cu_seqlens_cpu is None else self.cu_seqlens_cpu
