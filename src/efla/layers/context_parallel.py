"""Context parallelism in the layers: sequences split along T over a process group, each rank holding one contiguous
shard (rank r the tokens after rank r - 1's; any lengths, 0 included), as ``efla.ops.context_parallel`` takes them.

The short convolution of a shard needs the W - 1 inputs before it, which other ranks hold: a halo. ``with_conv_halo``
gathers every rank's last W - 1 inputs (one differentiable all-gather, whose backward returns each rank the gradient
of its own tail), puts the W - 1 inputs before the shard in front of it (from several earlier ranks when shards are
shorter than the halo) and the convolution runs on the longer shard; its first W - 1 outputs are dropped. Packed
documents: halo tokens of an earlier document are zeros, which is the convolution's zero start, so no document sees
another's inputs. Prepending the halo as tokens, rather than passing it as the convolution's initial state, keeps
the fused convolution kernel (which takes no state) on GPUs.
"""

from __future__ import annotations

import bisect
import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Every rank's shard length and this rank's index: this rank holds the tokens [start, end)."""

    lengths: tuple[int, ...]
    rank: int

    @property
    def start(self) -> int:
        return sum(self.lengths[:self.rank])

    @property
    def end(self) -> int:
        return self.start + self.lengths[self.rank]


def shard_layout(length: int, group: dist.ProcessGroup, device: torch.device) -> ShardLayout:
    """The layout of the shards over ``group``, this rank's holding ``length`` tokens (one all-gather of the
    lengths: a host sync)."""
    mine = torch.tensor([length], device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return ShardLayout(tuple(int(n) for n in gathered), dist.get_rank(group))


def with_conv_halo(
    x: torch.Tensor,
    past: int,
    layout: ShardLayout,
    group: dist.ProcessGroup,
    offsets: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x with the halo in front [B, past + T_r, C], the convolution's cu_seqlens or None) for the shard x
    [B, T_r, C] of the sequences split over ``group``: the ``past`` inputs before the shard, zeros before the start
    of the sequence or, with ``offsets`` (the GLOBAL cu_seqlens of packed documents, B = 1, as a list), before the
    start of the shard's first document. With offsets the returned cu_seqlens are the shard's document pieces, the
    first one lengthened by the halo. Convolve, then drop the first ``past`` outputs."""
    if past == 0:
        return x, None if offsets is None else _document_pieces(offsets, layout, 0).to(x.device)
    B, T, C = x.shape
    tail = x[:, max(T - past, 0):]
    halo = _Halo.apply(torch.cat([tail.new_zeros(B, past - tail.shape[1], C), tail], dim=1), layout, group)
    if offsets is None:
        return torch.cat([halo, x], dim=1), None
    begins = offsets[bisect.bisect_right(offsets, layout.start) - 1]  # start of the shard's first document
    position = torch.arange(layout.start - past, layout.start, device=x.device)
    halo = halo * (position >= begins)[:, None].to(halo.dtype)
    return torch.cat([halo, x], dim=1), _document_pieces(offsets, layout, past).to(x.device)


def _halo_pieces(lengths: tuple[int, ...], past: int) -> list[tuple[int, int, int]]:
    """Where the halo of the rank after the shards of ``lengths`` comes from: (rank, width, halo column) for each
    earlier rank that gives it tokens, nearest first; rank j gives its last ``width`` tokens, which sit at the halo's
    columns [column, column + width)."""
    pieces, column = [], past
    for j in reversed(range(len(lengths))):
        width = min(lengths[j], column)
        column -= width
        if width:
            pieces.append((j, width, column))
        if column == 0:
            break
    return pieces


class _Halo(torch.autograd.Function):
    """The halo [B, past, C] of this rank (zeros where no earlier token exists) from every rank's ``tail``, its last
    ``past`` tokens zero-padded in front [B, past, C]: one all-gather. The backward returns each rank the gradient of
    its tail from the later ranks' halos: one all-reduce, which every rank joins (the halo is always used)."""

    @staticmethod
    def forward(ctx, tail: torch.Tensor, layout: ShardLayout, group) -> torch.Tensor:
        ctx.layout, ctx.group = layout, group
        tails = [torch.empty_like(tail) for _ in layout.lengths]
        dist.all_gather(tails, tail.contiguous(), group=group)
        past = tail.shape[1]
        halo = torch.zeros_like(tail)
        for j, width, column in _halo_pieces(layout.lengths[:layout.rank], past):
            halo[:, column:column + width] = tails[j][:, past - width:]
        return halo

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layout = ctx.layout
        past = grad.shape[1]
        grad_tails = grad.new_zeros(len(layout.lengths), *grad.shape)
        for j, width, column in _halo_pieces(layout.lengths[:layout.rank], past):
            grad_tails[j, :, past - width:] = grad[:, column:column + width]
        dist.all_reduce(grad_tails, group=ctx.group)
        return grad_tails[layout.rank], None, None


def _document_pieces(offsets: list[int], layout: ShardLayout, past: int) -> torch.Tensor:
    """The local cu_seqlens of the documents holding the shard's tokens, cut to the shard, every offset after the
    first moved by ``past`` (the halo in front of the first piece); an empty shard's is the halo alone."""
    start, end = layout.start, layout.end
    if end == start:
        return torch.tensor([0, past], dtype=torch.int32)
    first = bisect.bisect_right(offsets, start) - 1
    last = bisect.bisect_right(offsets, end - 1) - 1
    inner = [min(max(x - start, 0), end - start) + past for x in offsets[first + 1:last + 2]]
    return torch.tensor([0, *inner], dtype=torch.int32)
