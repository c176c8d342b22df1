"""recompute: the plain function's outputs and gradients (float64), keeping only their inputs."""

from __future__ import annotations

import torch
from helpers import kept_for_backward

from efla.modules.elementwise import rms_norm_reference
from efla.modules.recompute import recompute


def _grads(out, inputs, seed):
    return torch.autograd.grad((out * seed).sum(), inputs)


def test_recompute_equals_the_plain_function_and_keeps_only_its_inputs():
    x, gate = (torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)

    def fn(x, gate, weight):
        return rms_norm_reference(x, weight, 1e-6, gate)

    out, kept = kept_for_backward(lambda: recompute(fn, x, gate, weight))
    plain = fn(x, gate, weight)
    torch.testing.assert_close(out, plain, atol=0, rtol=0)
    assert kept.keys() == {t.untyped_storage().data_ptr() for t in (x, gate, weight)}
    seed = torch.randn_like(plain)
    for g, g_plain in zip(_grads(out, (x, gate, weight), seed), _grads(plain, (x, gate, weight), seed), strict=True):
        torch.testing.assert_close(g, g_plain, atol=1e-12, rtol=1e-12)


def test_compiled_recompute_keeps_its_inputs_and_its_matrix_product_only():
    """Under torch.compile (Inductor) the region is recomputed in the backward but for its matrix product: the
    normalised input of the projection is not kept, the projection's output that the next op reads is."""
    import torch.nn.functional as F

    torch._dynamo.reset()
    x = torch.randn(64, 32, requires_grad=True)
    weight, proj = torch.randn(32, requires_grad=True), torch.randn(48, 32, requires_grad=True)

    def norm_project(x, weight, proj):
        return F.linear(rms_norm_reference(x, weight, 1e-6), proj)

    def model(x, weight, proj):
        return recompute(norm_project, x, weight, proj).square()  # square's backward reads the product

    compiled = torch.compile(model, backend="inductor")
    out, kept = kept_for_backward(lambda: compiled(x, weight, proj))
    plain = model(x, weight, proj)
    torch.testing.assert_close(out, plain, atol=1e-4, rtol=1e-4)
    sizes = [t.numel() for t in kept.values()]
    assert 64 * 48 in sizes  # the product
    assert sizes.count(64 * 32) == 1  # x, not also its normalised copy
    seed = torch.randn_like(plain)
    for g, g_plain in zip(_grads(out, (x, weight, proj), seed), _grads(plain, (x, weight, proj), seed), strict=True):
        torch.testing.assert_close(g, g_plain, atol=1e-4, rtol=1e-4)

