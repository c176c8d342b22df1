"""Triton backend against the float64 PyTorch references.

On CPU the kernels run in Triton's interpreter on tiny shapes: TRITON_INTERPRET=1 must be set before triton is first
imported (``TRITON_INTERPRET=1 pytest``; this module sets it itself when run alone, and skips, saying so, when
triton was imported without it). The
interpreter mishandles bfloat16 dot products, so bfloat16 is tested on GPU only. GPU tests (``-m gpu``) use real
sizes: float32 (tf32x3 dots by default, and the exact "ieee" mode) within 1e-5 and bfloat16 within 2e-2 of
float64, up to T = 16384, and agreement with fla's kernel when fla-core is installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import rel_err, require_triton_kernels

from efla import efla_attention

DEVICE = require_triton_kernels()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(B, T, H, K, V, mode, n_states, seed, device=DEVICE):
    """Fresh random inputs. EFLA gets keys of widely varying norm (it is stable for any); the delta rule gets unit
    keys and beta < 1, the regime where its Euler step is stable."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.randn(B, T, H, K, generator=g)
    if mode == "efla":
        k = k * torch.empty(B, T, H, 1).uniform_(0.05, 1.5, generator=g)
        beta = torch.rand(B, T, H, generator=g) * 3
    else:
        k = torch.nn.functional.normalize(k, dim=-1)
        beta = torch.rand(B, T, H, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    h0 = torch.randn(n_states, H, K, V, generator=g)
    return [x.to(device) for x in (q, k, v, beta, h0)]


def _run(backend, dtype, inputs, mode, cu_seqlens=None, grads=True):
    """Output, final state and (if grads) the gradients of a random projection of both, for q, k, v, beta, h0."""
    q, k, v, beta, h0 = (x.detach().to(dtype if i < 3 else torch.float64 if dtype == torch.float64 else torch.float32)
                         .requires_grad_(grads) for i, x in enumerate(inputs))
    o, ht = efla_attention(q, k, v, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                           mode=mode, backend=backend)
    if not grads:
        return o, ht, []
    g = torch.Generator(device="cpu").manual_seed(1234)
    do = torch.randn(o.shape, generator=g).to(o.device)
    dht = torch.randn(ht.shape, generator=g).to(ht.device)
    ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
    return o, ht, [x.grad for x in (q, k, v, beta, h0)]


def _check(dtype, inputs, mode, tol, cu_seqlens=None, grads=True, backend="triton"):
    o, ht, dx = _run(backend, dtype, inputs, mode, cu_seqlens, grads)
    o_ref, ht_ref, dx_ref = _run("torch", torch.float64, inputs, mode, cu_seqlens, grads)
    errors = {"o": rel_err(o, o_ref), "ht": rel_err(ht, ht_ref)}
    errors.update({f"d{n}": rel_err(a, b) for n, a, b in zip(("q", "k", "v", "beta", "h0"), dx, dx_ref, strict=False)})
    print(f"{backend} {dtype} {mode}: max rel err {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("mode", ["efla", "delta"])
@pytest.mark.parametrize("save_t", [True, False])
def test_chunk_matches_float64(mode, save_t):
    """Forward, final state and every gradient, two chunks with a ragged tail, K != V; the backward with T kept
    from the forward and with T inverted again."""
    from efla.ops.triton.settings import kernel_settings

    with kernel_settings(save_t=save_t):
        _check(torch.float32, _inputs(2, 80, 2, 32, 16, mode, 2, seed=1), mode, tol=1e-5)


@pytest.mark.parametrize("in_state_pass", [True, False])
def test_output_in_or_after_the_state_pass(in_state_pass, monkeypatch):
    """The forward forms its output inside the state pass (the default at K <= 64) or in the output pass after it
    (the default at K = 128); either way, at one K and with packed sequences, it matches float64."""
    from efla.ops.triton import op

    monkeypatch.setattr(op, "output_in_state_pass", lambda *_: in_state_pass)
    cu = torch.tensor([0, 5, 70, 70, 133], device=DEVICE)
    _check(torch.float32, _inputs(1, 133, 2, 32, 16, "efla", 4, seed=15), "efla", tol=1e-5, cu_seqlens=cu)


def test_wide_keys_float32_matches_float64():
    """float32 K = 256 takes the gradient kernel's other way to dX_K K^T (per V block, within shared memory)."""
    _check(torch.float32, _inputs(1, 70, 1, 256, 16, "efla", 1, seed=14), "efla", tol=1e-5)


def test_varlen_matches_float64():
    """Packed sequences (one empty, one shorter than a chunk, one spanning chunks) with per-sequence states."""
    cu = torch.tensor([0, 5, 70, 70, 133], device=DEVICE)
    _check(torch.float32, _inputs(1, 133, 2, 16, 64, "efla", 4, seed=2), "efla", tol=1e-5, cu_seqlens=cu)


def test_packed_plan_follows_cu_seqlens():
    """The chunk map of a cu_seqlens tensor is reused across calls (layers) but never outlives a change to it."""
    q, k, v, beta, _ = _inputs(1, 100, 2, 16, 16, "efla", 1, seed=13)
    cu = torch.tensor([0, 30, 100], device=DEVICE)
    for boundary in (30, 30, 71):  # the second call reuses the plan; the in-place change must invalidate it
        cu[1] = boundary
        o, _ = efla_attention(q, k, v, beta, cu_seqlens=cu, backend="triton")
        o_ref, _ = efla_attention(q.double(), k.double(), v.double(), beta.double(), cu_seqlens=cu, backend="torch")
        assert rel_err(o, o_ref) <= 1e-5
    with torch.inference_mode():  # inference tensors have no version counter: read every time, never cached
        cu = torch.tensor([0, 40, 100], device=DEVICE)
        o, _ = efla_attention(q, k, v, beta, cu_seqlens=cu, backend="triton")
        o_ref, _ = efla_attention(q.double(), k.double(), v.double(), beta.double(), cu_seqlens=cu, backend="torch")
    assert rel_err(o, o_ref) <= 1e-5


def test_dense_plan_is_built_once_per_shape():
    """Equal-length batches reuse one kept chunk map per (batch, length, device), equal to a fresh one, and a new
    shape gets its own: outputs stay right when batches of different shapes alternate."""
    from efla.ops.triton.plan import Chunks, dense_cu, dense_plan

    device = torch.device(DEVICE)
    first, again, other = dense_plan(3, 100, device), dense_plan(3, 100, device), dense_plan(2, 150, device)
    assert first[0] is again[0] and first[1] is again[1] and other[0] is not first[0]
    fresh = Chunks(dense_cu(3, 100, device), None, 3, 100)
    for name in ("seq", "t0", "first"):
        assert torch.equal(getattr(first[0], name), getattr(fresh, name))
    for B, T, seed in ((3, 100, 20), (2, 150, 21), (3, 100, 22)):
        q, k, v, beta, _ = _inputs(B, T, 2, 16, 16, "efla", 1, seed=seed)
        o, _ = efla_attention(q, k, v, beta, backend="triton")
        o_ref, _ = efla_attention(q.double(), k.double(), v.double(), beta.double(), backend="torch")
        assert rel_err(o, o_ref) <= 1e-5


def test_backward_fills_no_gradient_for_outputs_that_got_none():
    """Only o carries a gradient: the backward gets None for the kept T and the final state (never a zero-filled
    [tokens, heads, 64] tensor per layer and step), and the gradients still match float64."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(name in func.__name__ for name in ("zero", "fill")) and isinstance(out, torch.Tensor):
                self.shapes.append(tuple(out.shape))
            return out

    q, k, v, beta, _ = (x.requires_grad_() for x in _inputs(1, 80, 2, 16, 16, "efla", 1, seed=15))
    o, _ = efla_attention(q, k, v, beta, backend="triton")
    do = torch.randn_like(o)
    with Fills() as fills:
        o.backward(do)
    assert (80, 2, 64) not in fills.shapes, fills.shapes
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, beta)]
    efla_attention(*leaves, backend="torch")[0].backward(do.double())
    for x, ref in zip((q, k, v, beta), leaves, strict=True):
        assert rel_err(x.grad, ref.grad) <= 1e-5


def test_float16_forward():
    _check(torch.float16, _inputs(2, 70, 2, 16, 32, "efla", 2, seed=3), "efla", tol=5e-3, grads=False)


@pytest.mark.parametrize(("mode", "T"), [("efla", 1), ("delta", 9)])
def test_fused_recurrent_matches_float64(mode, T):
    """Inference on short sequences takes the fused recurrent kernel (no grad), states in and out."""
    with torch.no_grad():
        _check(torch.float32, _inputs(3, T, 2, 16, 32, mode, 3, seed=4), mode, tol=1e-5, grads=False)


def test_rejects_what_it_cannot_run():
    q, k, v, beta, _ = _inputs(1, 4, 1, 16, 16, "efla", 1, seed=5)
    with pytest.raises(TypeError, match="float64"):
        efla_attention(q.double(), k.double(), v.double(), beta, backend="triton")
    q48 = torch.randn(1, 4, 1, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        efla_attention(q48, q48, v, beta, backend="triton")


# ---- GPU: real sizes, most important first ---------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_gpu_long_float32_and_bfloat16(mode):
    """T = 16384: float32 within 1e-5 and bfloat16 within 2e-2 of float64, gradients included."""
    inputs = _inputs(1, 16384, 2, 128, 128, mode, 1, seed=7)
    _check(torch.float32, inputs, mode, tol=1e-5)
    _check(torch.bfloat16, inputs, mode, tol=2e-2)


@gpu
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla-core")
@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_gpu_matches_fla(mode):
    """The fla backend (alpha in PyTorch, fla's DeltaNet kernel) as a second, independent oracle in bfloat16."""
    inputs = _inputs(2, 4096, 4, 128, 128, mode, 2, seed=11)
    o, ht, dx = _run("triton", torch.bfloat16, inputs, mode)
    o_fla, ht_fla, dx_fla = _run("fla", torch.bfloat16, inputs, mode)
    errors = [rel_err(o, o_fla), rel_err(ht, ht_fla)] + [rel_err(a, b) for a, b in zip(dx, dx_fla, strict=True)]
    assert max(errors) <= 2e-2, errors
    _check(torch.bfloat16, inputs, mode, tol=2e-2, backend="fla")


@gpu
@needs_cuda
def test_gpu_varlen_bfloat16():
    cu = torch.tensor([0, 1, 64, 1000, 1001, 5000], device=DEVICE)
    _check(torch.bfloat16, _inputs(1, 5000, 4, 128, 128, "efla", 5, seed=8), "efla", tol=2e-2, cu_seqlens=cu)


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 16, 64])
def test_gpu_fused_recurrent(T):
    with torch.no_grad():
        _check(torch.float32, _inputs(4, T, 4, 128, 128, "efla", 4, seed=9), "efla", tol=1e-5, grads=False)
        _check(torch.bfloat16, _inputs(4, T, 4, 128, 128, "efla", 4, seed=10), "efla", tol=2e-2, grads=False)


@gpu
@needs_cuda
@pytest.mark.parametrize(("K", "V"), [(16, 256), (256, 16), (256, 256), (32, 64)])
def test_gpu_head_dims(K, V):
    inputs = _inputs(2, 1000, 3, K, V, "efla", 2, seed=6)
    _check(torch.bfloat16, inputs, "efla", tol=2e-2)
    _check(torch.float32, inputs, "efla", tol=1e-5)


@gpu
@needs_cuda
def test_gpu_ieee_float32():
    """The exact float32 dot mode (slow to compile, so a small head dim)."""
    from efla.ops.triton.settings import kernel_settings

    with kernel_settings(fp32_dot_precision="ieee"):
        _check(torch.float32, _inputs(2, 300, 2, 32, 32, "efla", 2, seed=12), "efla", tol=1e-5)


@gpu
@needs_cuda
def test_gpu_output_in_the_state_pass(monkeypatch):
    """The state pass that forms the output (a full GPU's default at K <= 64, forced here at a test's few programs),
    bfloat16 and float32, packed sequences, against float64."""
    from efla.ops.triton import op

    monkeypatch.setattr(op, "output_in_state_pass", lambda *_: True)
    cu = torch.tensor([0, 1, 64, 1000, 1001, 3000], device=DEVICE)
    inputs = _inputs(1, 3000, 4, 64, 64, "efla", 5, seed=16)
    _check(torch.bfloat16, inputs, "efla", tol=2e-2, cu_seqlens=cu)
    _check(torch.float32, inputs, "efla", tol=1e-5, cu_seqlens=cu)
