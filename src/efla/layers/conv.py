"""Short causal depthwise convolution with SiLU, carrying the last inputs across calls for decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from efla.ops.varlen import document_index


class ShortConvolution(nn.Conv1d):
    """y_t = silu(sum_j w_j x_{t-j}) per channel, j < kernel_size; on [B, T, C] tensors.

    The state is the last ``kernel_size - 1`` inputs, [B, C, kernel_size - 1]; passing it back in continues a sequence
    exactly as if it had been processed in one call (zeros when there is no past).
    """

    def __init__(self, channels: int, kernel_size: int = 4) -> None:
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1 (got {kernel_size})")
        super().__init__(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        initial_state: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, T, C]; initial_state: [B, C, W - 1] or None; lengths: [B] valid tokens per row (the rest of each
        row is padding at the end) or None for all T. Returns y [B, T, C] and the final state [B, C, W - 1], the last
        W - 1 valid inputs of each row (preceded by initial_state when the row is shorter).

        cu_seqlens: [N + 1] cumulative lengths of documents packed along T (B = 1, no initial_state, no lengths):
        each document is convolved from zeros; returns (y, None)."""
        B, T, C = x.shape
        past = self.kernel_size[0] - 1
        if cu_seqlens is not None:
            return self._packed(x, cu_seqlens), None
        if initial_state is None:
            initial_state = x.new_zeros(B, C, past)
        seq = torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, W - 1 + T]
        y = F.silu(F.conv1d(seq, self.weight, groups=C)).transpose(1, 2)
        if lengths is None:
            return y, seq[..., T:]
        # token p of a row sits at W - 1 + p in seq, so its last W - 1 inputs sit at lengths .. lengths + W - 2
        index = lengths[:, None, None] + torch.arange(past, device=x.device)
        return y, seq.gather(-1, index.expand(B, C, past))

    def _packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The convolution of documents packed in x [1, T, C], on the packed tokens (no padding to the longest
        document, no host sync): W - 1 zeros are put before each document, so token t of document d sits at
        t + (d + 1)(W - 1) and its output at t + d(W - 1)."""
        T, C = x.shape[1:]
        past = self.kernel_size[0] - 1
        source = torch.arange(T, device=x.device) + document_index(cu_seqlens, T) * past
        seq = x.new_zeros(C, T + cu_seqlens.numel() * past)  # room for N + 1 documents: a bad cu_seqlens (not
        # ending at T) stays in bounds here and is reported by efla_attention
        seq = seq.index_copy(1, source + past, x[0].t())
        y = F.conv1d(seq[None], self.weight, groups=C)[0, :, source]
        return F.silu(y).t()[None]
