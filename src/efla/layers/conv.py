"""Short causal depthwise convolution with SiLU, carrying the last inputs across calls for decoding.

Two layouts: dense rows x [B, T, C] (each row one sequence), or sequences packed along one row x [1, T, C] with
``cu_seqlens`` [N + 1] (padding removed by ``efla.layers.padding.unpad``, or packed training documents). The state of
a sequence is its last W - 1 inputs, [C, W - 1]; passing it back in continues the sequence exactly as if it had been
processed in one call (zeros when there is no past).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

_TRITON = importlib.util.find_spec("triton") is not None


class ShortConvolution(nn.Conv1d):
    """y_t = silu(sum_j w_j x_{t-j}) per channel, j < kernel_size; on [B, T, C] tensors (see ``short_conv``)."""

    def __init__(self, channels: int, kernel_size: int = 4) -> None:
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1 (got {kernel_size})")
        super().__init__(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        initial_state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, final state): ``short_conv`` and ``short_conv_state`` with this module's weight."""
        y = short_conv(x, self.weight, initial_state, cu_seqlens)
        return y, short_conv_state(x, self.kernel_size[0], initial_state, cu_seqlens)


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = silu(causal depthwise conv(x)), x's shape. x: [B, T, C]; weight: [C, 1, W]; initial_state: [B, C, W - 1]
    (one per sequence: [N, C, W - 1] with cu_seqlens) or None for zeros; cu_seqlens: [N + 1] cumulative lengths of
    sequences packed along T (B = 1), each convolved on its own."""
    if initial_state is None and x.is_cuda and _TRITON:  # training and prefill: the fused token-major kernel
        from efla.modules.triton.short_conv import short_conv_silu

        return short_conv_silu(x, weight, cu_seqlens)
    if cu_seqlens is not None:
        return _packed(x, weight, cu_seqlens, initial_state)
    seq = _with_past(x, initial_state, weight.shape[-1] - 1)
    return F.silu(F.conv1d(seq, weight, groups=x.shape[-1])).transpose(1, 2)


def short_conv_split(
    x: torch.Tensor,
    weight: torch.Tensor,
    n: int,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``short_conv`` of n inputs side by side in x [B, T, n C] (a layer's q, k and v projections from one matrix
    product), weight [n C, 1, W] and initial_state [B, n C, W - 1] holding theirs in the same order; returned as n
    tensors [B, T, C]. A depthwise convolution treats each channel alone, so this is the n convolutions. On a GPU
    without a state (training, prefill) it is one fused custom op: one call and one launch each way, which is what
    bounds a training step's host at small batches, and x's gradient comes back as one tensor."""
    if initial_state is None and x.is_cuda and _TRITON and n <= 3:
        from efla.modules.triton.short_conv import short_conv_silu_split

        return short_conv_silu_split(x, weight, n, cu_seqlens)
    return list(short_conv(x, weight, initial_state, cu_seqlens).chunk(n, dim=-1))


def short_conv_state(
    x: torch.Tensor,
    kernel_size: int,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The final state of each sequence after x (arguments as ``short_conv``): its last kernel_size - 1 inputs,
    preceded by initial_state (or zeros) when it is shorter; [B, C, W - 1], or [N, C, W - 1] with cu_seqlens."""
    past = kernel_size - 1
    if cu_seqlens is None:
        seq = _with_past(x, initial_state, past)
        return seq[..., seq.shape[-1] - past:]
    table = _with_states(x, initial_state, cu_seqlens, past)
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    position = ends[:, None] - past + torch.arange(past, device=x.device)  # [N, W - 1]
    # before its start, a sequence's input `position - start` (< 0) is its state's column W - 1 + position - start
    first_state_row = x.shape[1] + past * torch.arange(len(starts), device=x.device)[:, None]
    in_state = first_state_row + past + position - starts[:, None]
    source = torch.where(position >= starts[:, None], position, in_state)
    return table.index_select(0, source.flatten()).view(*source.shape, -1).transpose(1, 2)


def _with_past(x: torch.Tensor, initial_state: torch.Tensor | None, past: int) -> torch.Tensor:
    """[B, C, past + T]: the state (zeros when None) followed by x [B, T, C] channel-first."""
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[2], past)
    return torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=-1)


def _with_states(x: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor, past: int):
    """[T + N (W - 1), C]: the packed tokens of x [1, T, C], then each sequence's state columns (zeros when None), so
    that one index_select reads a sequence's inputs and, before its start, its state."""
    N, C = cu_seqlens.shape[0] - 1, x.shape[-1]
    if initial_state is None:
        states = x.new_zeros(N * past, C)
    else:
        states = initial_state.to(x.dtype).transpose(1, 2).reshape(N * past, C)
    return torch.cat([x[0], states])


def _packed(
    x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor, initial_state: torch.Tensor | None
) -> torch.Tensor:
    """The convolution of sequences packed in x [1, T, C], on the packed tokens (no padding, no host sync).

    One dense convolution runs over the whole row; only the first W - 1 tokens of each sequence can see inputs from
    before its start, so those N (W - 1) outputs are recomputed from their own sequence's inputs and state and
    written over the dense ones. Every other op stays a dense, contiguous one: gathering or scattering all T tokens
    would make the backward a scattered index_put over the whole row."""
    T, C = x.shape[1:]
    past = weight.shape[-1] - 1
    pre = F.conv1d(F.pad(x.transpose(1, 2), (past, 0)), weight, groups=C)[0].t()  # [T, C]
    if past == 0:
        return F.silu(pre)[None]
    table = _with_states(x, initial_state, cu_seqlens, past)
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    offset = torch.arange(past, device=x.device)  # p: position in the sequence
    lag = torch.arange(past + 1, device=x.device)
    token = starts[:, None] + offset  # [N, W - 1]: a sequence's first W - 1 tokens
    exists = token < ends[:, None]  # sequences shorter than W - 1 have fewer; the rest goes to a spare row
    # input `lag` tokens back from position p: a token of the sequence when lag <= p, else state column W - 1 + p - lag
    state_column = T + past * torch.arange(len(starts), device=x.device)[:, None, None] + past + offset[:, None] - lag
    source = torch.where(lag <= offset[:, None], token[..., None] - lag, state_column).clamp(0, table.shape[0] - 1)
    inputs = table.index_select(0, source.flatten()).view(*source.shape, C)  # [N, W - 1 (p), W (lag), C]
    taps = weight[:, 0, past - lag].t()  # [W (lag), C]: weight of the input `lag` tokens back
    fixed = (inputs * taps).sum(2).to(pre.dtype)  # [N, W - 1, C]
    spare = torch.where(exists, token, T).flatten()
    pre = torch.cat([pre, pre.new_zeros(1, C)]).index_copy(0, spare, fixed.flatten(0, 1))[:T]
    return F.silu(pre)[None]
