"""RMSNorm (plain and gated) and SwiGLU that save only their inputs: values and gradients against float64 autograd
of the plain formulas, through the PyTorch path and the Triton kernels (interpreter on CPU), and what they save."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from helpers import rel_err

from efla.modules.elementwise import (
    l2_normalize,
    l2_normalize_reference,
    rms_norm,
    rms_norm_linear,
    rms_norm_project,
    rms_norm_reference,
    swiglu,
    swiglu_linear,
    swiglu_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _use_kernels(fused: bool, monkeypatch) -> None:
    """fused: run the functions' Triton path (what a GPU runs; the interpreter on CPU), else their PyTorch formulas."""
    if not fused:
        return
    if importlib.util.find_spec("triton") is None or (not torch.cuda.is_available()
                                                        and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("the Triton kernels need triton and a GPU or TRITON_INTERPRET=1")
    import efla.modules.elementwise as elementwise

    monkeypatch.setattr(elementwise, "runs_fused_kernels", lambda x: True)


def _norm_inputs(rows, n, gated, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 3
    w = 1 + 0.3 * torch.randn(n, generator=g)
    gate = torch.randn(rows, n, generator=g) if gated else None
    dy = torch.randn(rows, n, generator=g)
    return [t if t is None else t.to(DEVICE, dtype) for t in (x, w, gate, dy)]


def _reference_grads(x, w, gate, dy, eps=1e-6):
    leaves = [t.detach().double().requires_grad_() for t in (x, w) + (() if gate is None else (gate,))]
    y = rms_norm_reference(leaves[0], leaves[1], eps, leaves[2] if gate is not None else None)
    return y, torch.autograd.grad(y, leaves, dy.double())


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_float64(gated, dtype):
    x, w, gate, dy = _norm_inputs(37, 96, gated, dtype, seed=1 + gated)
    leaves = [t.detach().requires_grad_() for t in (x, w) + (() if gate is None else (gate,))]
    y = rms_norm(leaves[0].view(37, 1, 96), leaves[1], 1e-6, None if gate is None else leaves[2].view(37, 1, 96))
    grads = torch.autograd.grad(y, leaves, dy.view(37, 1, 96))
    y_ref, grads_ref = _reference_grads(x, w, gate, dy)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and rel_err(y.view(37, 96), y_ref) < tol
    for a, b in zip(grads, grads_ref, strict=True):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_float64(dtype):
    g = torch.Generator().manual_seed(5)
    gate_up = torch.randn(3, 7, 100, generator=g).to(DEVICE, dtype) * 2
    dy = torch.randn(3, 7, 50, generator=g).to(DEVICE, dtype) * 2
    leaf = gate_up.detach().requires_grad_()
    y = swiglu(leaf)
    (grad,) = torch.autograd.grad(y, leaf, dy)
    a, b = (t.double().requires_grad_() for t in gate_up.chunk(2, dim=-1))
    y_ref = torch.nn.functional.silu(a) * b  # the definition, on the two halves as separate tensors
    grad_ref = torch.cat(torch.autograd.grad(y_ref, (a, b), dy.double()), dim=-1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.shape == (3, 7, 50) and rel_err(y, y_ref) < tol
    assert rel_err(grad, grad_ref) < tol


def test_only_inputs_are_saved():
    """What the backward keeps: RMSNorm its input, weight and one float32 per row; SwiGLU its two inputs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(128, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rms_norm(x, w, 1e-6)
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel() * 2 + 128 * 2 + 64 * 4
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu(x)
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel() * 2


triton_kernels = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or (not torch.cuda.is_available()
                                                   and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the Triton kernels need triton and a GPU or TRITON_INTERPRET=1")


@triton_kernels
@pytest.mark.parametrize("gated", [False, True])
def test_rms_norm_kernels_match_float64(gated):
    from efla.modules.triton.rmsnorm import rms_norm_bwd, rms_norm_fwd

    x, w, gate, dy = _norm_inputs(19, 80, gated, torch.float32, seed=7)  # rows not a multiple of the 8 per program
    y, rstd = rms_norm_fwd(x, w, 1e-6, gate)
    grads = rms_norm_bwd(x, w, gate, rstd, dy)
    y_ref, grads_ref = _reference_grads(x, w, gate, dy)
    assert rel_err(y, y_ref) < 1e-5
    for a, b in zip([g for g in grads if g is not None], grads_ref, strict=True):
        assert rel_err(a, b) < 1e-5


@triton_kernels
def test_swiglu_kernels_match_float64():
    from efla.modules.triton.swiglu import swiglu_bwd, swiglu_fwd

    g = torch.Generator().manual_seed(8)
    gate_up = torch.randn(7, 2 * 431, generator=g).to(DEVICE) * 2  # 7 x 431 outputs: not a multiple of the block
    dy = torch.randn(7, 431, generator=g).to(DEVICE) * 2
    y = swiglu_fwd(gate_up)
    d_gate_up = swiglu_bwd(gate_up, dy)
    leaf = gate_up.double().requires_grad_()
    y_ref = swiglu_reference(leaf)
    (d_ref,) = torch.autograd.grad(y_ref, leaf, dy.double())
    assert rel_err(y, y_ref) < 1e-6 and rel_err(d_gate_up, d_ref) < 1e-6


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_linear_matches_float64_and_keeps_no_product(dtype, fused, monkeypatch):
    _use_kernels(fused, monkeypatch)
    g = torch.Generator().manual_seed(6)
    gate_up = torch.randn(2, 9, 96, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(16, 48, generator=g) / 7).to(DEVICE)  # float32 weight, as under autocast
    dy = torch.randn(2, 9, 16, generator=g).to(DEVICE, dtype)
    leaves = [t.detach().requires_grad_() for t in (gate_up, weight)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = swiglu_linear(*leaves)
    assert sum(t.numel() for t in saved) == gate_up.numel() + weight.numel()
    grads = torch.autograd.grad(y, leaves, dy)
    ref = [t.detach().double().requires_grad_() for t in (gate_up, weight)]
    y_ref = swiglu_reference(ref[0]) @ ref[1].t()
    grads_ref = torch.autograd.grad(y_ref, ref, dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and rel_err(y, y_ref) < tol
    assert grads[1].dtype == torch.float32
    for x, r in zip(grads, grads_ref, strict=True):
        assert rel_err(x, r) < tol


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_linear_matches_float64_and_keeps_no_product(gated, dtype, fused, monkeypatch):
    """The output norm and o_proj in one: per-head RMSNorm of x [B, T, H, D] (gated or not), flattened, times a
    float32 weight (as under autocast); values and every gradient against float64 autograd, and what it keeps; through
    the PyTorch formulas and (fused) the RMSNorm Triton kernels, which a GPU runs."""
    _use_kernels(fused, monkeypatch)
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 5, 3, 16, generator=g) * 3).to(DEVICE, dtype)
    gate = torch.randn(2, 5, 3, 16, generator=g).to(DEVICE, dtype) if gated else None
    norm_w = (1 + torch.randn(16, generator=g) / 5).to(DEVICE)
    proj_w = (torch.randn(24, 48, generator=g) / 7).to(DEVICE)
    dy = torch.randn(2, 5, 24, generator=g).to(DEVICE, dtype)
    tensors = (x, norm_w, proj_w) + ((gate,) if gated else ())
    leaves = [t.detach().requires_grad_() for t in tensors]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = rms_norm_linear(leaves[0], leaves[1], 1e-6, leaves[2], leaves[3] if gated else None)
    rows = x.numel() // 16
    assert sum(t.numel() for t in saved) == x.numel() * (2 if gated else 1) + rows + 16 + proj_w.numel()
    grads = torch.autograd.grad(y, leaves, dy)
    ref = [t.detach().double().requires_grad_() for t in tensors]
    normed = rms_norm_reference(ref[0], ref[1], 1e-6, ref[3] if gated else None)
    y_ref = normed.flatten(-2) @ ref[2].t()
    grads_ref = torch.autograd.grad(y_ref, ref, dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and y.shape == (2, 5, 24) and rel_err(y, y_ref) < tol
    assert grads[1].dtype == grads[2].dtype == torch.float32
    for got, r in zip(grads, grads_ref, strict=True):
        assert rel_err(got, r) < tol


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("dtype", "autocast"),
                         [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_rms_norm_project_matches_float64_and_keeps_no_normalised_input(dtype, autocast, fused, monkeypatch):
    """A block's pre-norm and the projections after it in one: RMSNorm of x [B, T, N], then two float32 weights side
    by side (under bf16 autocast too, as a float32 model trains); values and every gradient against float64
    autograd, and what it keeps (x, one float32 per row and the weights, not the normalised x)."""
    _use_kernels(fused, monkeypatch)
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(2, 5, 32, generator=g) * 3).to(DEVICE, dtype)
    norm_w = (1 + torch.randn(32, generator=g) / 5).to(DEVICE)
    proj_ws = [(torch.randn(n, 32, generator=g) / 6).to(DEVICE) for n in (24, 40)]
    dy = torch.randn(2, 5, 64, generator=g).to(DEVICE)
    tensors = [x, norm_w, *proj_ws]
    leaves = [t.detach().requires_grad_() for t in tensors]
    saved = []
    with (torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast),
          torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)):
        y = rms_norm_project(leaves[0], leaves[1], 1e-6, leaves[2:])
    assert sum(t.numel() for t in saved) == x.numel() + 10 + 32 + sum(w.numel() for w in proj_ws)
    out_dtype = torch.bfloat16 if autocast else dtype
    assert y.dtype == out_dtype and y.shape == (2, 5, 64)
    grads = torch.autograd.grad(y, leaves, dy.to(out_dtype))
    ref = [t.detach().double().requires_grad_() for t in tensors]
    y_ref = rms_norm_reference(ref[0], ref[1], 1e-6) @ torch.cat(ref[2:]).t()
    grads_ref = torch.autograd.grad(y_ref, ref, dy.double())
    tol = 1e-5 if out_dtype == torch.float32 else 2e-2
    assert rel_err(y, y_ref) < tol
    assert [d.dtype for d in grads] == [t.dtype for t in tensors]
    for got, r in zip(grads, grads_ref, strict=True):
        assert rel_err(got, r) < tol


@pytest.mark.parametrize(("dtype", "fused"), [(torch.float32, False), (torch.bfloat16, False), (torch.float64, False),
                                              (torch.float32, True), (torch.bfloat16, True)])  # float64: never fused
def test_l2_normalize_matches_float64_and_keeps_its_output_only(dtype, fused, monkeypatch):
    _use_kernels(fused, monkeypatch)
    g = torch.Generator().manual_seed(9)
    y = (torch.randn(5, 3, 32, generator=g) * torch.logspace(-4, 2, 5)[:, None, None]).to(DEVICE, dtype)
    dy = torch.randn(5, 3, 32, generator=g).to(DEVICE, dtype)
    leaf = y.detach().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = l2_normalize(leaf)
    assert sum(t.numel() for t in saved) == y.numel() + 15  # the output itself and one scale per row
    assert any(t.data_ptr() == out.data_ptr() for t in saved)  # shared with whatever keeps the output, not a copy
    (grad,) = torch.autograd.grad(out, leaf, dy)
    ref_leaf = y.detach().double().requires_grad_()
    ref = l2_normalize_reference(ref_leaf)
    (grad_ref,) = torch.autograd.grad(ref, ref_leaf, dy.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert out.dtype == dtype and rel_err(out, ref) < tol and rel_err(grad, grad_ref) < tol


@triton_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_norm_kernels_match_float64(dtype):
    """The fused q/k L2 norm: rows not a multiple of the rows per program, a head dim not a power of two, norms from
    1e-4 to 1e2 (so eps matters in some rows)."""
    from efla.modules.triton.l2norm import l2_norm_bwd, l2_norm_fwd

    g = torch.Generator().manual_seed(10)
    y = (torch.randn(37, 48, generator=g) * torch.logspace(-4, 2, 37)[:, None]).to(DEVICE, dtype)
    dn = torch.randn(37, 48, generator=g).to(DEVICE, dtype)
    n, r = l2_norm_fwd(y, 1e-6)
    dy = l2_norm_bwd(n, r, dn)
    ref_leaf = y.detach().double().requires_grad_()
    ref = l2_normalize_reference(ref_leaf)
    (dy_ref,) = torch.autograd.grad(ref, ref_leaf, dn.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert n.dtype == dtype and dy.dtype == dtype and r.dtype == torch.float32
    assert rel_err(n, ref) < tol and rel_err(dy, dy_ref) < tol
