"""Context parallelism for the EFLA operator: ``efla_attention_cp`` runs ``efla_attention`` on sequences split along T
over a process group, each rank holding one contiguous shard, with the single-process result (exact, not an
approximation) and autograd's gradients.

Derivation. Per head the recurrence S_t = A_t S_{t-1} + B_t, A_t = gamma_t (I - alpha_t k_t k_t^T),
B_t = eta_t k_t v_t^T (``recurrent.py``), is affine in S, so a shard's tokens [a, b) of one sequence map the state
entering it to the state leaving it affinely:

    S_out = M S_in + H,   M = A_{b-1} ... A_a  [K, K],   H = the shard's state from S_in = 0  [K, V].

One state-only run of the operator (``efla_final_state``) gives both: on the values [v, 0] (width V + K) from the
initial state [0 | I], the zero values write nothing into the last K columns, which evolve as the product of the
transitions applied to I (= M), while the first V columns run from zero (= H). Where the sequence starts inside the
shard, the run starts from [S_0 | 0] (the sequence's own initial state): then M = 0 and H is its state. One
all-gather shares every rank's [H | M]; rank r folds the shards before it,

    S_in(r) = M_{r-1} (... (M_0 S + H_0) ...) + H_{r-1}   (any S: the sequence's start has M = 0),

then runs its tokens from S_in(r). The all-gather is autograd-aware: its backward sums the ranks' gradients for each
rank's [H | M] and returns it to that rank, so the state gradient flows from later ranks to earlier ones through M^T.

Packed documents (cu_seqlens, B = 1) may cross shard boundaries. The packed stream then carries one [H | M] per shard:
that of the shard's last document piece (the state of the document open after the shard's last token), from [0 | I]
if the document began on an earlier rank (it spans the shard) and from [S_0 | 0] if it begins here (M = 0: a document
boundary cuts the dependence); an empty shard passes the stream through ([0 | I]). Only the shard's first document,
when it began earlier, starts from S_in(r). With output_final_state, each rank also shares the [H | M] of the
documents that end in its shard (M = 0 unless the document began earlier), [N, H, K, V + K], from which every rank
forms every document's final state M S_in(owner) + H.

Cost: the extra state-only run has value width V + K. On the torch backend, which skips the output products, it is
about 1.1 times the chunkwise forward at K = V = 128 and chunk 64 (multiply-adds per chunk and head: the WY products
2 C^2 K, then C^2 + 2 C K per value column, against C^2 K + C K V + C^2 V more for the outputs: 6.4 M against
5.9 M), and its backward likewise; backends that compute the outputs anyway pay for them at width V + K too. The
shared tensors are small: [B or 1, H, K, V + K] per rank.
"""

from __future__ import annotations

import bisect

import torch
import torch.distributed as dist

from efla.ops.checks import assert_values, check_decay, check_inputs, sequence_lengths
from efla.ops.interface import efla_attention, efla_final_state


