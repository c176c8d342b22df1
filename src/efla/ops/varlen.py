"""Packed variable-length input for the PyTorch backends: unpack to a zero-padded batch and pack back.

Padding goes at the end of each sequence with beta = 0, hence a step size of 0, so it leaves the state exactly as the
last real token left it: the final states of the padded batch are the sequences' own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from efla.ops.checks import sequence_lengths


def unpack(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[1, sum(lengths), ...] -> [N, max(lengths), ...], zero-padded at the end of each sequence."""
    pieces = torch.split(x[0], lengths)
    return torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True)


def pack(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[N, max(lengths), ...] -> [1, sum(lengths), ...], the inverse of ``unpack``."""
    return torch.cat([x[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)


def run_packed(forward: Callable[..., tuple[torch.Tensor | None, torch.Tensor]], lengths_from: torch.Tensor,
               tokens: dict[str, torch.Tensor | None], **settings: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``forward(**tokens, **settings)`` of a forward over equal-length sequences, on sequences packed along T: each
    per-token tensor of ``tokens`` ([1, total, ...]; None passes through) becomes a padded row per sequence
    (``unpack``) and the output is packed back. The lengths are read on the host from ``lengths_from`` (cu_seqlens
    or its host copy), so the shapes follow them: torch.compile runs this untraced (``efla/ops/untraced.py``)."""
    lengths = sequence_lengths(lengths_from, tokens["q"].shape[1])
    padded = {name: None if x is None else unpack(x, lengths) for name, x in tokens.items()}
    o, state = forward(**padded, **settings)
    return (None if o is None else pack(o, lengths)), state


def _document_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    position = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(position.dtype), position, right=True)


document_index_op = torch.library.custom_op("efla::document_index", _document_index, mutates_args=())


def document_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """For each of the ``total`` packed tokens, the index of the sequence it belongs to ([total] int64, no sync).

    Under torch.compile a custom op, so it runs as written instead of through Inductor's searchsorted lowering, which
    on CUDA reads a sliced boundary tensor such as ``cu_seqlens[1:]`` off by one (pytorch/pytorch#182343): every
    token then lands one document too far, and the short convolution's positions went negative, zeroing q, k and v.
    Eager calls skip the op's dispatch (host time)."""
    return (document_index_op if torch.compiler.is_compiling() else _document_index)(cu_seqlens, total)


@document_index_op.register_fake
def _document_index_fake(cu_seqlens, total):
    return cu_seqlens.new_empty(total, dtype=torch.int64)
