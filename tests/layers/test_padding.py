"""unpad / repad: each row's real tokens, then its padding, as two packed sequences, and back with zeros at the
padding; shapes that follow the batch alone, so the pair traces as one graph."""

from __future__ import annotations

import pytest
import torch

from efla.layers.padding import repad, unpad


def test_unpad_then_repad_round_trip():
    x = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 0]])
    packed, padding = unpad(x, mask)
    real = mask.bool()
    assert packed.shape == (1, 18, 4)
    assert padding.cu_seqlens.tolist() == [0, 4, 6, 9, 12, 15, 18] and padding.cu_seqlens.dtype == torch.int32
    bounds = padding.cu_seqlens.tolist()
    for b in range(3):  # sequence 2 b: row b's real tokens in order; sequence 2 b + 1: its padding
        assert torch.equal(packed[0, bounds[2 * b]:bounds[2 * b + 1]], x[b][real[b]])
        assert torch.equal(packed[0, bounds[2 * b + 1]:bounds[2 * b + 2]], x[b][~real[b]])
    back = repad(packed, padding)
    assert torch.equal(back[real], x[real]) and (back[~real] == 0).all()
    grad, = torch.autograd.grad(back.sum(), x)
    assert torch.equal(grad, real[..., None].expand_as(x).double())
    with pytest.raises(ValueError, match="mask must be"):
        unpad(x, mask[:, :5])


def test_states_go_to_the_real_sequences_and_back():
    _, padding = unpad(torch.zeros(2, 3, 1), torch.tensor([[0, 1, 1], [1, 1, 1]]))
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    per_sequence = padding.sequence_states(rows)
    assert per_sequence.tolist() == [[1, 2], [0, 0], [3, 4], [0, 0]]
    assert torch.equal(padding.row_states(per_sequence), rows)
    assert padding.sequence_states(None) is None and padding.row_states(None) is None


def test_traces_as_one_graph():
    x, mask = torch.randn(2, 5, 3), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])

    def round_trip(x, mask):
        packed, padding = unpad(x, mask)
        return repad(packed * 2, padding)

    torch._dynamo.reset()
    compiled = torch.compile(round_trip, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, mask), round_trip(x, mask), rtol=0, atol=0)