def efla_attention_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "efla",
    backend: str = "auto",
    chunk_size: int = 64,
    check_beta: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``efla_attention`` on sequences split along T over ``group`` (default: the whole world), ranks in order.

    Each rank passes its own contiguous shard of every sequence: q, k [B, T_r, H, K], v [B, T_r, H, V], beta and g
    [B, T_r, H], rank r holding the tokens after rank r - 1's. Shards may have any length, different per rank,
    0 included. Every rank passes the same B, H, K, V, gate (g or None), scale, mode, backend and chunk_size.

    Args:
        initial_state: [N, H, K, V] or None, the same on every rank (N = B, or the number of documents).
        cu_seqlens: the GLOBAL [N + 1] offsets of the documents packed along the concatenated shards (B = 1), the
            same on every rank; documents may cross shard boundaries. Read on the host.
        output_final_state: also return every sequence's final state [N, H, K, V], the same on every rank.
        The other arguments are as in ``efla_attention`` (``backend`` must support initial-state gradients).

    Returns:
        o: the rank's outputs [B, T_r, H, V]; the global final state or None.

    Gradients are those of the sum over ranks of each rank's loss. Each rank gets the gradients of its own q, k, v,
    beta and g. initial_state's gradient lands on the rank whose shard holds each sequence's first token (row by
    row); sum it over the group (all_reduce) for the full gradient. The final state is replicated: a loss that reads
    it on every rank counts it once per rank. As with any collective in a backward, every rank must backpropagate
    (through its o at least) when any does. Communication: an all-gather of the shard lengths (a host sync) and one
    differentiable all-gather of [H | M] per call (module docstring).
    """
    check_inputs(q, k, v, beta, initial_state, cu_seqlens, mode, backend, chunk_size, scale)
    if g is not None:
        check_decay(g, beta)
    if check_beta:
        assert_values(beta, mode, g)
    lengths = _shard_lengths(q, v, g, cu_seqlens, group)
    rank = dist.get_rank(group)
    start = sum(lengths[:rank])
    offsets = [0, sum(lengths)] if cu_seqlens is None else cu_seqlens.tolist()
    shard = _Shard(offsets, start, start + q.shape[1], packed=cu_seqlens is not None)
    settings = {"g": g, "mode": mode, "backend": backend, "chunk_size": chunk_size, "check_beta": False}
    local_cu = None if cu_seqlens is None else shard.local_offsets().to(cu_seqlens)

    maps = _piece_maps(k, v, beta, initial_state, shard, local_cu, settings)
    carry = maps[-1:] if shard.packed else maps
    ends = _document_ends(maps, shard) if shard.packed and output_final_state else carry[:0]
    # under autograd the all-gather is a graph node on every rank, even one whose inputs need no gradient (an empty
    # shard), so that every rank's backward joins its all-reduce
    anchor = torch.empty(0, device=q.device, requires_grad=torch.is_grad_enabled())
    shared = _AllGather.apply(torch.cat([carry, ends]), anchor, group)
    carries = shared[:, :carry.shape[0]]
    incoming = _fold(carries[:rank], v.shape[-1])

    if shard.empty:
        o = v.clone()  # [B, 0, H, V]: no tokens to run
    else:
        o, _ = efla_attention(q, k, v, beta, scale=scale, initial_state=_run_starts(initial_state, incoming, shard),
                              cu_seqlens=local_cu, **settings)
    o = _DependOn.apply(o, shared)  # every rank's backward then reaches the all-gather's (ranks 0 and empty shards too)
    if not output_final_state:
        return o, None
    if not shard.packed:
        return o, _fold(carries, v.shape[-1])
    return o, _document_finals(shared[:, carry.shape[0]:], carries, initial_state, offsets, lengths, v.shape[-1])


def _shard_lengths(q: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                   group: dist.ProcessGroup | None) -> list[int]:
    """Every rank's shard length T_r, after checking that the ranks agree on B, H, K, V, the gate and the number of
    documents (one all-gather of a few integers); with cu_seqlens, that the shards add up to its total."""
    B, T, H, K = q.shape
    documents = -1 if cu_seqlens is None else cu_seqlens.numel()
    shape = (B, H, K, v.shape[-1], int(g is not None), documents)
    mine = torch.tensor([T, *shape], device=q.device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    rows = [row.tolist() for row in gathered]
    for other, row in enumerate(rows):
        if tuple(row[1:]) != shape:
            raise ValueError(f"every rank must pass the same (B, H, K, V, gated, cu_seqlens entries): this rank has "
                             f"{shape}, rank {other} {tuple(row[1:])}")
    lengths = [row[0] for row in rows]
    if cu_seqlens is not None:
        sequence_lengths(cu_seqlens, sum(lengths))  # offsets from 0 to the shards' total length, non-decreasing
    return lengths


class _Shard:
    """Where a shard [start, end) falls among the documents of ``offsets`` (one document [0, T) per row when not
    packed): ``first`` and ``last`` index the documents holding its first and last token, ``continued`` says the
    first began on an earlier rank."""

    def __init__(self, offsets: list[int], start: int, end: int, packed: bool):
        self.offsets, self.start, self.end, self.packed = offsets, start, end, packed
        self.empty = end == start
        # the last offset <= a position is the start of the document that holds the position
        self.first = bisect.bisect_right(offsets, start) - 1
        self.last = bisect.bisect_right(offsets, end - 1) - 1 if not self.empty else self.first
        self.continued = offsets[self.first] < start

    def local_offsets(self) -> torch.Tensor:
        """cu_seqlens of the shard's document pieces (documents first..last cut to the shard)."""
        return torch.tensor([min(max(x - self.start, 0), self.end - self.start)
                             for x in self.offsets[self.first:self.last + 2]])

    def ends_here(self, n: int) -> bool:
        """Whether document n is non-empty and ends in this shard."""
        return self.offsets[n] < self.offsets[n + 1] and self.start < self.offsets[n + 1] <= self.end


def _piece_maps(k, v, beta, initial_state, shard: _Shard, local_cu, settings) -> torch.Tensor:
    """[H | M] of each of the shard's pieces (rows, or packed documents), [pieces, H, K, V + K]: one state-only run
    on the values [v, 0] from ``_piece_starts``."""
    starts = _piece_starts(initial_state, shard, k, v)
    if shard.empty:
        return starts
    return efla_final_state(k, _with_zero_values(v, k), beta, initial_state=starts, cu_seqlens=local_cu, **settings)


