"""Gated EFLA and Gated DeltaNet (``efla_attention(..., g=...)``) in the PyTorch backends, against float64 oracles."""

import pytest
import torch
from helpers import random_inputs, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from efla import efla_attention

F64 = torch.float64


def matrix_exponential_reference(q, k, v, beta, g, h0, scale):
    """Each token's gated ODE dS/dt = -(c I + k k^T) S + k v^T (c = -g / beta) solved over beta by exp of the augmented
    generator beta [[-(c I + k k^T), k], [0, 0]] = [[g I - beta k k^T, beta k], [0, 0]], in float64; no phi anywhere."""
    B, T, H, K = k.shape
    eye = torch.eye(K, dtype=F64)
    state, outputs = h0.double(), []
    for t in range(T):
        k_t, b_t, g_t = k[:, t].double(), beta[:, t].double()[..., None, None], g[:, t].double()[..., None, None]
        generator = torch.zeros(B, H, K + 1, K + 1, dtype=F64)
        generator[..., :K, :K] = g_t * eye - b_t * k_t[..., :, None] * k_t[..., None, :]
        generator[..., :K, K] = b_t[..., 0] * k_t
        flat = generator.reshape(-1, K + 1, K + 1)
        # two or more matrices: torch's CPU matrix_exp picks a low Taylor degree for a lone one (see efla.dynamics)
        propagator = torch.linalg.matrix_exp(torch.cat([flat, torch.zeros_like(flat)]))[:len(flat)]
        propagator = propagator.reshape(B, H, K + 1, K + 1)
        state = propagator[..., :K, :K] @ state + propagator[..., :K, K, None] * v[:, t].double()[..., None, :]
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t].double()))
    return torch.stack(outputs, 1), state


