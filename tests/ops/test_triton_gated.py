"""Gated Triton kernels (``efla_attention(..., g=..., backend="triton")``: gated EFLA and Gated DeltaNet) against the
float64 chunkwise reference, which ``test_gated_backends.py`` checks against the step-by-step recurrence and a matrix
exponential.

On CPU the kernels run in Triton's interpreter on tiny shapes (see ``test_triton.py`` for TRITON_INTERPRET). GPU tests
(``-m gpu``) use real sizes: float32 within 1e-5 and bfloat16 within 2e-2 of float64 up to T = 16384, gradients
included, and agreement with fla's chunk_gated_delta_rule when fla-core is installed.
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
NAMES = ("q", "k", "v", "beta", "g", "h0")
WEAK, STRONG = 0.02, 6.0  # per-token log decay drawn from [-decay, 0]: a chunk's total reaches ~ -200 when strong


def _inputs(B, T, H, K, V, mode, n_states, seed, decay):
    """Fresh random inputs: EFLA gets keys of widely varying norm and beta up to 3, Gated DeltaNet unit keys and
    beta < 1; g uniform in [-decay, 0]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if mode == "efla":
        k = k * torch.empty(B, T, H, 1).uniform_(0.05, 1.5, generator=gen)
        beta = torch.rand(B, T, H, generator=gen) * 3
    else:
        k = torch.nn.functional.normalize(k, dim=-1)
        beta = torch.rand(B, T, H, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) * decay
    h0 = torch.randn(n_states, H, K, V, generator=gen)
    return [x.to(DEVICE) for x in (q, k, v, beta, g, h0)]


def _run(backend, dtype, inputs, mode, cu_seqlens=None, grads=True):
    """Output, final state and (if grads) the gradients of a random projection of both for q, k, v, beta, g, h0."""
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v, beta, g, h0 = (x.detach().to(dtype if i < 3 else state_dtype).requires_grad_(grads)
                            for i, x in enumerate(inputs))
    o, ht = efla_attention(q, k, v, beta, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                           mode=mode, backend=backend)
    if not grads:
        return o, ht, []
    gen = torch.Generator().manual_seed(1234)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    dht = torch.randn(ht.shape, generator=gen).to(ht.device)
    ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
    return o, ht, [x.grad for x in (q, k, v, beta, g, h0)]


def _check(dtype, inputs, mode, tol, cu_seqlens=None, grads=True, backend="triton"):
    o, ht, dx = _run(backend, dtype, inputs, mode, cu_seqlens, grads)
    o_ref, ht_ref, dx_ref = _run("torch", torch.float64, inputs, mode, cu_seqlens, grads)
    errors = {"o": rel_err(o, o_ref), "ht": rel_err(ht, ht_ref)}
    errors.update({f"d{n}": rel_err(a, b) for n, a, b in zip(NAMES, dx, dx_ref, strict=False)})
    print(f"{backend} {dtype} gated {mode}: max rel err {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize(("mode", "decay", "save_t"), [("efla", WEAK, True), ("efla", STRONG, False),
                                                       ("delta", WEAK, False), ("delta", STRONG, True)])
def test_gated_chunk_matches_float64(mode, decay, save_t):
    """Forward, final state and every gradient (q, k, v, beta, g, h0): two chunks with a ragged tail, K != V, weak
    and strong decay, the backward with T kept from the forward and inverted again."""
    from efla.ops.triton.settings import kernel_settings

    with kernel_settings(save_t=save_t):
        _check(torch.float32, _inputs(2, 80, 2, 32, 16, mode, 2, seed=21, decay=decay), mode, tol=1e-5)