def _piece_starts(initial_state, shard: _Shard, q, v) -> torch.Tensor:
    """The initial states [pieces, H, K, V + K] of the run forming [H | M]: [0 | I] for a piece whose document began
    earlier (rows of a continued shard, or its first packed piece), [S_0 | 0] for one beginning here. An empty shard
    is a single [0 | I] per row: it passes the state through."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    dtype = _state_dtype(q)
    count = (shard.last - shard.first + 1 if not shard.empty else 1) if shard.packed else B
    identity = torch.eye(K, dtype=dtype, device=q.device).expand(count, H, K, K)
    through = torch.cat([identity.new_zeros(count, H, K, V), identity], dim=-1)
    if shard.empty or (shard.continued and not shard.packed):
        return through
    own = _own_states(initial_state, shard, count, q, v)
    begins = torch.cat([own, identity.new_zeros(count, H, K, K)], dim=-1)
    return torch.cat([through[:1], begins[1:]]) if shard.continued else begins


def _own_states(initial_state, shard: _Shard, count: int, q, v) -> torch.Tensor:
    """The user's initial states of the shard's pieces ([count, H, K, V], zeros without one)."""
    if initial_state is None:
        return q.new_zeros(count, q.shape[2], q.shape[3], v.shape[-1], dtype=_state_dtype(q))
    rows = initial_state[shard.first:shard.last + 1] if shard.packed else initial_state
    return rows.to(_state_dtype(q))


def _run_starts(initial_state, incoming, shard: _Shard) -> torch.Tensor | None:
    """The initial states of the (non-empty) shard's own run: S_in(r) for a continued first piece, the user's for
    the others."""
    if not shard.continued:
        return None if initial_state is None else (initial_state[shard.first:shard.last + 1] if shard.packed
                                                   else initial_state)
    if not shard.packed:
        return incoming
    count = shard.last - shard.first + 1
    rest = (incoming.new_zeros(count - 1, *incoming.shape[1:]) if initial_state is None
            else initial_state[shard.first + 1:shard.last + 1].to(incoming.dtype))
    return torch.cat([incoming, rest])


def _document_ends(maps: torch.Tensor, shard: _Shard) -> torch.Tensor:
    """[N, H, K, V + K]: the [H | M] of the documents ending in this shard, zeros for the others."""
    zero = maps.new_zeros(maps.shape[1:])
    return torch.stack([maps[n - shard.first] if shard.ends_here(n) else zero
                        for n in range(len(shard.offsets) - 1)])


def _document_finals(ends, carries, initial_state, offsets, lengths, V) -> torch.Tensor:
    """Every document's final state from the gathered ends ([world, N, H, K, V + K]): M S_in + H on the rank
    holding its last token; an empty document's is its initial state."""
    boundaries = [sum(lengths[:j + 1]) for j in range(len(lengths))]
    incoming = [_fold(carries[:j], V) for j in range(len(lengths))]
    finals = []
    for n in range(len(offsets) - 1):
        if offsets[n] == offsets[n + 1]:
            finals.append(initial_state[n].to(ends.dtype) if initial_state is not None
                          else ends.new_zeros((*ends.shape[2:-1], V)))
            continue
        owner = bisect.bisect_left(boundaries, offsets[n + 1])  # the first rank whose shard ends at or after it
        H, M = ends[owner, n, ..., :V], ends[owner, n, ..., V:]
        finals.append(H if incoming[owner] is None else M @ incoming[owner][0] + H)
    return torch.stack(finals)


def _fold(maps: torch.Tensor, V: int) -> torch.Tensor | None:
    """Apply the shards' maps S -> M S + H ([ranks, rows, H, K, V + K]) in order from a zero state (None: no shard)."""
    state = None
    for step in maps:
        H, M = step[..., :V], step[..., V:]
        state = H if state is None else M @ state + H
    return state


def _with_zero_values(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[v, 0]: the values widened by K zero columns, which write nothing and so carry the transitions' product."""
    return torch.cat([v, v.new_zeros(*v.shape[:-1], k.shape[-1])], dim=-1)


def _state_dtype(q: torch.Tensor) -> torch.dtype:
    """The operator's state dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class _AllGather(torch.autograd.Function):
    """Every rank's tensor, stacked [world, ...]; the backward sums the ranks' gradients (an all-reduce, which gloo
    has, unlike reduce-scatter) and returns each rank its own slice. ``anchor`` (empty) only makes the output
    require a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.stack(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: never the caller's tensor
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None, None


class _DependOn(torch.autograd.Function):
    """``o`` unchanged, made to depend on ``x`` (a zero gradient), so that a backward through o always reaches x."""

    @staticmethod
    def forward(ctx, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return o.view_as(o)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
