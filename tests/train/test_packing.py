"""Packing documents into rows with boundaries, and the per-rank shards of each step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from efla.train.data import TokenCorpus
from efla.train.packing import PackedRows, StepSampler, make_batch


def _corpus(lengths: list[int]) -> TokenCorpus:
    """Documents of the given lengths whose tokens are their document index (so a token says where it came from)."""
    tokens = np.concatenate([np.full(n, i, dtype=np.uint16) for i, n in enumerate(lengths)])
    starts = np.cumsum([0, *lengths[:-1]])
    return TokenCorpus(tokens, starts)


def test_rows_cover_the_stream_and_cut_at_document_starts():
    lengths = [5, 1, 12, 3, 9, 2, 7, 20]
    rows = PackedRows(_corpus(lengths), seq_len=8)
    stream = rows.corpus.tokens
    assert len(rows) == (sum(lengths) - 1) // 8
    for i in range(len(rows)):
        tokens, cuts = rows.row(i)
        np.testing.assert_array_equal(tokens, stream[i * 8:i * 8 + 9])
        # a cut wherever the document changes (the extra target token included), and nowhere else
        expected = [p for p in range(1, 9) if tokens[p] != tokens[p - 1]]
        assert cuts.tolist() == expected


def test_flattened_batch_has_one_document_per_segment():
    rows = PackedRows(_corpus([5, 1, 12, 3, 9, 2, 7, 20, 4, 6]), seq_len=8)
    indices = np.array([3, 0, 5])
    packed, plain = make_batch(rows, indices, flatten=True), make_batch(rows, indices, flatten=False)
    assert plain["input_ids"].shape == plain["targets"].shape == (3, 8) and plain["cu_seqlens"] is None
    torch.testing.assert_close(packed["input_ids"], plain["input_ids"].reshape(1, -1))
    torch.testing.assert_close(plain["targets"][:, :-1], plain["input_ids"][:, 1:])
    # with boundaries, exactly the targets that begin a new document are dropped
    inputs, targets, kept = plain["input_ids"], plain["targets"], packed["targets"].reshape(3, 8)
    new_document = targets != inputs
    assert new_document.any()
    torch.testing.assert_close(kept[~new_document], targets[~new_document])
    assert (kept[new_document] == -100).all()
    assert rows.num_targets(indices, flatten=True) == int((kept != -100).sum())
    assert rows.num_targets(indices, flatten=False) == 24
    cu = packed["cu_seqlens"].tolist()
    assert packed["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == 24
    assert all(b * 8 in cu for b in range(3))  # every row starts a segment
    ids = packed["input_ids"][0]
    for lo, hi in itertools.pairwise(cu):
        assert hi > lo and len(set(ids[lo:hi].tolist())) == 1  # one document per segment
    assert all(ids[p] != ids[p - 1] for p in cu[1:-1] if p % 8)  # and a new one at every cut inside a row


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_are_disjoint_and_make_up_the_step(world_size):
    sampler = StepSampler(num_rows=50, global_batch=8, seed=3)
    seen = []
    for step in range(12):  # two epochs of 6 steps (2 rows dropped per epoch)
        shards = [sampler.rank_rows(step, r, world_size) for r in range(world_size)]
        union = np.concatenate(shards)
        assert len(set(union.tolist())) == 8
        np.testing.assert_array_equal(union, StepSampler(50, 8, seed=3).step_rows(step))  # same for any world size
        seen.append(union)
    epoch0, epoch1 = np.concatenate(seen[:6]), np.concatenate(seen[6:])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48  # no row twice in an epoch
    assert not np.array_equal(epoch0, epoch1)  # reshuffled per epoch


def test_sampler_rejects_a_corpus_smaller_than_one_step():
    with pytest.raises(ValueError, match="only 3 rows but one step needs 8"):
        StepSampler(num_rows=3, global_batch=8, seed=0)
