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
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See ``short_conv`` (with this module's weight)."""
        return short_conv(x, self.weight, initial_state, lengths, cu_seqlens)


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = silu(causal depthwise conv(x)). x: [B, T, C]; weight: [C, 1, W]; initial_state: [B, C, W - 1] or None;
    lengths: [B] valid tokens per row (the rest of each row is padding at the end) or None for all T. Returns y
    [B, T, C] and the final state [B, C, W - 1], the last W - 1 valid inputs of each row (preceded by initial_state
    when the row is shorter).

    cu_seqlens: [N + 1] cumulative lengths of documents packed along T (B = 1, no initial_state, no lengths): each
    document is convolved from zeros; returns (y, None)."""
    if cu_seqlens is not None:
        return _packed(x, weight, cu_seqlens), None
    seq = _with_past(x, initial_state, weight.shape[-1] - 1)
    y = F.silu(F.conv1d(seq, weight, groups=x.shape[-1])).transpose(1, 2)
    return y, _last_inputs(seq, lengths, weight.shape[-1] - 1)


def short_conv_state(
    x: torch.Tensor, kernel_size: int, initial_state: torch.Tensor | None = None, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The final state ``short_conv`` returns, without the convolution: [B, C, kernel_size - 1]."""
    return _last_inputs(_with_past(x, initial_state, kernel_size - 1), lengths, kernel_size - 1)


def _with_past(x: torch.Tensor, initial_state: torch.Tensor | None, past: int) -> torch.Tensor:
    """[B, C, past + T]: the state (zeros when None) followed by x [B, T, C] channel-first."""
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[2], past)
    return torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=-1)


def _last_inputs(seq: torch.Tensor, lengths: torch.Tensor | None, past: int) -> torch.Tensor:
    """The last ``past`` inputs of each row of seq [B, C, past + T], of its first ``lengths`` tokens when given."""
    if lengths is None:
        return seq[..., seq.shape[-1] - past:]
    # token p of a row sits at past + p in seq, so its last `past` inputs sit at lengths .. lengths + past - 1
    index = lengths[:, None, None] + torch.arange(past, device=seq.device)
    return seq.gather(-1, index.expand(seq.shape[0], seq.shape[1], past))


def _packed(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The convolution of documents packed in x [1, T, C], on the packed tokens (no padding, no host sync).

    One dense convolution runs over the whole row; only the first W - 1 tokens of each document can see the
    document before it, so those N (W - 1) outputs are recomputed from their own document's inputs and written
    over the dense ones. Every other op stays a dense, contiguous one: gathering or scattering all T tokens made
    the backward an index_put over the whole row, half of a training step on an H200."""
    T, C = x.shape[1:]
    past = weight.shape[-1] - 1
    pre = F.conv1d(F.pad(x.transpose(1, 2), (past, 0)), weight, groups=C)[0].t()  # [T, C]
    if past == 0:
        return F.silu(pre)[None]
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    offset = torch.arange(past, device=x.device)
    token = starts[:, None] + offset  # [N, W - 1]: a document's first W - 1 tokens
    exists = token < ends[:, None]  # documents shorter than W - 1 have fewer; the rest goes to a spare row
    lag = offset  # output at position p of its document sees inputs at lags 0..p only
    source = (token[..., None] - lag).clamp(0, T - 1)  # [N, W - 1 (p), W - 1 (lag)]
    inputs = x[0].index_select(0, source.flatten()).view(*source.shape, C)
    taps = weight[:, 0, past - lag].t()  # [W - 1 (lag), C]: weight of the input `lag` tokens back
    within = (lag <= offset[:, None]).to(taps.dtype)  # [W - 1 (p), W - 1 (lag)]
    fixed = (inputs * (taps * within[..., None])).sum(2).to(pre.dtype)  # [N, W - 1, C]
    spare = torch.where(exists, token, T).flatten()
    pre = torch.cat([pre, pre.new_zeros(1, C)]).index_copy(0, spare, fixed.flatten(0, 1))[:T]
    return F.silu(pre)[None]