@given(B=st.integers(1, 2), T=st.integers(1, 90), H=st.integers(1, 2), K=st.sampled_from([1, 4, 16]),
       V=st.sampled_from([1, 8]), chunk=st.sampled_from([1, 8, 16, 64]), mode=st.sampled_from(["efla", "delta"]),
       with_state=st.booleans(), decay=st.sampled_from([1e-3, 1.0, 20.0]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_gated_chunkwise_equals_recurrent_in_float64(B, T, H, K, V, chunk, mode, with_state, decay, seed):
    q, k, v, beta, g, h0 = random_inputs(B, T, H, K, V, seed=seed, key_scale=0.5 if mode == "delta" else 1.0,
                                         decay_scale=decay)
    h0 = h0 if with_state else None
    kwargs = dict(g=g, initial_state=h0, output_final_state=True, mode=mode)
    ref, ref_state = efla_attention(q, k, v, beta, backend="recurrent", **kwargs)
    out, state = efla_attention(q, k, v, beta, backend="torch", chunk_size=chunk, **kwargs)
    assert out.dtype == F64 and state.dtype == F64
    assert rel_err(out, ref) <= 1e-10
    assert rel_err(state, ref_state) <= 1e-10


# (key scale, beta scale, decay scale): ordinary, lam -> 0, g -> 0, g very negative, beta * lam ~ 1e3
EXTREMES = {"ordinary": (1.0, 1.0, 2.0), "tiny_keys": (1e-6, 1.0, 2.0), "tiny_decay": (1.0, 1.0, 1e-12),
            "huge_decay": (1.0, 1.0, 80.0), "stiff": (12.0, 3.0, 0.5), "stiff_and_decaying": (12.0, 3.0, 30.0)}


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
@pytest.mark.parametrize("case", list(EXTREMES))
def test_gated_efla_is_the_matrix_exponential_solution(backend, case):
    key_scale, beta_scale, decay_scale = EXTREMES[case]
    q, k, v, beta, g, h0 = random_inputs(2, 21, 2, 5, 3, key_scale=key_scale / 5**0.5, decay_scale=decay_scale)
    beta = beta * beta_scale
    o, state = efla_attention(q, k, v, beta, g=g, initial_state=h0, output_final_state=True, backend=backend,
                              chunk_size=8)
    ref_o, ref_state = matrix_exponential_reference(q, k, v, beta, g, h0, 5**-0.5)
    # the oracle's scaling and squaring loses ~1e-16 per doubling of its norm, ~beta * lam at stiff steps
    tolerance = 1e-13 * max(1.0, (beta * k.square().sum(-1)).max().item())
    assert rel_err(o, ref_o) < tolerance and rel_err(state, ref_state) < tolerance


def test_gated_delta_mode_is_gated_deltanet():
    q, k, v, beta, g, h0 = random_inputs(2, 12, 2, 4, 3, key_scale=0.5)
    state, outputs = h0, []
    eye = torch.eye(4, dtype=F64)
    for t in range(12):
        k_t, b_t = k[:, t], beta[:, t, :, None, None]
        erase = eye - b_t * k_t[..., :, None] * k_t[..., None, :]
        state = g[:, t, :, None, None].exp() * erase @ state + b_t * k_t[..., :, None] * v[:, t, :, None, :]
        outputs.append(0.5 * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    for backend in ("recurrent", "torch"):
        o, final = efla_attention(q, k, v, beta, g=g, initial_state=h0, output_final_state=True, mode="delta",
                                  backend=backend, chunk_size=4)
        assert rel_err(o, torch.stack(outputs, 1)) < 1e-13 and rel_err(final, state) < 1e-13


@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_zero_decay_equals_ungated(mode):
    q, k, v, beta, _, h0 = random_inputs(2, 30, 2, 8, 4, seed=99)
    if mode == "delta":  # the Euler step's stable regime (unit keys, beta < 2); raw keys make the state explode
        k = torch.nn.functional.normalize(k, dim=-1)
    zero = torch.zeros_like(beta)
    for backend in ("recurrent", "torch"):
        ungated, s1 = efla_attention(q, k, v, beta, initial_state=h0, output_final_state=True, mode=mode,
                                     backend=backend, chunk_size=8)
        gated, s2 = efla_attention(q, k, v, beta, g=zero, initial_state=h0, output_final_state=True, mode=mode,
                                   backend=backend, chunk_size=8)
        assert rel_err(gated, ungated) < 1e-14 and rel_err(s2, s1) < 1e-14


def test_decay_does_what_a_decay_does():
    """With nothing written (beta = 0) the state only decays: S_T = exp(sum g) S_0, whatever the keys."""
    q, k, v, beta, g, h0 = random_inputs(1, 40, 2, 6, 3)
    for backend in ("recurrent", "torch"):
        _, state = efla_attention(q, k, v, torch.zeros_like(beta), g=g, initial_state=h0, output_final_state=True,
                                  backend=backend, chunk_size=16)
        assert rel_err(state, g.sum(1).exp()[..., None, None] * h0) < 1e-13


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_gated_gradcheck_float64(backend, mode):
    q, k, v, beta, g, h0 = random_inputs(1, 7, 2, 3, 2, key_scale=0.7)
    beta, g = beta + 0.1, g - 0.1  # finite differences must stay inside beta >= 0, g <= 0
    inputs = tuple(x.requires_grad_() for x in (q, k, v, beta, g, h0))

    def fn(q, k, v, beta, g, h0):
        return efla_attention(q, k, v, beta, g=g, initial_state=h0, output_final_state=True, mode=mode,
                              backend=backend, chunk_size=4)

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
def test_gated_varlen_equals_each_sequence_alone(backend):
    lengths = [5, 1, 37, 0, 20]
    q, k, v, beta, g, _ = random_inputs(1, sum(lengths), 2, 8, 4)
    h0 = torch.randn(len(lengths), 2, 8, 4, dtype=F64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, states = efla_attention(q, k, v, beta, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                 backend=backend, chunk_size=16)
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        if end == start:
            assert torch.equal(states[i], h0[i])
            continue
        piece = (x[:, start:end] for x in (q, k, v, beta))
        alone, state = efla_attention(*piece, g=g[:, start:end], initial_state=h0[i:i + 1], output_final_state=True,
                                      backend="recurrent")
        assert rel_err(out[:, start:end], alone) <= 1e-12
        assert rel_err(states[i:i + 1], state) <= 1e-12


def test_float32_chunkwise_is_accurate_against_float64():
    q, k, v, beta, g, h0 = random_inputs(1, 300, 2, 16, 16, key_scale=0.25, decay_scale=0.5)
    ref, ref_state = efla_attention(q, k, v, beta, g=g, initial_state=h0, output_final_state=True, backend="torch")
    inputs = (x.float() for x in (q, k, v, beta))
    out, state = efla_attention(*inputs, g=g.float(), initial_state=h0.float(), output_final_state=True,
                                backend="torch")
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5 and rel_err(state, ref_state) < 1e-5


def test_float32_chunkwise_stays_at_round_off_under_strong_decay():
    """The chunk's decays are summed token by token, not taken as differences of running sums: with about -3 per
    token a chunk's total reaches ~ -200 and differences of float32 running sums measured 6e-7 to 2e-6 here."""
    q, k, v, beta, g, h0 = random_inputs(1, 128, 2, 16, 16, key_scale=0.25, decay_scale=6.0)
    ref = efla_attention(q, k, v, beta, g=g, initial_state=h0, backend="recurrent")[0]
    out = efla_attention(*(x.float() for x in (q, k, v, beta)), g=g.float(), initial_state=h0.float(),
                         backend="torch")[0]
    assert rel_err(out, ref) < 4e-7


@pytest.mark.parametrize("case", ["zero_keys", "huge_keys", "zero_beta", "huge_beta", "huge_decay", "zero_decay"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gated_extreme_inputs_stay_finite_with_finite_gradients(case, dtype):
    q, k, v, beta, g, h0 = random_inputs(1, 20, 2, 8, 4, dtype=dtype)
    if case == "zero_keys":
        k = torch.zeros_like(k)
    elif case == "huge_keys":
        k = k / k.norm(dim=-1, keepdim=True) * 1e3
    elif case == "zero_beta":
        beta = torch.zeros_like(beta)
    elif case == "huge_beta":
        beta = torch.full_like(beta, 1e4)
    elif case == "huge_decay":
        g = torch.full_like(g, -1e4)
    else:
        g = torch.zeros_like(g)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, g, h0)]
    o, state = efla_attention(*leaves[:4], g=g, initial_state=h0, output_final_state=True, backend="torch",
                              chunk_size=8)
    (o.square().sum() + state.square().sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    # the exact step never amplifies the state beyond its inputs, with or without decay
    assert state.norm() < 10 * (h0.norm() + v.norm())


def test_bad_decay_is_refused_with_a_clear_error():
    q, k, v, beta, g, _ = random_inputs(1, 6, 2, 4, 4)
    with pytest.raises(ValueError, match=r"g must be \[B, T, H\]"):
        efla_attention(q, k, v, beta, g=g[:, :5])
    with pytest.raises(TypeError, match="g must be a floating-point tensor"):
        efla_attention(q, k, v, beta, g=g.long())
    with pytest.raises(ValueError, match="g is a log decay and must be <= 0"):
        efla_attention(q, k, v, beta, g=-g)
    g_nan = g.clone()
    g_nan[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="g contains NaN"):
        efla_attention(q, k, v, beta, g=g_nan)
    efla_attention(q, k, v, beta, g=-g, check_beta=False)  # the caller vouches for g: no value check, no sync
