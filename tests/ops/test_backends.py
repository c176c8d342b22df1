"""The operator's boundary: one registry of backends, each a function of one ``AttentionCall``, which
``efla_attention`` fills with the checked arguments and resolved defaults (the decay gate optional in that one
place)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from efla import efla_attention, efla_final_state
from efla.ops.backends import BACKENDS
from efla.ops.call import AttentionCall
from efla.ops.checks import BACKENDS as BACKEND_NAMES


def _inputs(B=1, T=5, H=2, K=4, V=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    return q, k, torch.randn(B, T, H, V, generator=gen), torch.rand(B, T, H, generator=gen)


def test_every_backend_name_has_one_entry_taking_one_call():
    assert set(BACKENDS) == set(BACKEND_NAMES) - {"auto"}
    for name, backend in BACKENDS.items():
        assert len(inspect.signature(backend).parameters) == 1, name


def test_a_call_is_frozen_and_says_whether_it_is_gated():
    q, k, v, beta = _inputs()
    call = AttentionCall(q, k, v, beta, 0.5)
    assert not call.gated and call.lengths_source is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.scale = 1.0
    cu, cu_cpu = torch.tensor([0, 2, 5]), torch.tensor([0, 2, 5])
    gated = dataclasses.replace(call, g=-beta, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)
    assert gated.gated and gated.lengths_source is cu_cpu
    assert dataclasses.replace(gated, cu_seqlens_cpu=None).lengths_source is cu


@pytest.mark.parametrize("gated", [False, True])
def test_efla_attention_hands_the_backend_its_resolved_call(gated, monkeypatch):
    calls = []
    monkeypatch.setitem(BACKENDS, "recurrent", lambda call: calls.append(call) or (call.v, None))
    q, k, v, beta = _inputs()
    g = -beta if gated else None
    cu, cu_cpu = torch.tensor([0, 2, 5]), torch.tensor([0, 2, 5])
    efla_attention(q, k, v, beta, g=g, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu, mode="delta", backend="recurrent",
                   chunk_size=16)
    (call,) = calls
    assert call.scale == 4 ** -0.5 and isinstance(call.scale, float)
    assert call.gated is gated and (call.g is g) and call.mode == "delta" and call.chunk_size == 16
    assert call.cu_seqlens is cu and call.cu_seqlens_cpu is cu_cpu and not call.output_final_state
    assert all(a is b for a, b in zip((call.q, call.k, call.v, call.beta), (q, k, v, beta), strict=True))


def test_final_state_goes_through_the_same_registry(monkeypatch):
    q, k, v, beta = _inputs(B=2)
    expected = efla_attention(q, k, v, beta, output_final_state=True, backend="recurrent")[1]
    calls = []
    recurrent = BACKENDS["recurrent"]
    monkeypatch.setitem(BACKENDS, "recurrent", lambda call: calls.append(call) or recurrent(call))
    state = efla_final_state(k, v, beta, backend="recurrent")
    assert len(calls) == 1 and calls[0].output_final_state and calls[0].q is calls[0].k
    torch.testing.assert_close(state, expected)
