"""``EFLAConfig``: the configuration of an EFLA language model (fla's DeltaNet architecture with the exact step)."""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

from efla.ops.checks import MODES


class EFLAConfig(PretrainedConfig):
    """Configuration of ``EFLAModel`` / ``EFLAForCausalLM``.

    Args:
        vocab_size, hidden_size, num_hidden_layers: the usual.
        num_heads: heads of every token mixer; head dim = hidden_size / num_heads (keys and values alike).
        intermediate_size: SwiGLU width; default 8/3 * hidden_size rounded up to a multiple of 256 (as fla).
        attn_mode: "efla" (exact step, unnormalised keys) or "delta" (DeltaNet baseline, L2-normalised keys); the
            parameters are the same.
        use_short_conv, conv_size: short causal depthwise convolution on q, k, v.
        use_output_gate: gate the normalised attention output with silu(W_g x) (fla's use_gate).
        use_decay_gate: a per-token, per-head decay gate g = -exp(A_log) softplus(W_a x + dt_bias) as in Gated
            DeltaNet: attn_mode "delta" is then Gated DeltaNet and "efla" gated EFLA (the same parameters).
        attn_layers: indices of layers that use softmax attention (SDPA) instead of EFLA (hybrid models).
        rms_norm_eps, initializer_range, tie_word_embeddings, use_cache, pad/bos/eos_token_id: the usual.
        max_position_embeddings: training context length, read by evaluation tools; the model itself has no
            position embeddings and no length limit.
        attn_backend, chunk_size: passed to ``efla_attention`` ("auto": Triton on CUDA, torch otherwise; chunk_size
            is the torch backend's, the Triton kernels always run 64-token chunks).

    What training recomputes in the backward is not part of the model: see
    ``EFLAPreTrainedModel.activation_checkpointing_enable``. The ``activation_checkpointing`` field of older
    config.json files is dropped on load.
    """

    model_type = "efla"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_heads: int = 8,
        intermediate_size: int | None = None,
        attn_mode: str = "efla",
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_output_gate: bool = False,
        use_decay_gate: bool = False,
        attn_layers: list[int] | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 2048,
        attn_backend: str = "auto",
        chunk_size: int = 64,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs: Any,
    ) -> None:
        if attn_mode not in MODES:
            raise ValueError(f"attn_mode must be one of {MODES} (got {attn_mode!r})")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        attn_layers = sorted(attn_layers or [])
        if len(set(attn_layers)) != len(attn_layers) or any(not 0 <= i < num_hidden_layers for i in attn_layers):
            raise ValueError(f"attn_layers must be distinct layer indices in [0, {num_hidden_layers}) "
                             f"(got {attn_layers})")
        if intermediate_size is None:
            intermediate_size = 256 * math.ceil(int(hidden_size * 8 / 3) / 256)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.attn_mode = attn_mode
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_output_gate = use_output_gate
        self.use_decay_gate = use_decay_gate
        self.attn_layers = attn_layers
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.attn_backend = attn_backend
        self.chunk_size = chunk_size
        self.use_cache = use_cache
        kwargs.pop("activation_checkpointing", None)  # a training setting that older versions stored here
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def layer_types(self) -> list[str]:
        """Per layer, "linear_attention" (EFLA) or "full_attention" (softmax): how transformers' DynamicCache lays
        out its per-layer states."""
        return ["full_attention" if i in self.attn_layers else "linear_attention"
                for i in range(self.num_hidden_layers)]
