"""recompute: the plain function's outputs and gradients (float64), keeping only their inputs."""

from __future__ import annotations

import torch

from efla.layers.recompute import recompute
from efla.modules.elementwise import rms_norm_reference


def _saved(fn, *tensors):
    """fn(*tensors) and the ids of the storages it keeps for the backward."""
    kept = set()

    def pack(tensor):
        kept.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(*tensors)
    return out, kept


def _grads(out, inputs, seed):
    return torch.autograd.grad((out * seed).sum(), inputs)


def test_recompute_equals_the_plain_function_and_keeps_only_its_inputs():
    x, gate = (torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)

    def fn(x, gate, weight):
        return rms_norm_reference(x, weight, 1e-6, gate)

    out, kept = _saved(lambda *t: recompute(fn, *t), x, gate, weight)
    plain = fn(x, gate, weight)
    torch.testing.assert_close(out, plain, atol=0, rtol=0)
    assert kept == {t.untyped_storage().data_ptr() for t in (x, gate, weight)}
    seed = torch.randn_like(plain)
    for g, g_plain in zip(_grads(out, (x, gate, weight), seed), _grads(plain, (x, gate, weight), seed), strict=True):
        torch.testing.assert_close(g, g_plain, atol=1e-12, rtol=1e-12)
