"""Removing padding from a batch and putting it back: the one pair every layer uses.

``unpad`` packs the tokens a 0/1 mask marks as real into one row, each batch row becoming one sequence of
``cu_seqlens``; layers then run on the packed tokens only, so padding never enters a convolution, a recurrent state or
an attention, wherever it sits in the row. ``repad`` scatters packed outputs back to the batch, zeros at the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Padding:
    """Where the packed tokens came from: ``indices`` [total] their flat positions in the [batch * length] grid,
    ``cu_seqlens`` [batch + 1] int32 the cumulative count of real tokens per row."""

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    batch: int
    length: int


def unpad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Padding]:
    """x: [B, T, ...]; mask: [B, T] (nonzero = real token). Returns the real tokens packed in row order, [1, total,
    ...], and the Padding to undo it. Finding them copies their count to the host (one sync)."""
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be [batch, length] = {tuple(x.shape[:2])} (got {tuple(mask.shape)})")
    mask = mask.bool()
    indices = mask.flatten().nonzero().flatten()
    cu_seqlens = F.pad(mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    packed = x.flatten(0, 1).index_select(0, indices)[None]
    return packed, Padding(indices, cu_seqlens, x.shape[0], x.shape[1])


def repad(packed: torch.Tensor, padding: Padding) -> torch.Tensor:
    """[1, total, ...] -> [B, T, ...] with zeros at the padded positions: the inverse of ``unpad``."""
    rest = packed.shape[2:]
    grid = packed.new_zeros(padding.batch * padding.length, *rest)
    return grid.index_copy(0, padding.indices, packed[0]).view(padding.batch, padding.length, *rest)
