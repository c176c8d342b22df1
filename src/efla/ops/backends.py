"""The operator's backends, one registry: each takes an ``AttentionCall`` and returns (o, final state or None).

    "recurrent"  the step-by-step reference (``recurrent.py``)
    "torch"      the chunkwise PyTorch form (``chunk.py``), any device
    "triton"     the fused GPU kernels (``triton/``), imported on first use
    "fla"        fla's DeltaNet / Gated DeltaNet kernels with the step sizes precomputed (``fla_backend.py``)

A new backend is one function of an ``AttentionCall`` added to ``BACKENDS`` (and its name to ``checks.BACKENDS``).
The two PyTorch backends share one wrapper: step sizes (gated or not), packed sequences and output dtypes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from efla.ops import varlen
from efla.ops.alpha import gated_step_sizes, step_sizes, unit_key_form
from efla.ops.call import AttentionCall
from efla.ops.chunk import chunk_fwd
from efla.ops.recurrent import recurrent_fwd

Result = tuple[torch.Tensor | None, torch.Tensor | None]
Backend = Callable[[AttentionCall], Result]


def chunkwise_final_state(call: AttentionCall) -> torch.Tensor:
    """The torch backend's final state alone (``efla_final_state``): only the state recursion runs, without the
    Q K^T and output products."""
    return _reference(functools.partial(chunk_fwd, chunk_size=call.chunk_size, need_output=False), call)[1]


def _recurrent(call: AttentionCall) -> Result:
    return _reference(recurrent_fwd, call)


def _chunkwise(call: AttentionCall) -> Result:
    return _reference(functools.partial(chunk_fwd, chunk_size=call.chunk_size), call)


def _triton(call: AttentionCall) -> Result:
    try:
        from efla.ops.triton.backend import triton_attention
    except ImportError as error:
        raise RuntimeError(f"backend='triton' needs the Triton kernels and a CUDA GPU ({error})") from error
    return triton_attention(call)


def _fla(call: AttentionCall) -> Result:
    try:
        from efla.ops.fla_backend import fla_attention
    except ImportError as error:
        raise RuntimeError(f"backend='fla' needs fla-core: pip install 'efla[bench]' ({error})") from error
    return fla_attention(call)


BACKENDS: dict[str, Backend] = {"recurrent": _recurrent, "torch": _chunkwise, "triton": _triton, "fla": _fla}


def _reference(forward: Callable[..., Result], call: AttentionCall) -> Result:
    """A PyTorch forward (``recurrent_fwd`` or ``chunk_fwd``: equal-length sequences, operands by keyword) run on the
    call: step sizes first, packed sequences one padded row each, outputs in v's dtype."""
    tokens = _operands(call, torch.promote_types(call.q.dtype, torch.float32))
    settings = {"scale": call.scale, "initial_state": call.initial_state}
    if call.cu_seqlens is None:
        o, state = forward(**tokens, **settings)
    elif not torch.compiler.is_compiling():
        o, state = varlen.run_packed(forward, call.lengths_source, tokens, **settings)
    else:  # torch._dynamo is loaded while compiling: importing the graph-broken form costs nothing then
        from efla.ops.untraced import run_packed_untraced

        o, state = run_packed_untraced(forward, call.lengths_source, tokens, **settings)
    if o is None:  # a state-only forward (``chunkwise_final_state``)
        return None, state
    return o.to(call.v.dtype), (state if call.output_final_state else None)


def _operands(call: AttentionCall, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """The recurrence's per-token operands: q, k, v, the erase step alpha (in ``dtype``, the compute dtype) and, gated,
    the log decay g and the write step eta (both None ungated, where eta = alpha)."""
    q, k, v = call.q, call.k, call.v
    if call.gated:
        alpha, eta = (x.to(dtype) for x in gated_step_sizes(k, call.beta, call.g, call.mode))
        return {"q": q, "k": k, "v": v, "alpha": alpha, "g": call.g.to(dtype), "eta": eta}
    if call.mode == "efla":  # unit keys, so that no product holds ||k||^2 (finite for any key norm and beta)
        k, v, alpha = unit_key_form(k, v, call.beta)
    else:
        alpha = step_sizes(k, call.beta, call.mode)
    return {"q": q, "k": k, "v": v, "alpha": alpha.to(dtype), "g": None, "eta": None}
