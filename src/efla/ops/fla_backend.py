"""``backend="fla"``: EFLA through fla's DeltaNet kernel (``chunk_delta_rule``) with alpha computed in PyTorch, and
gated EFLA through fla's Gated DeltaNet kernel (``chunk_gated_delta_rule``).

EFLA is the delta rule with beta replaced by alpha (``efla/ops/alpha.py``), so fla's kernel computes it once alpha is
passed as its beta. This costs an extra pass over k (for ||k||^2) and an alpha tensor in memory; it exists as an
independent oracle for the Triton kernels on GPU and as a baseline in ``benchmarks/kernels_vs_fla.py``. Needs fla-core
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
from efla.ops.call import AttentionCall


def fla_attention(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the call on fla's kernels: (o in v's dtype, final state or None). The step sizes go to fla in q's dtype, as
    fla expects of beta; fla reads the sequence lengths itself."""
    if call.q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"backend='fla' takes float16 or bfloat16 inputs (got {call.q.dtype}); fla's chunk kernel "
                        "refuses float32: use backend='triton' or 'torch'")
    state = None if call.initial_state is None else call.initial_state.float()
    cu_seqlens = None if call.cu_seqlens is None else call.cu_seqlens.long()
    o, final_state = (_gated_delta_rule if call.gated else _delta_rule)(call, state, cu_seqlens)
    return o.to(call.v.dtype), final_state


def _delta_rule(call: AttentionCall, state: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
    """EFLA (or DeltaNet, mode="delta") through ``chunk_delta_rule`` with alpha as its beta."""
    alpha = step_sizes(call.k, call.beta, call.mode).to(call.q.dtype)
    return chunk_delta_rule(call.q, call.k, call.v, alpha, scale=call.scale, initial_state=state,
                            output_final_state=call.output_final_state, cu_seqlens=cu_seqlens,
                            chunk_size=call.chunk_size)


def _gated_delta_rule(call: AttentionCall, state: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
    """Gated EFLA (or Gated DeltaNet, mode="delta") through ``chunk_gated_delta_rule``; fla's chunk size is its own."""
    alpha, eta = gated_step_sizes(call.k, call.beta, call.g, call.mode)
    value_scale = torch.where(alpha > 0, eta / alpha.clamp(min=torch.finfo(alpha.dtype).tiny), 1.0)
    scaled_v = (call.v * value_scale[..., None]).to(call.v.dtype)
    return chunk_gated_delta_rule(call.q, call.k, scaled_v, call.g.float(), alpha.to(call.q.dtype), scale=call.scale,
                                  initial_state=state, output_final_state=call.output_final_state,
                                  cu_seqlens=cu_seqlens)