def test_gated_backward_launches_with_the_gated_settings(monkeypatch):
    """The gated backward asks for the gated launch settings of each of its three kernels (tuned apart from the
    ungated ones, whose 8 warps ran the gated gradient passes at half speed), and the ungated one does not; both
    still match float64."""
    from efla.ops.triton import chunk_bwd

    asked = []
    chosen_by = chunk_bwd.launch

    def recording_launch(kernel, *args, gated=False, **kwargs):
        asked.append((kernel, gated))
        return chosen_by(kernel, *args, gated=gated, **kwargs)

    monkeypatch.setattr(chunk_bwd, "launch", recording_launch)
    inputs = _inputs(1, 70, 2, 16, 16, "efla", 1, seed=28, decay=0.5)
    _check(torch.float32, inputs, "efla", tol=1e-5)
    assert sorted(asked) == [("grad_qk", True), ("grad_wy", True), ("state_bwd", True)]
    asked.clear()
    q, k, v, beta, _g, h0 = (x.detach().requires_grad_() for x in inputs)
    efla_attention(q, k, v, beta, initial_state=h0, backend="triton")[0].sum().backward()
    assert sorted(asked) == [("grad_qk", False), ("grad_wy", False), ("state_bwd", False)]


def test_gated_reset_tokens_keep_float32_accuracy():
    """Tokens that all but erase the state (g = -300, as a gate near its reset) among weak decays: a chunk's running
    sum of g reaches thousands, so decays taken as differences of running sums would be off by its float32 ulp
    (5e-5 to 2e-4 measured); the kernels sum g over each span directly."""
    inputs = _inputs(1, 130, 2, 16, 16, "efla", 1, seed=35, decay=0.05)
    reset = torch.rand(inputs[4].shape, generator=torch.Generator().manual_seed(36)) < 0.3
    inputs[4] = torch.where(reset.to(DEVICE), -300.0, inputs[4])
    _check(torch.float32, inputs, "efla", tol=1e-5)


def test_gated_tf32_decays_stay_within_tf32_accuracy():
    """With tf32 chosen (16-bit inputs run the same way) the decays are differences of running sums, cheaper than the
    direct sums: the reset tokens above then cost about 1e-4 relative, far below tf32 products' 1e-3 and bf16's 4e-3."""
    inputs = _inputs(1, 130, 2, 16, 16, "efla", 1, seed=35, decay=0.05)
    reset = torch.rand(inputs[4].shape, generator=torch.Generator().manual_seed(36)) < 0.3
    inputs[4] = torch.where(reset.to(DEVICE), -300.0, inputs[4])
    before = torch.backends.cuda.matmul.allow_tf32  # a module attribute pytest's monkeypatch cannot restore
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _check(torch.float32, inputs, "efla", tol=5e-3)  # on a GPU the tf32 products dominate (about 1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_gated_wide_keys_float32_matches_float64():
    """float32 K = 256 forms dX_K X_K^T per V block in the gradient kernel (the gated scales on both sides)."""
    _check(torch.float32, _inputs(1, 70, 1, 256, 16, "efla", 1, seed=22, decay=1.0), "efla", tol=1e-5)


def test_gated_model_head_dims_float32_matches_float64():
    """K = V = 128, the head dimension of the models we train: two 64-wide K blocks, and two V blocks in the kernels
    whose float32 V-block is 64 (the tiny shapes above have one of each), two chunks with a ragged tail, every
    gradient."""
    _check(torch.float32, _inputs(1, 80, 1, 128, 128, "efla", 1, seed=42, decay=0.5), "efla", tol=1e-5)


@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_gated_varlen_matches_float64(mode):
    """Packed sequences (one empty, one shorter than a chunk, one spanning chunks): each decays on its own."""
    cu = torch.tensor([0, 5, 70, 70, 133], device=DEVICE)
    _check(torch.float32, _inputs(1, 133, 2, 16, 32, mode, 4, seed=23, decay=0.5), mode, tol=1e-5, cu_seqlens=cu)


@pytest.mark.parametrize("in_state_pass", [True, False])
def test_gated_output_in_or_after_the_state_pass(in_state_pass, monkeypatch):
    """The forward forms its output inside the state pass (the default at K <= 64) or in the output pass after it
    (the default at K = 128); either way, at one K, packed sequences and strong decay, it matches float64."""
    from efla.ops.triton import op

    monkeypatch.setattr(op, "output_in_state_pass", lambda *_: in_state_pass)
    cu = torch.tensor([0, 5, 70, 70, 133], device=DEVICE)
    _check(torch.float32, _inputs(1, 133, 2, 32, 16, "efla", 4, seed=29, decay=STRONG), "efla", tol=1e-5,
           cu_seqlens=cu)


