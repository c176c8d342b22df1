"""``EFLAttention``: the EFLA token mixer (DeltaNet's layer with the exact step), for use inside a model.

    q, k, v = silu(conv_q(W_q x)), ...       short causal depthwise convolution over time, one per projection
    q = q / ||q||;  k = k / ||k|| only in mode "delta": in EFLA the key norm is the implicit gate (PAPER.md)
    beta = sigmoid(W_b x)                     one step duration per head and token
    g = -exp(A_log) softplus(W_a x + dt_bias) optional decay gate (use_decay_gate; Gated DeltaNet's form)
    o = efla_attention(q, k, v, beta[, g])    per head, state [K, V]
    y = W_o RMSNorm(o) [* silu(W_g x)]        per-head norm, optional output gate

A 0/1 padding mask is removed up front (``efla.layers.padding.unpad``: each row becomes one of the packed sequences
``cu_seqlens``) and put back at the end (``repad``), so padded tokens never enter the convolution or the recurrent state
and left- or right-padded batches give each sequence's own outputs. Packed training documents take the same path.

The cache is a transformers ``Cache`` whose layer ``layer_idx`` holds linear-attention states (``DynamicCache`` built
from a config whose ``layer_types`` says ``"linear_attention"``): it stores the convolution state [B, C, W - 1] and the
recurrent state [B, H, K, V] (float32), updated in place by each forward; the three convolutions' states are
concatenated along the channels (q, k, v).

The parameter names are fla DeltaNet's (``q_proj``, ``k_proj``, ``v_proj``, ``q_conv1d``, ``k_conv1d``, ``v_conv1d``,
``b_proj``, ``g_proj``, ``o_norm``, ``o_proj``; with the decay gate Gated DeltaNet's ``a_proj``, ``A_log``,
``dt_bias``), so LoRA recipes that target q/k/v/o work unchanged. State dicts saved
before the split (one fused ``qkv_proj`` and one ``conv`` over 3 * hidden_size channels) still load: a load hook splits
them.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from efla.layers.conv import ShortConvolution, short_conv_split, short_conv_state
from efla.layers.decode import can_step_in_place, decode_in_place
from efla.layers.norm import GatedRMSNorm, RMSNorm
from efla.layers.padding import repad, unpad
from efla.layers.projection import has_hooks, is_plain_linear, project
from efla.layers.recompute import recompute
from efla.modules.elementwise import l2_normalize, rms_norm_linear
from efla.ops import efla_attention
from efla.ops.checks import MODES

# the fused weights of state dicts saved before q, k and v were separated, and the names they split into (dim 0)
FUSED_WEIGHTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "conv": ("q_conv1d", "k_conv1d", "v_conv1d")}


class EFLAttention(nn.Module):
    """EFLA (mode="efla") or DeltaNet (mode="delta") attention over [B, T, hidden_size] inputs; with
    use_decay_gate, gated EFLA or Gated DeltaNet.

    Both modes have exactly the same parameters; they differ only in the key normalisation and the step size. The
    decay gate adds a_proj [num_heads, hidden_size] and, per head, A_log and dt_bias (both flagged
    ``_no_weight_decay``, as fla does, for trainers that exclude them from weight decay).
    ``backend`` and ``chunk_size`` are passed to ``efla_attention``. recompute=True keeps only the inputs of the
    element-wise work (convolution + SiLU + L2 norm, the beta sigmoid) for the backward and recomputes the rest there
    (``efla.layers.recompute``); the output norm always keeps only its inputs.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mode: str = "efla",
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_output_gate: bool = False,
        norm_eps: float = 1e-6,
        layer_idx: int | None = None,
        backend: str = "auto",
        chunk_size: int = 64,
        recompute: bool = False,
        use_decay_gate: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.mode, self.layer_idx, self.backend, self.chunk_size = mode, layer_idx, backend, chunk_size
        self.recompute = recompute
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.use_decay_gate = use_decay_gate
        if use_decay_gate:
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
            A_log, dt_bias = decay_gate_init(num_heads)
            self.A_log, self.dt_bias = nn.Parameter(A_log), nn.Parameter(dt_bias)
            self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self.q_conv1d = ShortConvolution(hidden_size, conv_size)
            self.k_conv1d = ShortConvolution(hidden_size, conv_size)
            self.v_conv1d = ShortConvolution(hidden_size, conv_size)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False) if use_output_gate else None
        self.o_norm = (GatedRMSNorm if use_output_gate else RMSNorm)(self.head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.register_load_state_dict_pre_hook(_split_fused_qkv)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, T, hidden_size]; attention_mask: [B, >= T] 0/1 (its last T columns cover these
        tokens; 0 = padding) or None; cache: a transformers Cache or None; cu_seqlens: [N + 1] cumulative lengths of
        documents packed along T (then B = 1, no mask, no cache), so no document sees another's tokens.
        Returns [B, T, hidden_size], zeros at padded positions."""
        T = hidden_states.shape[1]
        conv_state, recurrent_state = _cached_states(cache, self.layer_idx)
        if (attention_mask is None and cu_seqlens is None and cache is not None
                and can_step_in_place(self, hidden_states, cache.layers[self.layer_idx], conv_state, recurrent_state)):
            return decode_in_place(self, hidden_states, conv_state, recurrent_state)  # the states advance in place
        x, padding = hidden_states, None
        if cu_seqlens is not None:
            if attention_mask is not None or cache is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with attention_mask or a cache")
        elif attention_mask is not None:  # from here on, each row is one sequence of the packed tokens
            x, padding = unpad(hidden_states, attention_mask[:, -T:])
            cu_seqlens = padding.cu_seqlens

        q, k, v, conv_state = self._qkv(x, conv_state, cu_seqlens, keep_state=cache is not None)
        beta = recompute(_sigmoid32, self.b_proj(x), enabled=self.recompute)
        g = None
        if self.use_decay_gate:
            g = recompute(log_decay, self.a_proj(x), self.A_log, self.dt_bias, enabled=self.recompute)
        o, recurrent_state = efla_attention(
            q, k, v, beta, initial_state=recurrent_state, output_final_state=cache is not None,
            cu_seqlens=cu_seqlens, mode=self.mode, backend=self.backend, chunk_size=self.chunk_size, check_beta=False,
            g=g,
        )
        o = self.output(o, x)

        if cache is not None:
            if conv_state is not None:
                cache.update_conv_state(conv_state, self.layer_idx)
            cache.update_recurrent_state(recurrent_state, self.layer_idx)
        return o if padding is None else repad(o, padding)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y = W_o RMSNorm(o) [* silu(W_g x)] for attention outputs o [..., H, head_dim] of the inputs x. With a plain
        o_proj and an unhooked norm, one function (``rms_norm_linear``) that keeps o, not the normalised product."""
        gate = None if self.g_proj is None else self.g_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        norm = self.o_norm
        if is_plain_linear(self.o_proj) and not has_hooks(norm):
            return rms_norm_linear(o, norm.weight, norm.eps, self.o_proj.weight, gate)
        o = norm(o) if gate is None else norm(o, gate)
        return self.o_proj(o.flatten(-2))  # a wrapped o_proj (LoRA, hooks) runs as itself

    def _qkv(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        keep_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q, k, v [B, T, H, head_dim] = silu(conv(W x)) (silu(W x) without the convolution), q (and k in mode
        "delta") L2-normalised; and, with keep_state, the new convolution state: q's, k's and v's [B, hidden_size,
        W - 1] concatenated along the channels. The three projections are one matrix product whose output [B, T,
        3 hidden_size] the convolutions read as it is (``project``, ``short_conv_split``)."""
        projected = project(x, (self.q_proj, self.k_proj, self.v_proj))
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d) if self.use_short_conv else ()
        weights = (torch.cat([conv.weight for conv in convs]),) if convs else ()
        activate = partial(self._activate, state=conv_state, cu_seqlens=cu_seqlens)
        q, k, v = recompute(activate, projected, *weights, enabled=self.recompute)
        new_state = None
        if keep_state and convs:
            new_state = short_conv_state(projected, convs[0].kernel_size[0], conv_state, cu_seqlens)
        return q, k, v, new_state

    def _activate(
        self,
        projected: torch.Tensor,
        *weight: torch.Tensor,
        state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k, v projections side by side [B, T, 3 hidden_size] (and the three convolutions' weights stacked,
        if any) -> (q, k, v) [B, T, H, head_dim]: silu(conv(projected)) (silu alone without the convolution), q (and
        k in mode "delta") L2-normalised per head. Element-wise apart from the depthwise convolution: cheap to
        recompute."""
        if weight:
            ys = short_conv_split(projected, weight[0], 3, state, cu_seqlens)
        else:
            ys = F.silu(projected).chunk(3, dim=-1)
        q, k, v = (y.unflatten(-1, (self.num_heads, self.head_dim)) for y in ys)
        return l2_normalize(q), (l2_normalize(k) if self.mode == "delta" else k), v


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _sigmoid32(x: torch.Tensor) -> torch.Tensor:
    """sigmoid in float32 or better (a float64 layer keeps float64)."""
    return _at_least_float32(x).sigmoid()


