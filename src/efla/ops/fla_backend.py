"""``backend="fla"``: EFLA through fla's DeltaNet kernel (``chunk_delta_rule``) with alpha computed in PyTorch, and
gated EFLA through fla's Gated DeltaNet kernel (``chunk_gated_delta_rule``).

EFLA is the delta rule with beta replaced by alpha (``efla/ops/alpha.py``), so fla's kernel computes it once alpha is
passed as its beta. This costs an extra pass over k (for ||k||^2) and an alpha tensor in memory; it exists as an
independent oracle for the Triton kernels on GPU and as a baseline in ``benchmarks/kernels.py``. Needs fla-core
(``pip install 'efla[bench]'``); fla takes float16/bfloat16 only.

Gated EFLA, S_t = gamma_t (I - alpha_t k_t k_t^T) S_{t-1} + eta_t k_t v_t^T, is Gated DeltaNet's update with beta ->
alpha and v -> (eta / alpha) v. The ratio lies in (0, 1] (eta <= alpha); where alpha = 0 nothing is written, so any
finite ratio does. Not tested on CPU (fla-core's kernels need CUDA).
"""

from __future__ import annotations

import torch
from fla.ops.delta_rule import chunk_delta_rule
from fla.ops.gated_delta_rule import chunk_gated_delta_rule

from efla.ops.alpha import gated_step_sizes, step_sizes


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"backend='fla' takes float16 or bfloat16 inputs (got {q.dtype}); fla's chunk kernel "
                        "refuses float32: use backend='triton' or 'torch'")


def fla_efla(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size, lengths_from):
    """Same contract as ``triton_efla``; alpha goes to fla in q's dtype, as fla expects of beta. fla reads the
    sequence lengths itself (``lengths_from`` unused)."""
    del lengths_from
    _check_dtype(q)
    alpha = step_sizes(k, beta, mode).to(q.dtype)
    state = None if initial_state is None else initial_state.float()
    o, final_state = chunk_delta_rule(q, k, v, alpha, scale=scale, initial_state=state,
                                      output_final_state=output_final_state,
                                      cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
                                      chunk_size=chunk_size)
    return o.to(v.dtype), final_state


def fla_gated_efla(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size,
                   lengths_from):
    """Gated EFLA (or Gated DeltaNet, mode="delta") through ``chunk_gated_delta_rule``; fla's chunk size is its own."""
    del chunk_size, lengths_from
    _check_dtype(q)
    alpha, eta = gated_step_sizes(k, beta, g, mode)
    value_scale = torch.where(alpha > 0, eta / alpha.clamp(min=torch.finfo(alpha.dtype).tiny), 1.0)
    state = None if initial_state is None else initial_state.float()
    scaled_v = (v * value_scale[..., None]).to(v.dtype)
    o, final_state = chunk_gated_delta_rule(q, k, scaled_v, g.float(), alpha.to(q.dtype), scale=scale,
                                            initial_state=state, output_final_state=output_final_state,
                                            cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())
    return o.to(v.dtype), final_state
