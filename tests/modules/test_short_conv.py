"""The fused short-convolution kernels (``modules/triton/short_conv.py``) against the layer's PyTorch convolution in
float64: outputs and gradients, dense rows and packed sequences (one shorter than the kernel, one empty)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from helpers import rel_err

from efla.layers.conv import short_conv

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the Triton kernels need triton and a GPU or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("cu", [None, [0, 2, 2, 50, 131]])
def test_kernels_match_the_float64_convolution(cu):
    from efla.modules.triton.short_conv import short_conv_silu

    g = torch.Generator().manual_seed(3)
    B, T, C, W = (2, 67, 70, 4) if cu is None else (1, 131, 70, 4)
    x, dy = (torch.randn(B, T, C, generator=g) for _ in range(2))
    weight = torch.randn(C, 1, W, generator=g) / 2
    cu_seqlens = None if cu is None else torch.tensor(cu)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, weight)]
    y = short_conv_silu(*leaves, None if cu_seqlens is None else cu_seqlens.to(DEVICE))
    grads = torch.autograd.grad(y, leaves, dy.to(DEVICE))
    ref_leaves = [t.double().requires_grad_() for t in (x, weight)]
    y_ref = short_conv(*ref_leaves, None, cu_seqlens)  # on the CPU: the layer's PyTorch path
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert rel_err(y, y_ref) < 1e-5
    for a, b in zip(grads, grads_ref, strict=True):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("cu", [None, [0, 3, 40, 99]])
def test_three_inputs_side_by_side_match_each_alone(cu):
    """short_conv_silu_split (a layer's q, k and v projections side by side, one launch each way) gives each input's
    float64 convolution, outputs and gradients (the packed input's and the stacked weight's), dense rows and packed
    sequences."""
    from efla.modules.triton.short_conv import short_conv_silu_split

    g = torch.Generator().manual_seed(4)
    B, T, C, W = (2, 50, 70, 4) if cu is None else (1, 99, 70, 4)
    x = torch.randn(B, T, 3 * C, generator=g)
    weight = torch.randn(3 * C, 1, W, generator=g) / 2
    dys = [torch.randn(B, T, C, generator=g) for _ in range(3)]
    cu_seqlens = None if cu is None else torch.tensor(cu)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, weight)]
    ys = short_conv_silu_split(*leaves, 3, None if cu_seqlens is None else cu_seqlens.to(DEVICE))
    assert all(y.is_contiguous() and y.shape == (B, T, C) for y in ys)
    dx, dw = torch.autograd.grad(ys, leaves, [dy.to(DEVICE) for dy in dys])
    for i in range(3):
        ref_leaves = [t[..., i * C:(i + 1) * C].double().requires_grad_() for t in (x, weight.transpose(0, 2))]
        y_ref = short_conv(ref_leaves[0], ref_leaves[1].transpose(0, 2), None, cu_seqlens)
        dx_ref, dw_ref = torch.autograd.grad(y_ref, ref_leaves, dys[i].double())
        assert rel_err(ys[i], y_ref) < 1e-5
        assert rel_err(dx[..., i * C:(i + 1) * C], dx_ref) < 1e-5
        assert rel_err(dw[i * C:(i + 1) * C], dw_ref.transpose(0, 2)) < 1e-5


def test_split_rejects_a_wrong_count():
    from efla.modules.triton.short_conv import short_conv_silu_split

    x, w = torch.randn(1, 8, 12, device=DEVICE), torch.randn(12, 1, 4, device=DEVICE)
    with pytest.raises(ValueError, match="1 to 3 inputs"):
        short_conv_silu_split(x, w, 4, None)
    with pytest.raises(ValueError, match="weight per channel"):
        short_conv_silu_split(x, w[:6], 3, None)


def test_eager_calls_skip_the_custom_op_and_compiled_calls_take_it(monkeypatch):
    """Eager calls run the same functions without the custom op's dispatch (host time); torch.compile traces the op,
    with the same outputs and gradients."""
    from efla.modules.triton import short_conv as module

    entered = []
    op = module.short_conv_silu_op
    monkeypatch.setattr(module, "short_conv_silu_op", lambda *a: entered.append(1) or op(*a))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 20, 12, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(12, 1, 4, generator=g) / 2).to(DEVICE).requires_grad_()

    def conv_sum(x, weight):
        return sum((y * y).sum() for y in module.short_conv_silu_split(x, weight, 3, None))

    eager = conv_sum(x, weight)
    eager_grads = torch.autograd.grad(eager, (x, weight))
    assert entered == []
    torch._dynamo.reset()
    compiled = torch.compile(conv_sum, backend="aot_eager", fullgraph=True)(x, weight)
    assert entered == [1]
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled, (x, weight)), eager_grads, strict=True):
        torch.testing.assert_close(a, b)
