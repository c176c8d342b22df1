"""The Triton pipelines as ``torch.library`` custom ops, so ``torch.compile`` traces models around them, and as
``EagerChunk`` (an autograd.Function over the same functions) for eager calls, which skip the ops' dispatch.

Each op is a chain of named stages, each launched by the function beside its kernel:

    forward   wy_fwd (W, U0, T; gated: the chunk sums of g) -> state_fwd (h, u, final state) -> output (o); at
              K <= 64 on a full GPU, state_fwd_with_output (o, final state) in place of the last two
    backward  wy_fwd (loading T) -> state_fwd -> state_bwd (dh, du, dh0) -> grad_qk (dq, dk and dg parts) -> grad_wy
              (dk, dv, dbeta, dg)
    decode    fused_recurrent (o, final state)

Everything that reads values on the host (the sequence lengths behind cu_seqlens) happens inside the ops, which the
compiler does not look into; their fake implementations give output shapes from input shapes alone. Optional outputs
come back as empty tensors (custom ops return tensors only). Tensors are packed along T: q, k [TT, H, K], v [TT, H, V],
beta [TT, H]; ``batch`` equal-length sequences when cu_seqlens is None. Gated ops get g ([TT, H] float32 log decay;
the kernels form alpha and the write step from beta, ||k||^2 and g); without g they run the ungated kernels.
"""

import torch

from efla.ops.triton.chunk_bwd import grad_qk, grad_wy, state_bwd
from efla.ops.triton.chunk_fwd import output, state_fwd, state_fwd_with_output
from efla.ops.triton.fused_recurrent import fused_recurrent
from efla.ops.triton.launch import output_in_state_pass
from efla.ops.triton.plan import Chunks, dense_plan, packed_plan
from efla.ops.triton.tiles import CHUNK
from efla.ops.triton.wy import wy_fwd


def chunk_map(k: torch.Tensor, cu_seqlens: torch.Tensor | None, cu_seqlens_cpu: torch.Tensor | None,
               batch: int) -> tuple[Chunks, torch.Tensor]:
    """The chunk map and int32 cu_seqlens of the packed tokens in k."""
    if cu_seqlens is None:
        return dense_plan(batch, k.shape[0] // batch, k.device)
    plan = packed_plan(cu_seqlens, k.shape[0], cu_seqlens_cpu)
    return plan.chunks(), plan.cu


def _or_empty(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if x is None else x


def _sequences(batch: int, cu_seqlens: torch.Tensor | None) -> int:
    return batch if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _chunk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, h0: torch.Tensor | None,
                   cu_seqlens: torch.Tensor | None, cu_seqlens_cpu: torch.Tensor | None, batch: int, scale: float,
                   efla: bool, output_final_state: bool, store_t: bool, prec: str, g: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, final states [N, H, K, V] float32 or empty, T [TT, H, 64] or empty); T is kept for the backward."""
    with torch.cuda.device_of(q):  # kernels launch on the current device
        chunks, cu = chunk_map(k, cu_seqlens, cu_seqlens_cpu, batch)
        w, u0, t, sums = wy_fwd(k=k, v=v, beta=beta, g=g, chunks=chunks, cu=cu, efla=efla, prec=prec,
                                store_t=store_t)
        common = {"k": k, "w": w, "u0": u0, "h0": h0, "sums": sums, "chunks": chunks, "cu": cu,
                  "store_ht": output_final_state, "prec": prec}
        if output_in_state_pass(k.shape[-1], v.shape[-1], k.element_size(), (cu.numel() - 1) * k.shape[1]):
            o, ht = state_fwd_with_output(q=q, g=g, scale=scale, **common)
        else:
            h, u, ht = state_fwd(**common)
            o = output(q=q, k=k, u=u, h=h, g=g, chunks=chunks, cu=cu, scale=scale, prec=prec)
    return o, _or_empty(ht, q), _or_empty(t, k)


chunk_forward = torch.library.custom_op("efla::chunk_forward", _chunk_forward, mutates_args=())


@chunk_forward.register_fake
def _chunk_forward_fake(q, k, v, beta, h0, cu_seqlens, cu_seqlens_cpu, batch, scale, efla, output_final_state,
                        store_t, prec, g=None):
    TT, H, K = k.shape
    ht = (q.new_empty(_sequences(batch, cu_seqlens), H, K, v.shape[-1], dtype=torch.float32) if output_final_state
          else q.new_empty(0))
    return torch.empty_like(v), ht, (k.new_empty(TT, H, CHUNK) if store_t else k.new_empty(0))


def _chunk_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, h0: torch.Tensor | None,
                    cu_seqlens: torch.Tensor | None, cu_seqlens_cpu: torch.Tensor | None, batch: int, scale: float,
                    efla: bool, t: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None, prec: str,
                    g: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbeta, dh0 float32 or empty, dg or empty): recompute W, h, u (from the forward's T when
    given), then the reverse state pass and the per-chunk gradients (derivation in ``chunk_bwd.py``)."""
    with torch.cuda.device_of(q):
        chunks, cu = chunk_map(k, cu_seqlens, cu_seqlens_cpu, batch)
        common = {"chunks": chunks, "cu": cu, "prec": prec}
        w, u0, t, sums = wy_fwd(k=k, v=v, beta=beta, efla=efla, t=t, g=g, **common)
        h, u, _ = state_fwd(k=k, w=w, u0=u0, h0=h0, store_ht=False, sums=sums, **common)
        dh, du, dh0 = state_bwd(q=q, k=k, w=w, do=do, dht=dht, h=h, has_h0=h0 is not None, scale=scale, g=g,
                                sums=sums, **common)
        dq, dk_part, dg_part = grad_qk(q=q, k=k, u=u, do=do, h=h, dh=dh, scale=scale, g=g, **common)
        dk, dv, dbeta, dg = grad_wy(k=k, v=v, beta=beta, t=t, du=du, h=h, dk_part=dk_part, dg_part=dg_part,
                                    efla=efla, g=g, **common)
    return dq, dk, dv, dbeta, _or_empty(dh0, q), _or_empty(dg, q)


chunk_backward = torch.library.custom_op("efla::chunk_backward", _chunk_backward, mutates_args=())


@chunk_backward.register_fake
def _chunk_backward_fake(q, k, v, beta, h0, cu_seqlens, cu_seqlens_cpu, batch, scale, efla, t, do, dht, prec, g=None):
    dh0 = q.new_empty(0) if h0 is None else q.new_empty(h0.shape, dtype=torch.float32)
    dg = q.new_empty(0) if g is None else torch.empty_like(g)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta), dh0, dg


