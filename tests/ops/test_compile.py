"""efla_attention under torch.compile: the Triton pipelines are custom ops, so a model traces around them in one
graph (packed cu_seqlens included) and its results and gradients equal eager's; eager calls skip the ops' dispatch
(the same functions, called directly)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from efla import efla_attention
from efla.ops.triton import backend as triton_backend
from efla.ops.triton.settings import kernel_settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(T, seed, gated=False):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, T, 2, 16, generator=g), torch.randn(1, T, 2, 16, generator=g)
    v, beta = torch.randn(1, T, 2, 32, generator=g), torch.rand(1, T, 2, generator=g)
    gate = [torch.randn(1, T, 2, generator=g)] if gated else []
    return [x.to(DEVICE).requires_grad_() for x in (q, k, v, beta, *gate)]


def _attend(q, k, v, beta, *gate, cu_seqlens):
    g = -torch.nn.functional.softplus(gate[0]) if gate else None
    o, state = efla_attention(q.tanh(), k, v, beta.sigmoid(), g=g, cu_seqlens=cu_seqlens, output_final_state=True,
                              backend="triton")
    return (o * o).sum() + state.sum()


@pytest.mark.parametrize(("packed", "gated"), [(False, False), (True, False), (True, True)])
def test_compiled_call_is_one_graph_and_equals_eager(packed, gated):
    torch._dynamo.reset()
    cu = torch.tensor([0, 17, 70, 90], device=DEVICE) if packed else None
    inputs = _inputs(90, seed=3 + packed, gated=gated)
    eager = _attend(*inputs, cu_seqlens=cu)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(_attend, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    out = compiled(*inputs, cu_seqlens=cu)
    grads = torch.autograd.grad(out, inputs)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_inference_takes_the_fused_recurrent_op():
    torch._dynamo.reset()
    q, k, v, beta = (x.detach() for x in _inputs(3, seed=9))
    state = torch.randn(1, 2, 16, 32, device=DEVICE)

    def step(q, k, v, beta, state):
        return efla_attention(q, k, v, beta, initial_state=state, output_final_state=True, backend="triton")

    with torch.no_grad():
        o, s = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, beta, state)
        o_ref, s_ref = step(q, k, v, beta, state)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)


@pytest.mark.parametrize("T", [3, 90])  # the fused recurrent op (inference, T <= 64) and the chunk op
def test_eager_calls_skip_the_custom_ops_and_compiled_calls_take_them(T, monkeypatch):
    """The custom ops' dispatch costs about as much host time as the rest of the call; eager calls never enter it."""
    entered = []
    for name in ("chunk_forward", "fused_recurrent_forward"):
        op = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name, lambda *a, op=op, name=name: entered.append(name) or op(*a))
    q, k, v, beta = (x.detach() for x in _inputs(T, seed=11))
    grad_enabled = T > 64
    with torch.set_grad_enabled(grad_enabled):
        if grad_enabled:
            q.requires_grad_()
        eager = efla_attention(q, k, v, beta, backend="triton")[0]
        assert entered == []
        torch._dynamo.reset()
        compiled = torch.compile(lambda *x: efla_attention(*x, backend="triton")[0], backend="aot_eager",
                                 fullgraph=True)(q, k, v, beta)
    assert entered == ["chunk_forward" if grad_enabled else "fused_recurrent_forward"]
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("strict", [False, True])
def test_export_records_the_custom_op(strict):
    """torch.export (either tracer) takes the custom op, not the eager path, and the exported program runs."""

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, beta):
            return efla_attention(q, k, v, beta, backend="triton")[0]

    q, k, v, beta = (x.detach() for x in _inputs(80, seed=13))
    program = torch.export.export(Attend(), (q, k, v, beta), strict=strict)
    targets = [str(node.target) for node in program.graph.nodes]
    assert "efla.chunk_forward.default" in targets
    torch.testing.assert_close(program.module()(q, k, v, beta), Attend()(q, k, v, beta))


def test_compiled_call_is_traced_again_under_other_kernel_settings():
    """The compiled graph bakes in the settings it was traced under (whether T is kept for the backward): a block of
    other settings traces it again, and both give eager's gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    inputs = _inputs(90, seed=17)
    eager_grads = torch.autograd.grad(_attend(*inputs, cu_seqlens=None), inputs)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_attend, backend=counter, fullgraph=True)
    for save_t in (True, False, True):
        with kernel_settings(save_t=save_t):
            grads = torch.autograd.grad(compiled(*inputs, cu_seqlens=None), inputs)
        for a, b in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 2
