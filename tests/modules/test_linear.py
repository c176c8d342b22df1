"""Several projections of one input as one matrix product (``linear_many``, ``layers.projection.project``): values
and gradients against float64 separate products, float32 weights under bfloat16 autocast, what the backward keeps,
and the fallback for linears that must run as themselves."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from torch import nn

from efla.layers.projection import is_plain_linear, project
from efla.modules.linear import linear_many

OUTS = (24, 24, 5)


def _inputs(dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 16, generator=g).to(dtype)
    weights = [(torch.randn(n, 16, generator=g) / 4).to(dtype) for n in OUTS]
    dy = torch.randn(2, 7, sum(OUTS), generator=g).to(dtype)
    return x, weights, dy


def _reference(x, weights, dy):
    leaves = [t.double().requires_grad_() for t in (x, *weights)]
    y = torch.cat([leaves[0] @ w.t() for w in leaves[1:]], dim=-1)
    return y, torch.autograd.grad(y, leaves, dy.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_separate_float64_products(dtype):
    x, weights, dy = _inputs(dtype, seed=1)
    leaves = [t.requires_grad_() for t in (x, *weights)]
    y = linear_many(leaves[0], leaves[1:])
    grads = torch.autograd.grad(y, leaves, dy)
    y_ref, grads_ref = _reference(x, weights, dy)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert y.shape == (2, 7, sum(OUTS)) and y.dtype == dtype and rel_err(y, y_ref) < tol
    for got, ref in zip(grads, grads_ref, strict=True):
        assert got.dtype == dtype and rel_err(got, ref) < tol


def test_float32_weights_under_autocast_compute_in_bfloat16_and_get_float32_gradients():
    x, weights, dy = _inputs(torch.float32, seed=2)
    leaves = [t.requires_grad_() for t in (x, *weights)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_many(leaves[0], leaves[1:])
        y_separate = torch.cat([torch.nn.functional.linear(x, w) for w in weights], dim=-1)
    assert y.dtype == torch.bfloat16 and rel_err(y, y_separate) < 1e-2
    grads = torch.autograd.grad(y, leaves, dy.bfloat16())
    _, grads_ref = _reference(x, weights, dy)
    for got, ref in zip(grads, grads_ref, strict=True):
        assert got.dtype == torch.float32 and rel_err(got, ref) < 2e-2


def test_keeps_the_input_and_the_weights_themselves():
    """No stacked copy of the weights is kept for the backward: only x and the parameters' own storage."""
    x, weights, _ = _inputs(torch.float32, seed=3)
    leaves = [t.requires_grad_() for t in (x, *weights)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_many(leaves[0], leaves[1:])
    assert sorted(t.data_ptr() for t in saved) == sorted(t.data_ptr() for t in leaves)


def test_frozen_weights_get_no_gradient():
    x, weights, dy = _inputs(torch.float32, seed=4)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(linear_many(x, weights), x, dy)
    _, grads_ref = _reference(x.detach(), weights, dy)
    assert rel_err(dx, grads_ref[0]) < 1e-6


def test_project_runs_wrapped_or_hooked_linears_as_themselves():
    torch.manual_seed(5)
    plain, hooked = nn.Linear(16, 8, bias=False), nn.Linear(16, 8, bias=False)
    hooked.register_forward_hook(lambda module, args, out: out * 2)  # e.g. an adapter adding to the output
    biased = nn.Linear(16, 4)
    x = torch.randn(3, 16)
    assert is_plain_linear(plain) and not is_plain_linear(hooked) and not is_plain_linear(biased)
    expected = torch.cat([plain(x), hooked(x), biased(x)], dim=-1)
    torch.testing.assert_close(project(x, (plain, hooked, biased)), expected)
    torch.testing.assert_close(project(x, (plain, plain)), torch.cat([plain(x), plain(x)], dim=-1))
