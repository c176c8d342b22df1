"""Where the 64-token chunks of packed sequences live, read once per cu_seqlens tensor.

The chunk kernels run one program per chunk, so they need, per chunk, its sequence and first token, and per sequence
the row of its first chunk in the per-chunk state tensors. For equal-length batches this map is built on the device
without a sync, once per shape; for packed sequences of different lengths it needs the lengths on the host.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass

import torch
import triton

from efla.ops.checks import sequence_lengths
from efla.ops.triton.tiles import CHUNK


class Chunks:
    """Per chunk: ``seq`` (its sequence) and ``t0`` (its first token); per sequence: ``first`` (the global index of
    its first chunk); ``total`` chunks. All int32 on the device."""

    def __init__(self, cu_seqlens: torch.Tensor, lengths: list[int] | None, batch: int, length: int):
        device = cu_seqlens.device
        if lengths is None:  # equal lengths: built on the device, no sync
            per_seq = triton.cdiv(length, CHUNK)
            self.seq = torch.arange(batch, device=device, dtype=torch.int32).repeat_interleave(per_seq)
            within = torch.arange(batch * per_seq, device=device, dtype=torch.int32) % per_seq
            self.t0 = self.seq * length + within * CHUNK
            self.first = torch.arange(batch, device=device, dtype=torch.int32) * per_seq
        else:
            counts = [triton.cdiv(n, CHUNK) for n in lengths]
            starts = list(itertools.accumulate(lengths, initial=0))
            seq = [i for i, c in enumerate(counts) for _ in range(c)]
            t0 = [starts[i] + j * CHUNK for i, c in enumerate(counts) for j in range(c)]
            first = list(itertools.accumulate(counts, initial=0))[:-1]
            self.seq, self.t0, self.first = (torch.tensor(x, dtype=torch.int32).to(device) for x in (seq, t0, first))
        self.total = self.seq.numel()


@dataclass
class PackedPlan:
    """What a cu_seqlens tensor says, read once: its int32 copy, the sequence lengths and their chunk map."""

    source: weakref.ref
    version: int | None
    T: int
    cu: torch.Tensor
    lengths: list[int]
    _chunks: Chunks | None = None

    def chunks(self) -> Chunks:
        if self._chunks is None:
            self._chunks = Chunks(self.cu, self.lengths, 1, self.T)
        return self._chunks


_last_plans: dict[torch.device, PackedPlan] = {}
"""Per device, the plan of the last cu_seqlens tensor read there (``packed_plan``)."""


def packed_plan(cu_seqlens: torch.Tensor, T: int, cu_seqlens_cpu: torch.Tensor | None = None) -> PackedPlan:
    """The plan of cu_seqlens for T packed tokens. Reading the lengths costs a host-device sync unless the caller
    passes a host copy (``cu_seqlens_cpu``), and every layer of a model gets the same cu_seqlens tensor, so the plan of
    the last tensor seen on each device is kept (keyed by identity, in-place version and T): one sync per batch
    instead of one per layer, also when the layers of one process run on several GPUs. Inference-mode tensors carry
    no version, so they are read every time."""
    version = None if cu_seqlens.is_inference() else cu_seqlens._version
    last = _last_plans.get(cu_seqlens.device)
    if last is not None and last.source() is cu_seqlens and last.version == version and last.T == T:
        return last
    lengths = sequence_lengths(cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu, T)
    plan = PackedPlan(weakref.ref(cu_seqlens), version, T, cu_seqlens.to(torch.int32), lengths)
    if version is None:
        _last_plans.pop(cu_seqlens.device, None)
    else:
        _last_plans[cu_seqlens.device] = plan
    return plan


def dense_cu(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of ``batch`` sequences of ``length`` tokens each, [batch + 1] int32 (no sync)."""
    return torch.arange(0, batch + 1, device=device, dtype=torch.int32) * length


def dense_plan(batch: int, length: int, device: torch.device) -> tuple[Chunks, torch.Tensor]:
    """The chunk map and cu_seqlens of ``batch`` equal sequences of ``length`` tokens. Built once per shape and
    device and kept (a few int32 per chunk): building them is eight small kernel launches, which on a slow host cost
    about as much as the chunk kernels themselves at small shapes, in every forward and backward of every layer.
    Not kept while a CUDA graph is being captured (the tensors would live in the graph's memory pool)."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return (_build_dense_plan if capturing else _kept_dense_plan)(batch, length, device)


def _build_dense_plan(batch: int, length: int, device: torch.device) -> tuple[Chunks, torch.Tensor]:
    cu = dense_cu(batch, length, device)
    return Chunks(cu, None, batch, length), cu


_kept_dense_plan = functools.lru_cache(maxsize=32)(_build_dense_plan)