def log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Gated DeltaNet's decay gate g = -exp(A_log) * softplus(a + dt_bias) (float32 or better, <= 0): a = W_a x
    [..., H] is a per-token rate, exp(A_log) and dt_bias per head."""
    return -_at_least_float32(A_log).exp() * F.softplus(_at_least_float32(a) + _at_least_float32(dt_bias))


def decay_gate_init(num_heads: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's initial (A_log, dt_bias), float32 [num_heads]: A uniform in [1, 16], and dt log-uniform in
    [1e-3, 1e-1] (floored at 1e-4) stored through the inverse of softplus, so that softplus(dt_bias) = dt."""
    A = torch.empty(num_heads, device=device).uniform_(1, 16)
    dt = torch.exp(torch.rand(num_heads, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt = dt.clamp(min=1e-4)
    return A.log(), dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt) = dt + log(1 - e^-dt)


def _split_fused_qkv(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
    """Load hook: state dicts saved before q, k and v were separated hold ``qkv_proj.weight`` [3 C, C] and
    ``conv.weight`` [3 C, 1, W] (q's channels first, then k's, then v's); split them into the separate names."""
    for fused, parts in FUSED_WEIGHTS.items():
        weight = state_dict.pop(f"{prefix}{fused}.weight", None)
        if weight is not None:
            for name, piece in zip(parts, weight.chunk(3, dim=0), strict=True):
                state_dict[f"{prefix}{name}.weight"] = piece


def _cached_states(cache: Any | None, layer_idx: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(conv state, recurrent state) of this layer from a transformers Cache; None before the first update.

    After ``cache.reset()`` they are zeros, which is the same as no past."""
    if cache is None:
        return None, None
    if layer_idx is None:
        raise ValueError("EFLAttention needs a layer_idx to use a cache")
    layer = cache.layers[layer_idx]
    if not hasattr(layer, "recurrent_states"):
        raise ValueError(f"cache layer {layer_idx} is a {type(layer).__name__}, not a linear-attention cache layer: "
                         "build the cache with DynamicCache(config=model.config)")
    return layer.conv_states[0], layer.recurrent_states[0]
