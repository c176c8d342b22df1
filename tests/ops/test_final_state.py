"""efla_final_state: the state alone equals efla_attention's final state, values and gradients, in every form."""

from __future__ import annotations

import pytest
import torch
from helpers import random_inputs

from efla import efla_attention, efla_final_state


def _inputs(B, T, n_states, seed):
    """random_inputs (H = 2, K = 8, V = 6, float64) with n_states initial states (one per packed sequence)."""
    q, k, v, beta, g, _ = random_inputs(B, T, 2, 8, 6, decay_scale=0.5, seed=seed)
    h0 = torch.randn(n_states, 2, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return q, k, v, beta, g, h0


@pytest.mark.parametrize("backend", ["torch", "recurrent"])
@pytest.mark.parametrize("mode", ["efla", "delta"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_state_and_gradients_equal_efla_attentions(backend, mode, gated, packed):
    B, T, n = (1, 23, 3) if packed else (2, 19, 2)
    q, k, v, beta, g, h0 = _inputs(B, T, n, seed=5)
    g = g if gated else None
    if mode == "delta":
        k = torch.nn.functional.normalize(k, dim=-1)
    cu = torch.tensor([0, 7, 7, 23]) if packed else None
    leaves = [x.requires_grad_() for x in (k, v, beta, h0) + ((g,) if gated else ())]
    common = dict(initial_state=h0, cu_seqlens=cu, mode=mode, backend=backend, chunk_size=4, g=g)
    state = efla_final_state(k, v, beta, **common)
    _, ref = efla_attention(q, k, v, beta, output_final_state=True, **common)
    torch.testing.assert_close(state, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((state * weights).sum(), leaves)
    refs = torch.autograd.grad((ref * weights).sum(), leaves)
    for a, b in zip(grads, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_no_tokens_and_bad_input_as_in_efla_attention():
    _, k, v, beta, _, h0 = _inputs(1, 0, 1, seed=1)
    assert torch.equal(efla_final_state(k, v, beta, initial_state=h0), h0)  # no tokens: the initial state
    _, k, v, beta, _, _ = _inputs(1, 9, 1, seed=2)
    with pytest.raises(ValueError, match="beta"):
        efla_final_state(k, v, -beta)
    with pytest.raises(ValueError, match="mode"):
        efla_final_state(k, v, beta, mode="euler")
