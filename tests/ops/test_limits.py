"""EFLA at the edges of float32: step durations and key norms whose product beta ||k||^2 overflows, infinite beta,
zero keys. The exact limits hold (alpha ||k||^2 -> 1: the projection onto k's complement) instead of silent zeros
or NaN from finite input; float64 computes the same inputs without overflow and is the reference."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from helpers import rel_err

from efla import alpha_from_beta, efla_attention


def _inputs(key_norm: float, beta_value: float, seed: int, K: int = 16):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 20, 2, K, generator=g), torch.randn(1, 20, 2, K, generator=g)
    k = torch.nn.functional.normalize(k, dim=-1) * key_norm
    k[:, 3] = 0  # a zero key among them: no step, whatever beta is
    v = torch.randn(1, 20, 2, 16, generator=g)
    beta = torch.rand(1, 20, 2, generator=g) * 2
    beta[:, ::2] = beta_value
    return q, k, v, beta


CASES = [(1e6, 1e30), (1e20, 0.7), (3.0, float("inf")), (1e-20, 5.0)]


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
@pytest.mark.parametrize(("key_norm", "beta_value"), CASES)
def test_reference_backends_hold_the_limits_in_float32(backend, key_norm, beta_value):
    q, k, v, beta = _inputs(key_norm, beta_value, seed=1)
    o, state = efla_attention(q, k, v, beta, output_final_state=True, backend=backend, chunk_size=8)
    o_ref, state_ref = efla_attention(q.double(), k.double(), v.double(), beta.double(), output_final_state=True,
                                      backend="recurrent")
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    assert rel_err(o, o_ref) < 1e-5 and rel_err(state, state_ref) < 1e-5  # an all-zero output would be 1.0 off


def test_alpha_at_overflowing_products_is_the_exact_limit():
    beta = torch.tensor([1e30, float("inf"), 2.0, float("inf")])
    lam = torch.tensor([1e12, 4.0, 0.0, 0.0], requires_grad=True)
    alpha = alpha_from_beta(beta.requires_grad_(), lam)
    expected = torch.tensor([1e-12, 0.25, 2.0, float("inf")])  # beta on a zero key: alpha = beta (no step: k = 0)
    torch.testing.assert_close(alpha, expected)
    alpha[:3].sum().backward()
    assert torch.isfinite(beta.grad[:3]).all() and torch.isfinite(lam.grad[:3]).all()
    torch.testing.assert_close(lam.grad[:2], torch.tensor([-1e-24, -1 / 16]))  # d(1/lam)/dlam


needs_kernels = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the Triton kernels need triton and a GPU or TRITON_INTERPRET=1")


@needs_kernels
@pytest.mark.parametrize(("key_norm", "beta_value"), [(1e6, 1e30), (3.0, float("inf"))])
def test_triton_holds_the_limits_in_float32(key_norm, beta_value):
    """The kernels' own alpha (forward, decode kernel, and the gradients) at overflowing beta ||k||^2."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, beta = (x.to(device) for x in _inputs(key_norm, beta_value, seed=2))
    o_ref, _ = efla_attention(q.double(), k.double(), v.double(), beta.double(), backend="recurrent")
    with torch.no_grad():
        o_decode, _ = efla_attention(q, k, v, beta, backend="triton")  # T = 20: the fused recurrent kernel
    assert rel_err(o_decode, o_ref) < 1e-5
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, _ = efla_attention(*leaves, beta, backend="triton")
    assert rel_err(o, o_ref) < 1e-5
    o.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