@pytest.mark.parametrize(("mode", "T", "decay"), [("efla", 1, STRONG), ("efla", 9, WEAK), ("delta", 9, STRONG)])
def test_gated_fused_recurrent_matches_float64(mode, T, decay):
    """Inference on short sequences takes the fused recurrent kernel (no grad): the decode step, states in and out."""
    with torch.no_grad():
        _check(torch.float32, _inputs(3, T, 2, 16, 32, mode, 3, seed=24, decay=decay), mode, tol=1e-5, grads=False)


def test_gated_fused_recurrent_varlen():
    cu = torch.tensor([0, 3, 3, 12], device=DEVICE)
    with torch.no_grad():
        _check(torch.float32, _inputs(1, 12, 2, 16, 16, "efla", 3, seed=25, decay=1.0), "efla", tol=1e-5,
               cu_seqlens=cu, grads=False)


def test_gated_zero_decay_is_the_ungated_kernel():
    """g = 0 runs the gated path to the ungated result (alpha = eta, no decay): one float32 round-off apart."""
    q, k, v, beta, g, h0 = _inputs(1, 70, 2, 16, 16, "efla", 1, seed=26, decay=1.0)
    gated, gated_state = efla_attention(q, k, v, beta, g=torch.zeros_like(g), initial_state=h0,
                                        output_final_state=True, backend="triton")
    plain, plain_state = efla_attention(q, k, v, beta, initial_state=h0, output_final_state=True, backend="triton")
    assert rel_err(gated, plain) <= 1e-6 and rel_err(gated_state, plain_state) <= 1e-6


def test_wy_pass_stores_the_chunk_sums_of_g():
    """The WY pass stores, per token, G_t (g summed from its chunk's start) and G_C - G_t (summed over the chunk's
    later tokens), which the state passes read: both against float64 sums, chunks restarting at each sequence of a
    packed batch (a sequence of 70 tokens, an empty one, one of 150)."""
    from efla.ops.triton.op import chunk_map
    from efla.ops.triton.tiles import CHUNK
    from efla.ops.triton.wy import wy_fwd

    cu = torch.tensor([0, 70, 70, 220], device=DEVICE)
    _q, k, v, beta, g, _h0 = _inputs(1, 220, 3, 16, 16, "efla", 1, seed=27, decay=STRONG)
    k, v, beta, g = k[0], v[0], beta[0], g[0].contiguous()
    chunks, cu32 = chunk_map(k, cu, cu.cpu(), 1)
    sums = wy_fwd(k=k, v=v, beta=beta, g=g, chunks=chunks, cu=cu32, efla=True, prec="ieee")[3]
    for bos, eos in ((0, 70), (70, 220)):
        for start in range(bos, eos, CHUNK):
            chunk = g[start:min(start + CHUNK, eos)].double()
            running = chunk.cumsum(0)
            assert rel_err(sums[start:start + len(chunk), :, 0], running) <= 1e-6
            assert rel_err(sums[start:start + len(chunk), :, 1], running[-1] - running) <= 1e-6


# ---- GPU: real sizes, most important first ---------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_gpu_gated_long_float32_and_bfloat16(mode):
    """T = 16384: float32 within 1e-5 and bfloat16 within 2e-2 of float64, gradients included."""
    inputs = _inputs(1, 16384, 2, 128, 128, mode, 1, seed=27, decay=0.1)
    _check(torch.float32, inputs, mode, tol=1e-5)
    _check(torch.bfloat16, inputs, mode, tol=2e-2)


@gpu
@needs_cuda
def test_gpu_gated_strong_decay_float32():
    inputs = _inputs(2, 2048, 4, 128, 128, "efla", 2, seed=28, decay=STRONG)
    _check(torch.float32, inputs, "efla", tol=1e-5)


@gpu
@needs_cuda
def test_gpu_gated_auto_is_triton():
    """On CUDA "auto" takes the Triton kernels for g too."""
    q, k, v, beta, g, _ = _inputs(1, 256, 2, 64, 64, "efla", 1, seed=29, decay=0.5)
    auto = efla_attention(q, k, v, beta, g=g, backend="auto")[0]
    triton = efla_attention(q, k, v, beta, g=g, backend="triton")[0]
    assert torch.equal(auto, triton)


