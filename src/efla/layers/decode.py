"""The one-token step of an ``EFLAttention`` layer over a state that it may advance in place (``EFLAStaticCache``).

    proj = x [W_q; W_k; W_v; W_b]^T                 one matrix product for the four projections (on CUDA)
    q, k, v, beta = conv_step(proj, conv window)    the window shifted in place
    o = recurrent_step(q, k, v, beta, state)        the recurrent state advanced in place
    y = W_o norm(o)                                  (the layer's ``output``)

On CUDA these are the Triton kernels of ``efla.modules.triton.decode_step``: a few kernels per layer instead of about
forty, and no copies of new states into the cache. Elsewhere the same step runs the layer's own PyTorch operations
(the same as its forward on one token), then writes the new states into the buffers.

The concatenated weights are built once and kept until a weight changes (tracked by the tensors' version counters),
so a captured CUDA graph reads stable buffers.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from efla.layers.conv import short_conv, short_conv_state
from efla.modules.elementwise import l2_normalize
from efla.ops import efla_attention

if TYPE_CHECKING:
    from efla.layers.attention import EFLAttention

_TRITON = importlib.util.find_spec("triton") is not None


def can_step_in_place(layer: EFLAttention, x: torch.Tensor, cache_layer: object, conv_state: torch.Tensor | None,
                      recurrent_state: torch.Tensor | None) -> bool:
    """Whether ``decode_in_place`` serves this call: one token per row, no gradient, a cache layer whose buffers may
    be written in place (``in_place``), holding both states of a layer with its short convolutions."""
    return (x.shape[1] == 1 and not torch.is_grad_enabled() and getattr(cache_layer, "in_place", False)
            and layer.use_short_conv and layer.q_conv1d.kernel_size[0] >= 2
            and conv_state is not None and recurrent_state is not None)


def on_kernels(layer: EFLAttention, x: torch.Tensor) -> bool:
    """Whether the step runs the Triton kernels (CUDA, and the layer's backend allows them)."""
    return x.is_cuda and _TRITON and layer.backend in ("auto", "triton")


def decode_in_place(layer: EFLAttention, x: torch.Tensor, conv_state: torch.Tensor,
                    recurrent_state: torch.Tensor) -> torch.Tensor:
    """The layer's output [B, 1, hidden] for x [B, 1, hidden]; conv_state [B, 3 hidden, W - 1] and recurrent_state
    [B, H, K, V] advance in place."""
    x1 = x[:, 0]
    g = None
    if layer.use_decay_gate:
        from efla.layers.attention import log_decay

        g = log_decay(layer.a_proj(x1), layer.A_log, layer.dt_bias)
    if on_kernels(layer, x):
        q, k, v, beta = _fused_inputs(layer, x1, conv_state)
        from efla.modules.triton.decode_step import recurrent_step

        scale, efla = layer.head_dim ** -0.5, layer.mode == "efla"
        o = recurrent_step(q, k, v, beta, recurrent_state, scale, efla, None if g is None else g.float())[:, None]
    else:
        o = _reference_step(layer, x, g, conv_state, recurrent_state)
    return layer.output(o, x)


def _fused_inputs(layer: EFLAttention, x1: torch.Tensor, conv_state: torch.Tensor):
    """q, k, v [B, H, D] and beta [B, H] float32 through one projection and the conv_step kernel."""
    from efla.modules.triton.decode_step import conv_step_in_place

    proj_weight, conv_weight = _stacked_weights(layer)
    act, beta = conv_step_in_place(F.linear(x1, proj_weight), conv_weight, conv_state, layer.num_heads,
                                   layer.mode == "delta")
    q, k, v = act.view(x1.shape[0], 3, layer.num_heads, layer.head_dim).unbind(1)
    return q, k, v, beta


def _stacked_weights(layer: EFLAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """([W_q; W_k; W_v; W_b] [3 C + H, C], the three convolutions' taps [3 C, W]), rebuilt when a weight changed."""
    linears = (layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight, layer.b_proj.weight)
    convs = (layer.q_conv1d.weight, layer.k_conv1d.weight, layer.v_conv1d.weight)
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in linears + convs)
    cached = getattr(layer, "_decode_weights", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.cat(linears), torch.cat(convs)[:, 0].contiguous())
        layer._decode_weights = cached
    return cached[1], cached[2]


def _reference_step(layer: EFLAttention, x: torch.Tensor, g: torch.Tensor | None, conv_state: torch.Tensor,
                    recurrent_state: torch.Tensor) -> torch.Tensor:
    """The layer's own operations on one token (as its forward), the new states written into the buffers."""
    windows = conv_state.chunk(3, dim=1)
    features = []
    for proj, conv, window, l2 in zip((layer.q_proj, layer.k_proj, layer.v_proj),
                                      (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d), windows,
                                      (True, layer.mode == "delta", False), strict=True):
        projected = proj(x)
        y = short_conv(projected, conv.weight, window).unflatten(-1, (layer.num_heads, layer.head_dim))
        features.append(l2_normalize(y) if l2 else y)
        window.copy_(short_conv_state(projected, conv.kernel_size[0], window))
    from efla.layers.attention import _sigmoid32

    o, state = efla_attention(*features, _sigmoid32(layer.b_proj(x)), initial_state=recurrent_state,
                              output_final_state=True, mode=layer.mode, backend=layer.backend,
                              chunk_size=layer.chunk_size, check_beta=False, g=None if g is None else g[:, None])
    recurrent_state.copy_(state)
    return o
