"""MQAR examples generated on the fly: key-value pairs, then every key queried once; only answers are scored.

Layout of one example of ``seq_len`` input tokens with P pairs (as Zoology's multi-query recall)::

    k_1 v_1 k_2 v_2 ... k_P v_P | 0 ... k_a 0 ... k_b 0 ...
    \\_____ context, 2P ______/   \\__ queries: each key once, in a random even slot, 0 elsewhere __/

Keys are distinct draws from tokens [1, vocab/2), values any of [vocab/2, vocab); token 0 is the filler. The label at
a query key's position is its value (the next token the model must produce); every other label is -100 (ignored).
Queries sit in uniformly random slots (Zoology draws the gaps from a power law; here every slot is equally likely).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # label of positions that are not scored (F.cross_entropy's ignore_index)


@dataclass(frozen=True)
class RecallTask:
    """One MQAR setting: input length, number of key-value pairs, vocabulary size."""

    seq_len: int
    num_pairs: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.num_pairs < 1 or 4 * self.num_pairs > self.seq_len:
            raise ValueError(f"num_pairs must be in [1, seq_len / 4] (got {self.num_pairs} for seq_len {self.seq_len})")
        if self.num_pairs >= self.vocab_size // 2:
            raise ValueError(f"vocab_size {self.vocab_size} leaves fewer than {self.num_pairs} distinct keys")


def recall_batch(task: RecallTask, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` examples of ``task`` drawn from ``generator``: input ids and labels, both int64 [B, seq_len]."""
    B, P, T = batch_size, task.num_pairs, task.seq_len
    half = task.vocab_size // 2
    keys = torch.rand(B, half - 1, generator=generator).argsort(-1)[:, :P] + 1  # P distinct keys per example
    values = torch.randint(half, task.vocab_size, (B, P), generator=generator)
    context = torch.stack([keys, values], dim=-1).view(B, 2 * P)
    query_len = T - 2 * P
    slots = torch.rand(B, query_len // 2, generator=generator).argsort(-1)[:, :P]  # pair i queried in slot i
    positions = 2 * slots
    queries = torch.zeros(B, query_len, dtype=torch.long).scatter_(1, positions, keys)
    answers = torch.full((B, query_len), IGNORE, dtype=torch.long).scatter_(1, positions, values)
    inputs = torch.cat([context, queries], dim=1)
    labels = torch.cat([torch.full((B, 2 * P), IGNORE, dtype=torch.long), answers], dim=1)
    return inputs, labels
