"""unpad / repad: the real tokens packed in row order, one sequence per row, and back with zeros at the padding."""

from __future__ import annotations

import pytest
import torch

from efla.layers.padding import repad, unpad


def test_unpad_then_repad_round_trip():
    x = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 0]])
    packed, padding = unpad(x, mask)
    real = mask.bool()
    assert torch.equal(packed[0], x[real])
    assert padding.cu_seqlens.tolist() == [0, 4, 7, 10] and padding.cu_seqlens.dtype == torch.int32
    back = repad(packed, padding)
    assert torch.equal(back[real], x[real]) and (back[~real] == 0).all()
    grad, = torch.autograd.grad(back.sum(), x)
    assert torch.equal(grad, real[..., None].expand_as(x).double())
    with pytest.raises(ValueError, match="mask must be"):
        unpad(x, mask[:, :5])
