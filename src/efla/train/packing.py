"""Packing a token stream into fixed-length rows, the deterministic per-step shard of each rank, and batches.

Row i is tokens[i*T : i*T + T + 1] (T = seq_len): T inputs and the T next tokens as targets, consecutive rows sharing
one token so every token is a target once. The documents starting inside a row cut it into segments; flattened into
one packed sequence they become ``cu_seqlens``, so the recurrent state restarts at each document, and the first
token of each document is then no target (-100: nothing of its own document precedes it), as in
``EFLAForCausalLM``'s loss with cu_seqlens.

Step s of a run uses rows ``step_rows(s)``: a seeded permutation of all rows per epoch, G = global batch rows per
step taken in order (the tail that does not fill a step is dropped). Rank r takes the r-th slice of G / world rows;
the ranks' slices are disjoint and the rows of a step do not depend on the world size, so a run on N ranks sees the
same data per step as one process with the same global batch. The data position is the step number alone.
"""

from __future__ import annotations

import numpy as np
import torch

from efla.train.data import TokenCorpus


class PackedRows:
    """The rows of ``seq_len`` inputs (+1 target) of a TokenCorpus, with the document starts inside each row."""

    def __init__(self, corpus: TokenCorpus, seq_len: int) -> None:
        self.corpus, self.seq_len = corpus, seq_len
        self.num_rows = (len(corpus.tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_rows

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [T + 1] int64, cuts): cuts are the row positions in (0, T] where a document starts (T: the
        extra target token)."""
        start = index * self.seq_len
        tokens = np.asarray(self.corpus.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        starts = self.corpus.doc_starts
        lo, hi = np.searchsorted(starts, [start + 1, start + self.seq_len + 1])
        return tokens, starts[lo:hi] - start

    def num_targets(self, indices: np.ndarray, flatten: bool) -> int:
        """How many targets of the rows ``indices`` count in the loss (all T per row, less the documents' first
        tokens when flattened with boundaries)."""
        total = len(indices) * self.seq_len
        if flatten:
            total -= sum(len(self.row(int(i))[1]) for i in indices)
        return total


class StepSampler:
    """Which rows each rank reads at each step: a pure function of (seed, step), so resuming needs only the step."""

    def __init__(self, num_rows: int, global_batch: int, seed: int) -> None:
        if num_rows < global_batch:
            raise ValueError(f"the corpus packs into only {num_rows} rows but one step needs {global_batch} "
                             "(micro_batch_size * grad_accum * world size): add data or lower the batch or seq_len")
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.steps_per_epoch = num_rows // global_batch
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def step_rows(self, step: int) -> np.ndarray:
        """The global batch of row indices of ``step`` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._order[position * self.global_batch:(position + 1) * self.global_batch]

    def rank_rows(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """This rank's disjoint slice of ``step_rows(step)``."""
        share = self.global_batch // world_size
        return self.step_rows(step)[rank * share:(rank + 1) * share]


def make_batch(rows: PackedRows, indices: np.ndarray, flatten: bool) -> dict[str, torch.Tensor | None]:
    """input_ids and targets of the rows ``indices``: [B, T] each, or with ``flatten`` [1, B*T] plus cu_seqlens
    [N + 1] int32 marking every row and document start (the packed varlen layout of efla_attention), and -100 as
    the target of every document's first token."""
    tokens, cuts = zip(*(rows.row(int(i)) for i in indices), strict=True)
    batch = torch.from_numpy(np.stack(tokens))
    input_ids, targets = batch[:, :-1], batch[:, 1:].clone()
    if not flatten:
        return {"input_ids": input_ids, "targets": targets, "cu_seqlens": None}
    T = rows.seq_len
    for b, c in enumerate(cuts):
        targets[b, torch.from_numpy(c - 1)] = -100
    bounds = [np.concatenate([[0], c[c < T]]) + b * T for b, c in enumerate(cuts)] + [np.asarray([len(indices) * T])]
    cu_seqlens = torch.from_numpy(np.concatenate(bounds).astype(np.int32))
    return {"input_ids": input_ids.reshape(1, -1), "targets": targets.reshape(1, -1), "cu_seqlens": cu_seqlens}
