"""Short causal depthwise convolution with SiLU, carrying the last inputs across calls for decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C]; initial_state: [B, C, W - 1] or None; lengths: [B] valid tokens per row (the rest of each
        row is padding at the end) or None for all T. Returns y [B, T, C] and the final state [B, C, W - 1], the last
        W - 1 valid inputs of each row (preceded by initial_state when the row is shorter)."""
        B, T, C = x.shape
        past = self.kernel_size[0] - 1
        if initial_state is None:
            initial_state = x.new_zeros(B, C, past)
        seq = torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, W - 1 + T]
        y = F.silu(F.conv1d(seq, self.weight, groups=C)).transpose(1, 2)
        if lengths is None:
            return y, seq[..., T:]
        # token p of a row sits at W - 1 + p in seq, so its last W - 1 inputs sit at lengths .. lengths + W - 2
        index = lengths[:, None, None] + torch.arange(past, device=x.device)
        return y, seq.gather(-1, index.expand(B, C, past))
