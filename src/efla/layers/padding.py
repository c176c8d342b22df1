"""Removing padding from a batch and putting it back: the one pair every layer uses.

``unpad`` packs a batch into one row in which each batch row becomes two sequences of ``cu_seqlens``: its real tokens
(those a 0/1 mask marks, in order), then its padding. Layers run on the packed row with the documents kept apart, so
padding never enters the convolution, recurrent state or attention of a real token, wherever it sits in the row.
``repad`` puts the outputs back in the batch, zeros at the padding. Every shape follows the batch's shape alone, not
the mask's contents, so there is no host sync and torch.compile traces it as one graph; the padding sequences cost
what a dense batch would, and their outputs and states are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Padding:
    """Where the packed tokens came from: ``indices`` [B * T] the flat position in the [B, T] grid of each packed
    token, ``mask`` [B, T] bool (True = real), ``cu_seqlens`` [2 B + 1] int32 the boundaries of the 2 B sequences
    (row b's real tokens are sequence 2 b, its padding sequence 2 b + 1)."""

    indices: torch.Tensor
    mask: torch.Tensor
    cu_seqlens: torch.Tensor

    def sequence_states(self, row_states: torch.Tensor | None) -> torch.Tensor | None:
        """Per-row states [B, ...] (e.g. a cache's) -> per-sequence states [2 B, ...]: zeros for the padding."""
        if row_states is None:
            return None
        return torch.stack([row_states, torch.zeros_like(row_states)], dim=1).flatten(0, 1)

    def row_states(self, sequence_states: torch.Tensor | None) -> torch.Tensor | None:
        """Per-sequence states [2 B, ...] -> each row's own [B, ...] (the states of its real tokens)."""
        return None if sequence_states is None else sequence_states[::2]


def unpad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Padding]:
    """x: [B, T, ...]; mask: [B, T] (nonzero = real token). Returns x's B * T tokens packed in one row, [1, B * T,
    ...], each row's real tokens first (in order) then its padding, and the Padding that undoes it."""
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be [batch, length] = {tuple(x.shape[:2])} (got {tuple(mask.shape)})")
    B, T = mask.shape
    mask = mask.bool()
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # per row: real positions, then padding
    indices = (order + torch.arange(B, device=mask.device)[:, None] * T).flatten()
    row_starts = torch.arange(B, device=mask.device) * T
    real_ends = row_starts + mask.sum(1)
    cu_seqlens = torch.cat([torch.stack([row_starts, real_ends], dim=1).flatten(), row_starts.new_full((1,), B * T)])
    packed = x.flatten(0, 1).index_select(0, indices)[None]
    return packed, Padding(indices, mask, cu_seqlens.to(torch.int32))


def repad(packed: torch.Tensor, padding: Padding) -> torch.Tensor:
    """[1, B * T, ...] -> [B, T, ...] with zeros at the padded positions: the inverse of ``unpad``."""
    B, T = padding.mask.shape
    rest = packed.shape[2:]
    grid = packed.new_zeros(B * T, *rest).index_copy(0, padding.indices, packed[0]).view(B, T, *rest)
    keep = padding.mask.view(B, T, *(1,) * len(rest))
    return torch.where(keep, grid, torch.zeros((), dtype=grid.dtype, device=grid.device))