def _fla_refuses_gated_backward() -> bool:
    """fla raises in its gated backward on Hopper with Triton 3.4 to 3.7.0 (a Triton miscompile, fla issue 640)."""
    if importlib.util.find_spec("fla") is None or not torch.cuda.is_available():
        return False
    from fla.utils import env

    hopper = torch.cuda.get_device_capability()[0] == 9
    return hopper and getattr(env, "TRITON_ABOVE_3_4_0", True) and not getattr(env, "TRITON_ABOVE_3_7_1", True)


@gpu
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla-core")
@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_gpu_gated_matches_fla(mode):
    """fla's chunk_gated_delta_rule (alpha and eta in PyTorch) as a second, independent oracle in bfloat16: output and
    final state."""
    inputs = _inputs(2, 4096, 4, 128, 128, mode, 2, seed=30, decay=0.1)
    o, ht, _ = _run("triton", torch.bfloat16, inputs, mode, grads=False)
    o_fla, ht_fla, _ = _run("fla", torch.bfloat16, inputs, mode, grads=False)
    assert max(rel_err(o, o_fla), rel_err(ht, ht_fla)) <= 2e-2


@gpu
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla-core")
@pytest.mark.skipif(_fla_refuses_gated_backward(), reason="fla refuses its gated backward on Hopper with Triton "
                    "< 3.7.1 (fla issue 640); the float64 tests above check these gradients")
@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_gpu_gated_gradients_match_fla(mode):
    """The gradients too, where fla runs its gated backward."""
    inputs = _inputs(2, 4096, 4, 128, 128, mode, 2, seed=30, decay=0.1)
    _, _, dx = _run("triton", torch.bfloat16, inputs, mode)
    _, _, dx_fla = _run("fla", torch.bfloat16, inputs, mode)
    assert max(rel_err(a, b) for a, b in zip(dx, dx_fla, strict=True)) <= 2e-2


@gpu
@needs_cuda
def test_gpu_gated_varlen_bfloat16():
    cu = torch.tensor([0, 1, 64, 1000, 1001, 5000], device=DEVICE)
    _check(torch.bfloat16, _inputs(1, 5000, 4, 128, 128, "efla", 5, seed=31, decay=0.5), "efla", tol=2e-2,
           cu_seqlens=cu)


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_gated_fused_recurrent(T):
    with torch.no_grad():
        _check(torch.float32, _inputs(4, T, 4, 128, 128, "efla", 4, seed=32, decay=1.0), "efla", tol=1e-5,
               grads=False)
        _check(torch.bfloat16, _inputs(4, T, 4, 128, 128, "delta", 4, seed=33, decay=1.0), "delta", tol=2e-2,
               grads=False)


@gpu
@needs_cuda
@pytest.mark.parametrize(("K", "V"), [(16, 256), (256, 16), (256, 256), (32, 64)])
def test_gpu_gated_head_dims(K, V):
    inputs = _inputs(2, 1000, 3, K, V, "efla", 2, seed=34, decay=0.5)
    _check(torch.bfloat16, inputs, "efla", tol=2e-2)
    _check(torch.float32, inputs, "efla", tol=1e-5)


@gpu
@needs_cuda
def test_gpu_gated_output_in_the_state_pass(monkeypatch):
    """The state pass that forms the output (a full GPU's default at K <= 64, forced here at a test's few programs),
    bfloat16 and float32, packed sequences, against float64."""
    from efla.ops.triton import op

    monkeypatch.setattr(op, "output_in_state_pass", lambda *_: True)
    cu = torch.tensor([0, 1, 64, 1000, 1001, 3000], device=DEVICE)
    inputs = _inputs(1, 3000, 4, 64, 64, "efla", 5, seed=37, decay=0.5)
    _check(torch.bfloat16, inputs, "efla", tol=2e-2, cu_seqlens=cu)
    _check(torch.float32, inputs, "efla", tol=1e-5, cu_seqlens=cu)
