"""``EFLAttention``: the EFLA token mixer (DeltaNet's layer with the exact step), for use inside a model.

    q, k, v = silu(conv_q(W_q x)), ...       short causal depthwise convolution over time, one per projection
    q = q / ||q||;  k = k / ||k|| only in mode "delta": in EFLA the key norm is the implicit gate (Lei, Zhang and
                                              Poria 2025, "Error-Free Linear Attention")
    beta = sigmoid(W_b x)                     one step duration per head and token (``efla.layers.gates``)
    g = -exp(A_log) softplus(W_a x + dt_bias) optional decay gate (use_decay_gate; Gated DeltaNet's form)
    o = efla_attention(q, k, v, beta[, g])    per head, state [K, V]
    y = W_o RMSNorm(o) [* silu(W_g x)]        per-head norm, optional output gate

A 0/1 padding mask is removed up front (``efla.layers.padding.unpad``: each row's real tokens become one of the
packed sequences ``cu_seqlens``) and put back at the end (``repad``), so padded tokens never enter the convolution or
the recurrent state and left- or right-padded batches give each sequence's own outputs. Packed training documents take
the same path.

Decoding, as mamba's ``Mamba2`` does it: ``allocate_inference_cache`` returns the layer's decode state (the three
convolutions' windows side by side, [B, 3 hidden_size, W - 1], and the float32 recurrent state [B, H, K, V]) and
``step`` advances it in place by one token: on CUDA one projection and two Triton kernels
(``efla.modules.triton.decode_step``), elsewhere the layer's own PyTorch operations. The forward also takes a
transformers ``Cache`` whose layer ``layer_idx`` holds linear-attention states (``DynamicCache`` built from a config
whose ``layer_types`` says ``"linear_attention"``), updated through the cache's own methods.

Context parallelism: with ``cp_group`` set (``efla.models.context_parallel.apply_context_parallel`` sets it on every
layer of a model), the forward takes this rank's contiguous shard along T of sequences split over the group, and
cu_seqlens, when given, are the GLOBAL offsets of the documents packed along the concatenated shards (B = 1). The
short convolution gets the inputs before the shard from the earlier ranks (``efla.layers.context_parallel``) and the
operator runs as ``efla_attention_cp``; outputs are the rank's shard of the single-process outputs, and gradients
those of the sum of the ranks' losses.

The parameter names are fla DeltaNet's (``q_proj``, ``k_proj``, ``v_proj``, ``q_conv1d``, ``k_conv1d``, ``v_conv1d``,
``b_proj``, ``g_proj``, ``o_norm``, ``o_proj``; with the decay gate Gated DeltaNet's ``a_proj``, ``A_log``,
``dt_bias``), so LoRA recipes that target q/k/v/o work unchanged. State dicts saved
before the split (one fused ``qkv_proj`` and one ``conv`` over 3 * hidden_size channels) still load: a load hook splits
them.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from efla.layers.context_parallel import shard_layout, with_conv_halo
from efla.layers.conv import ShortConvolution, short_conv, short_conv_split, short_conv_state
from efla.layers.gates import decay_gate_init, log_decay, sigmoid32
from efla.layers.norm import GatedRMSNorm, RMSNorm
from efla.layers.padding import repad, unpad
from efla.layers.projection import has_hooks, is_plain_linear, project
from efla.modules.elementwise import l2_normalize, rms_norm_linear
from efla.modules.recompute import recompute
from efla.ops import efla_attention
from efla.ops.checks import MODES
from efla.ops.context_parallel import efla_attention_cp

_TRITON = importlib.util.find_spec("triton") is not None

# the fused weights of state dicts saved before q, k and v were separated, and the names they split into (dim 0)
FUSED_WEIGHTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "conv": ("q_conv1d", "k_conv1d", "v_conv1d")}


class EFLAttention(nn.Module):
    """EFLA (mode="efla") or DeltaNet (mode="delta") attention over [B, T, hidden_size] inputs; with
    use_decay_gate, gated EFLA or Gated DeltaNet.

    Both modes have exactly the same parameters; they differ only in the key normalisation and the step size. The
    decay gate adds a_proj [num_heads, hidden_size] and, per head, A_log and dt_bias (both flagged
    ``_no_weight_decay``, as fla does, for trainers that exclude them from weight decay).
    ``backend`` and ``chunk_size`` are passed to ``efla_attention``. recompute=True (the model's "selective"
    activation checkpointing) keeps only the inputs of the element-wise work (convolution + SiLU + L2 norm, the beta
    sigmoid, the decay gate) for the backward and recomputes the rest there (``efla.modules.recompute``); the output
    norm always keeps only its inputs. ``cp_group`` (a process group, default None) splits the forward's sequences
    along T over the group (the module docstring).
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
        self._decode_weights: tuple | None = None  # ``step``'s stacked weights and the versions they were built from
        self.cp_group: torch.distributed.ProcessGroup | None = None
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
        Returns [B, T, hidden_size], zeros at padded positions. With ``cp_group`` set: hidden_states is this rank's
        shard, cu_seqlens the global offsets, and there is no mask and no cache."""
        if self.cp_group is not None:
            if attention_mask is not None or cache is not None:
                raise ValueError("context parallelism (cp_group) takes no padding attention_mask and no cache: pass "
                                 "packed documents as the global cu_seqlens")
            return self._mix_shard(hidden_states, cu_seqlens)
        T = hidden_states.shape[1]
        conv_state, recurrent_state = _cached_states(cache, self.layer_idx)
        x, padding = hidden_states, None
        if cu_seqlens is not None:
            if attention_mask is not None or cache is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with attention_mask or a cache")
        elif attention_mask is not None:  # from here on, each row's real tokens are one of the packed sequences
            x, padding = unpad(hidden_states, attention_mask[:, -T:])
            cu_seqlens = padding.cu_seqlens
            conv_state, recurrent_state = padding.sequence_states(conv_state), padding.sequence_states(recurrent_state)

        o, conv_state, recurrent_state = self._mix(x, conv_state, recurrent_state, cu_seqlens,
                                                   keep_state=cache is not None)
        if cache is not None:
            if padding is not None:
                conv_state, recurrent_state = padding.row_states(conv_state), padding.row_states(recurrent_state)
            if conv_state is not None:
                cache.update_conv_state(conv_state, self.layer_idx)
            cache.update_recurrent_state(recurrent_state, self.layer_idx)
        return o if padding is None else repad(o, padding)

    def allocate_inference_cache(
        self,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The layer's decode state for ``batch_size`` rows, zeros (no past): the convolution window [B, 3
        hidden_size, W - 1] (q's, k's and v's channels side by side; ``dtype``, default the weights') or None without
        short convolutions, and the recurrent state [B, num_heads, head_dim, head_dim] in float32. ``step`` advances
        both in place."""
        weight = self.o_proj.weight
        dtype, device = dtype or weight.dtype, device if device is not None else weight.device
        conv_state = None
        if self.use_short_conv:
            window = self.q_conv1d.kernel_size[0] - 1
            conv_state = torch.zeros(batch_size, 3 * self.hidden_size, window, dtype=dtype, device=device)
        recurrent_state = torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, dtype=torch.float32,
                                      device=device)
        return conv_state, recurrent_state

    @torch.no_grad()
    def step(
        self,
        hidden_states: torch.Tensor,
        conv_state: torch.Tensor | None,
        recurrent_state: torch.Tensor,
    ) -> torch.Tensor:
        """One new token per row: hidden_states [B, 1, hidden_size] -> [B, 1, hidden_size], advancing the decode
        state (as ``allocate_inference_cache`` returns it, holding the rows' past) in place; no gradients.

            proj = x [W_q; W_k; W_v; W_b]^T                 one matrix product for the four projections (on CUDA)
            q, k, v, beta = conv_step(proj, conv window)    the window shifted in place
            o = recurrent_step(q, k, v, beta[, g], state)   the recurrent state advanced in place
            y = W_o norm(o) [* silu(W_g x)]                 (``output``)

        On CUDA these are the Triton kernels of ``efla.modules.triton.decode_step``: a few kernels per layer instead
        of about forty, and no copies of new states. Elsewhere the same step runs the layer's own PyTorch operations
        (its forward on one token), then writes the new states into the buffers. The concatenated weights are built
        once and kept until a weight changes (tracked by the tensors' version counters), so a captured CUDA graph
        reads stable buffers."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise ValueError(f"hidden_states must be [batch, 1, hidden_size], one token per row "
                             f"(got {tuple(hidden_states.shape)})")
        if not self.use_short_conv or self.q_conv1d.kernel_size[0] < 2:  # no window to shift: the forward's operations
            o, new_conv, new_recurrent = self._mix(hidden_states, conv_state, recurrent_state, None, keep_state=True)
            if new_conv is not None:
                conv_state.copy_(new_conv)
            recurrent_state.copy_(new_recurrent)
            return o
        x1 = hidden_states[:, 0]
        g = log_decay(self.a_proj(x1), self.A_log, self.dt_bias) if self.use_decay_gate else None
        if uses_decode_kernels(hidden_states, self.backend):
            from efla.modules.triton.decode_step import conv_step_in_place, recurrent_step

            proj_weight, conv_weight = self._stacked_decode_weights()
            act, beta = conv_step_in_place(F.linear(x1, proj_weight), conv_weight, conv_state, self.num_heads,
                                           self.mode == "delta")
            q, k, v = act.view(x1.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
            o = recurrent_step(q, k, v, beta, recurrent_state, self.head_dim ** -0.5, self.mode == "efla",
                               None if g is None else g.float())[:, None]
        else:
            o = self._step_reference(hidden_states, g, conv_state, recurrent_state)
        return self.output(o, hidden_states)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y = W_o RMSNorm(o) [* silu(W_g x)] for attention outputs o [..., H, head_dim] of the inputs x. With a plain
        o_proj and an unhooked norm, one function (``rms_norm_linear``) that keeps o, not the normalised product."""
        gate = None if self.g_proj is None else self.g_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        norm = self.o_norm
        if is_plain_linear(self.o_proj) and not has_hooks(norm):
            return rms_norm_linear(o, norm.weight, norm.eps, self.o_proj.weight, gate)
        o = norm(o) if gate is None else norm(o, gate)
        return self.o_proj(o.flatten(-2))  # a wrapped o_proj (LoRA, hooks) runs as itself

    def _mix(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None,
        recurrent_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        keep_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The layer's output for x [B, T, hidden_size] (unpadded) from the given states (None: no past) and, with
        keep_state, the new convolution and recurrent states."""
        q, k, v, conv_state = self._qkv(x, conv_state, cu_seqlens, keep_state)
        beta, g = self._gates(x)
        o, recurrent_state = efla_attention(
            q, k, v, beta, initial_state=recurrent_state, output_final_state=keep_state,
            cu_seqlens=cu_seqlens, mode=self.mode, backend=self.backend, chunk_size=self.chunk_size, check_beta=False,
            g=g,
        )
        return self.output(o, x), conv_state, recurrent_state

    def _mix_shard(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for this rank's shard x [B, T_r, hidden_size] of the sequences split over cp_group
        (cu_seqlens: the global offsets of packed documents, B = 1)."""
        if cu_seqlens is not None and x.shape[0] != 1:
            raise ValueError(f"packed documents (cu_seqlens) under context parallelism take one row (got {x.shape[0]})")
        layout_of, halo, attention = _context_parallel_steps()
        projected = project(x, (self.q_proj, self.k_proj, self.v_proj))
        past, conv_cu, weights = 0, None, ()
        if self.use_short_conv:
            past = self.q_conv1d.kernel_size[0] - 1
            layout = layout_of(x.shape[1], self.cp_group, x.device)
            offsets = None if cu_seqlens is None else cu_seqlens.tolist()
            projected, conv_cu = halo(projected, past, layout, self.cp_group, offsets)
            weights = (torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]),)
        activate = partial(self._activate, state=None, cu_seqlens=conv_cu)
        q, k, v = (y[:, past:] for y in recompute(activate, projected, *weights, enabled=self.recompute))
        beta, g = self._gates(x)
        o, _ = attention(q, k, v, beta, group=self.cp_group, g=g, cu_seqlens=cu_seqlens, mode=self.mode,
                         backend=self.backend, chunk_size=self.chunk_size, check_beta=False)
        return self.output(o, x)

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(beta [B, T, H] in float32, the log decay g [B, T, H] or None without the decay gate) of x."""
        beta = recompute(sigmoid32, self.b_proj(x), enabled=self.recompute)
        g = None
        if self.use_decay_gate:
            g = recompute(log_decay, self.a_proj(x), self.A_log, self.dt_bias, enabled=self.recompute)
        return beta, g

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

    def _stacked_decode_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([W_q; W_k; W_v; W_b] [3 C + H, C], the three convolutions' taps [3 C, W]) for ``step``'s kernels, rebuilt
        when a weight changed."""
        linears = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.b_proj.weight)
        convs = (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight)
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in linears + convs)
        if self._decode_weights is None or self._decode_weights[0] != key:
            with torch.no_grad():
                self._decode_weights = (key, torch.cat(linears), torch.cat(convs)[:, 0].contiguous())
        return self._decode_weights[1], self._decode_weights[2]

    def _step_reference(self, x: torch.Tensor, g: torch.Tensor | None, conv_state: torch.Tensor,
                        recurrent_state: torch.Tensor) -> torch.Tensor:
        """``step`` through the layer's own operations on one token (as its forward), the new states written into
        the buffers; returns the attention output [B, 1, H, head_dim] before the output norm."""
        windows = conv_state.chunk(3, dim=1)
        features = []
        for proj, conv, window, l2 in zip((self.q_proj, self.k_proj, self.v_proj),
                                          (self.q_conv1d, self.k_conv1d, self.v_conv1d), windows,
                                          (True, self.mode == "delta", False), strict=True):
            projected = proj(x)
            y = short_conv(projected, conv.weight, window).unflatten(-1, (self.num_heads, self.head_dim))
            features.append(l2_normalize(y) if l2 else y)
            window.copy_(short_conv_state(projected, conv.kernel_size[0], window))
        o, state = efla_attention(*features, sigmoid32(self.b_proj(x)), initial_state=recurrent_state,
                                  output_final_state=True, mode=self.mode, backend=self.backend,
                                  chunk_size=self.chunk_size, check_beta=False, g=None if g is None else g[:, None])
        recurrent_state.copy_(state)
        return o


def _context_parallel_steps() -> tuple[Any, Any, Any]:
    """(shard_layout, with_conv_halo, efla_attention_cp); while torch.compile traces, their twins behind graph breaks
    (``efla/layers/untraced.py``), so that each rank runs their collectives eagerly and in the same order."""
    if torch.compiler.is_compiling():
        from efla.layers.untraced import efla_attention_cp_untraced, shard_layout_untraced, with_conv_halo_untraced

        return shard_layout_untraced, with_conv_halo_untraced, efla_attention_cp_untraced
    return shard_layout, with_conv_halo, efla_attention_cp


def uses_decode_kernels(x: torch.Tensor, backend: str) -> bool:
    """Whether ``EFLAttention.step`` runs the Triton decode kernels for x: on CUDA, when the layer's backend allows
    them ("auto" or "triton")."""
    return x.is_cuda and _TRITON and backend in ("auto", "triton")


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
