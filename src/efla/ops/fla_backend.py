"""``backend="fla"``: EFLA through fla's DeltaNet kernel (``chunk_delta_rule``) with alpha computed in PyTorch.

EFLA is the delta rule with beta replaced by alpha (``efla/ops/alpha.py``), so fla's kernel computes it once alpha is
passed as its beta. This costs an extra pass over k (for ||k||^2) and an alpha tensor in memory; it exists as an
independent oracle for the Triton kernels on GPU and as a baseline in ``benchmarks/kernels.py``. Needs fla-core
(``pip install 'efla[bench]'``); fla takes float16/bfloat16 only.
"""

from __future__ import annotations

import torch
from fla.ops.delta_rule import chunk_delta_rule

from efla.ops.alpha import step_sizes


def fla_efla(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size, lengths_from):
    """Same contract as ``triton_efla``; alpha goes to fla in q's dtype, as fla expects of beta. fla reads the
    lengths itself, so ``lengths_from`` is not used."""
    del lengths_from
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"backend='fla' takes float16 or bfloat16 inputs (got {q.dtype}); fla's chunk kernel "
                        "refuses float32: use backend='triton' or 'torch'")
    alpha = step_sizes(k, beta, mode).to(q.dtype)
    state = None if initial_state is None else initial_state.float()
    o, final_state = chunk_delta_rule(q, k, v, alpha, scale=scale, initial_state=state,
                                      output_final_state=output_final_state,
                                      cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
                                      chunk_size=chunk_size)
    return o.to(v.dtype), final_state