_FORWARD_ARGS = ("q", "k", "v", "beta", "h0", "cu_seqlens", "cu_seqlens_cpu", "batch", "scale", "efla",
                 "output_final_state", "store_t", "prec", "g")


def _setup_context(ctx, inputs, output):
    # outputs that get no gradient (T, always; the final state, mostly) pass None to the backward instead of
    # zeros autograd would allocate and fill: a [tokens, heads, 64] tensor per layer and step for T
    ctx.set_materialize_grads(False)
    args = dict(zip(_FORWARD_ARGS, inputs, strict=True))
    ctx.save_for_backward(args["q"], args["k"], args["v"], args["beta"], args["h0"], args["cu_seqlens"],
                          args["cu_seqlens_cpu"], output[2] if args["store_t"] else None, args["g"])
    ctx.batch, ctx.scale, ctx.efla, ctx.prec = args["batch"], args["scale"], args["efla"], args["prec"]
    ctx.output_final_state = args["output_final_state"]


def _gradients(ctx, do, dht, backward) -> tuple:
    """The forward inputs' gradients (None for the settings) from ``backward``: the custom op or its function."""
    q, k, v, beta, h0, cu_seqlens, cu_seqlens_cpu, t, g = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dht = dht.contiguous() if ctx.output_final_state and dht is not None else None
    dq, dk, dv, dbeta, dh0, dg = backward(q, k, v, beta, h0, cu_seqlens, cu_seqlens_cpu, ctx.batch, ctx.scale,
                                          ctx.efla, t, do, dht, ctx.prec, g)
    dh0 = None if h0 is None else dh0.to(h0.dtype)
    return (dq, dk, dv, dbeta, dh0) + (None,) * (len(_FORWARD_ARGS) - 6) + (None if g is None else dg,)


def _backward(ctx, do, dht, _dt):
    return _gradients(ctx, do, dht, chunk_backward)


chunk_forward.register_autograd(_backward, setup_context=_setup_context)


class EagerChunk(torch.autograd.Function):
    """``chunk_forward`` with its gradient, called outside torch.compile: the same functions without the custom ops'
    dispatch, whose host time (about as much as the rest of the call; BENCHMARKS.md, host time per operator call)
    comes before the first kernel launch, where the GPU waits for it. ``EagerChunk.apply`` takes chunk_forward's
    arguments in order."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _chunk_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, do, dht, _dt):
        return _gradients(ctx, do, dht, _chunk_backward)


def fused_recurrent_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                          h0: torch.Tensor | None, cu_seqlens: torch.Tensor | None, batch: int, scale: float,
                          efla: bool, output_final_state: bool, g: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, final states [N, H, K, V] float32 or empty), one token at a time; inference only. Called directly outside
    torch.compile (as ``EagerChunk`` is), through the custom op ``fused_recurrent_forward`` inside it."""
    with torch.cuda.device_of(q):
        cu = dense_plan(batch, k.shape[0] // batch, k.device)[1] if cu_seqlens is None else cu_seqlens.to(torch.int32)
        o, ht = fused_recurrent(q=q, k=k, v=v, beta=beta, g=g, h0=h0, cu=cu, scale=scale, efla=efla,
                                output_final_state=output_final_state)
    return o, _or_empty(ht, q)


fused_recurrent_forward = torch.library.custom_op("efla::fused_recurrent", fused_recurrent_eager, mutates_args=())


@fused_recurrent_forward.register_fake
def _fused_recurrent_fake(q, k, v, beta, h0, cu_seqlens, batch, scale, efla, output_final_state, g=None):
    H, K = k.shape[1:]
    ht = (q.new_empty(_sequences(batch, cu_seqlens), H, K, v.shape[-1], dtype=torch.float32) if output_final_state
          else q.new_empty(0))
    return torch.empty_like(v), ht
