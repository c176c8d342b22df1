"""The PyTorch backends ("recurrent" and chunkwise "torch") against each other and against the recurrence's laws."""

import pytest
import torch
from helpers import random_inputs, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from efla import efla_attention

F64 = torch.float64


@given(B=st.integers(1, 3), T=st.integers(1, 150), H=st.integers(1, 3), K=st.sampled_from([1, 4, 16, 33]),
       V=st.sampled_from([1, 8, 20]), chunk=st.sampled_from([1, 8, 16, 64]), mode=st.sampled_from(["efla", "delta"]),
       with_state=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_chunkwise_equals_recurrent_in_float64(B, T, H, K, V, chunk, mode, with_state, seed):
    q, k, v, beta, _g, h0 = random_inputs(B, T, H, K, V, seed=seed, key_scale=0.5 if mode == "delta" else 1.0)
    h0 = h0 if with_state else None
    ref, ref_state = efla_attention(q, k, v, beta, initial_state=h0, output_final_state=True, mode=mode,
                                    backend="recurrent")
    out, state = efla_attention(q, k, v, beta, initial_state=h0, output_final_state=True, mode=mode,
                                backend="torch", chunk_size=chunk)
    assert out.dtype == F64 and state.dtype == F64
    assert rel_err(out, ref) <= 1e-10
    assert rel_err(state, ref_state) <= 1e-10


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_gradcheck_float64(backend, mode):
    q, k, v, beta, _g, h0 = random_inputs(1, 7, 2, 3, 2, requires_grad=True, key_scale=0.7)

    def fn(q, k, v, beta, h0):
        o, state = efla_attention(q, k, v, beta, initial_state=h0, output_final_state=True, mode=mode,
                                  backend=backend, chunk_size=4)
        return o, state

    assert torch.autograd.gradcheck(fn, (q, k, v, beta, h0), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
def test_varlen_equals_each_sequence_alone(backend):
    lengths = [5, 1, 37, 0, 20]
    T = sum(lengths)
    q, k, v, beta, _g, _ = random_inputs(1, T, 2, 8, 4)
    h0 = torch.randn(len(lengths), 2, 8, 4, dtype=F64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, states = efla_attention(q, k, v, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                 backend=backend, chunk_size=16)
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        if end == start:
            assert torch.equal(states[i], h0[i])
            continue
        alone, state = efla_attention(q[:, start:end], k[:, start:end], v[:, start:end], beta[:, start:end],
                                      initial_state=h0[i:i + 1], output_final_state=True, backend="recurrent")
        assert rel_err(out[:, start:end], alone) <= 1e-12
        assert rel_err(states[i:i + 1], state) <= 1e-12


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
def test_splitting_and_carrying_the_state_equals_one_pass(backend):
    q, k, v, beta, _g, h0 = random_inputs(2, 90, 2, 16, 8)
    whole, final = efla_attention(q, k, v, beta, initial_state=h0, output_final_state=True, backend=backend)
    first, mid = efla_attention(q[:, :33], k[:, :33], v[:, :33], beta[:, :33], initial_state=h0,
                                output_final_state=True, backend=backend)
    second, end = efla_attention(q[:, 33:], k[:, 33:], v[:, 33:], beta[:, 33:], initial_state=mid,
                                 output_final_state=True, backend=backend)
    assert rel_err(torch.cat([first, second], 1), whole) <= 1e-12
    assert rel_err(end, final) <= 1e-12


def test_small_keys_recover_the_delta_rule():
    q, k, v, beta, _g, h0 = random_inputs(2, 40, 2, 8, 8)
    errors = []
    for key_scale in (1e-1, 1e-2, 1e-3):
        kk = k * key_scale
        efla = efla_attention(q, kk, v, beta, initial_state=h0, output_final_state=True, backend="torch")[1]
        delta = efla_attention(q, kk, v, beta, initial_state=h0, output_final_state=True, mode="delta",
                               backend="torch")[1]
        errors.append(rel_err(efla - h0, delta - h0))
    # alpha - beta = O(beta^2 lambda): the gap shrinks with lambda, i.e. 100x per 10x smaller key
    assert errors[0] < 0.1 and errors[1] < errors[0] / 50 and errors[2] < errors[1] / 50


@pytest.mark.parametrize("case", ["zero_keys", "huge_keys", "zero_beta", "huge_beta"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_extreme_inputs_stay_finite_with_finite_gradients(case, dtype):
    q, k, v, beta, _g, h0 = random_inputs(1, 20, 2, 8, 4, dtype=dtype)
    if case == "zero_keys":
        k = torch.zeros_like(k)
    elif case == "huge_keys":
        k = k / k.norm(dim=-1, keepdim=True) * 1e3
    elif case == "zero_beta":
        beta = torch.zeros_like(beta)
    else:
        beta = torch.full_like(beta, 1e4)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, h0)]
    o, state = efla_attention(*leaves[:4], initial_state=h0, output_final_state=True, backend="torch", chunk_size=8)
    (o.square().sum() + state.square().sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    if case == "zero_keys" or case == "zero_beta":  # nothing is written: the state is the initial one
        assert torch.allclose(state, h0.to(state.dtype))
    if case in ("huge_keys", "huge_beta"):  # the exact step never amplifies the state beyond its inputs
        assert state.norm() < 10 * (h0.norm() + v.norm())


def test_dtypes_of_outputs_and_states():
    q, k, v, beta, _g, h0 = random_inputs(1, 10, 1, 4, 4, dtype=torch.bfloat16)
    o, state = efla_attention(q, k, v, beta, initial_state=h0.float(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    o, state = efla_attention(q.float(), k.float(), v.float(), beta.float())
    assert o.dtype == torch.float32 and state is None


def test_default_scale_is_inverse_sqrt_of_key_dim():
    q, k, v, beta, _g, _ = random_inputs(1, 12, 1, 16, 4)
    default = efla_attention(q, k, v, beta)[0]
    explicit = efla_attention(q, k, v, beta, scale=1.0)[0] * 16**-0.5
    assert rel_err(default, explicit) <= 1e-14


def test_document_index_compiles_to_the_eager_result(monkeypatch):
    """document_index is an opaque custom op under torch.compile (Inductor's CUDA searchsorted reads cu_seqlens[1:]
    off by one) and a plain call eagerly: both give each token its document, empty documents and a last partial one
    included."""
    from efla.ops import varlen

    entered = []
    op = varlen.document_index_op
    monkeypatch.setattr(varlen, "document_index_op", lambda *a: entered.append(1) or op(*a))
    torch._dynamo.reset()
    cu = torch.tensor([0, 3, 3, 10, 17], dtype=torch.int32)
    expected = torch.tensor([0] * 3 + [2] * 7 + [3] * 7)
    assert torch.equal(varlen.document_index(cu, 17), expected)
    assert entered == []
    compiled = torch.compile(lambda c: varlen.document_index(c, 17), backend="inductor", fullgraph=True)
    assert torch.equal(compiled(cu), expected)
    assert entered == [1]
