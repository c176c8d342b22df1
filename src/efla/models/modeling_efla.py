"""EFLA language model as transformers classes: ``EFLAModel`` (the backbone) and ``EFLAForCausalLM``.

Pre-norm blocks (RMSNorm -> token mixer -> residual, RMSNorm -> SwiGLU MLP -> residual), the token mixer being
``EFLAttention`` or, at the layers listed in ``config.attn_layers``, softmax attention. Generation uses transformers'
``DynamicCache`` built from the config's ``layer_types``: linear-attention layers keep a convolution state and the
recurrent state, softmax layers keep keys and values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from efla.layers import EFLAttention, RMSNorm, SoftmaxAttention
from efla.models.configuration_efla import EFLAConfig

# transformers renamed the `past_key_values` argument and output field to `cache` (5.2x); speak whichever it uses
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class EFLAMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EFLABlock(GradientCheckpointingLayer):
    """One pre-norm residual block: token mixer then MLP."""

    def __init__(self, config: EFLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if layer_idx in config.attn_layers:
            self.attn: nn.Module = SoftmaxAttention(config.hidden_size, config.num_heads, layer_idx=layer_idx)
        else:
            self.attn = EFLAttention(
                config.hidden_size, config.num_heads, mode=config.attn_mode, use_short_conv=config.use_short_conv,
                conv_size=config.conv_size, use_output_gate=config.use_output_gate, norm_eps=config.rms_norm_eps,
                layer_idx=layer_idx, backend=config.attn_backend, chunk_size=config.chunk_size,
            )
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = EFLAMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.attn_norm(hidden_states), attention_mask, cache, cu_seqlens)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class EFLAPreTrainedModel(PreTrainedModel):
    """Weight init (transformers' default: normal(0, initializer_range) for linear/conv/embedding, ones for norms)
    and the transformers plumbing shared by the EFLA models."""

    config_class = EFLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["EFLABlock"]


class EFLAModel(EFLAPreTrainedModel):
    """The backbone: embeddings, blocks, final norm. Returns the last hidden state [B, T, hidden_size]."""

    def __init__(self, config: EFLAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(EFLABlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """input_ids [B, T] (or inputs_embeds [B, T, hidden_size]); attention_mask [B, past + T] 0/1 (0 = padding,
        any position); cache: the Cache of earlier calls (``past_key_values`` in transformers before the rename);
        cu_seqlens: [N + 1] int cumulative lengths of documents packed into one row (B = 1; training on packed
        data: no state or attention crosses a document boundary; not with attention_mask or a cache).
        Other keywords that generate() passes (position_ids, cache_position, ...) are ignored: the model has no
        positions."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if cu_seqlens is not None:
            if inputs_embeds.shape[0] != 1 or attention_mask is not None:
                raise ValueError("cu_seqlens packs documents into one row: pass input_ids of shape [1, T] and no "
                                 f"attention_mask (got batch {inputs_embeds.shape[0]})")
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be a [batch, length] 0/1 padding mask "
                                 f"(got shape {tuple(attention_mask.shape)})")
            if bool(attention_mask.all()):  # no padding: take the dense path everywhere
                attention_mask = None
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)

        hidden_states = inputs_embeds
        all_hidden_states: tuple[torch.Tensor, ...] = ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(hidden_states, attention_mask, cache if use_cache else None, cu_seqlens)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states if output_hidden_states else None,
            **{_CACHE_FIELD: cache if use_cache else None},
        )


class EFLAForCausalLM(EFLAPreTrainedModel, GenerationMixin):
    """EFLAModel with a language-modelling head; supports generate() with the recurrent cache."""

    # tied only when config.tie_word_embeddings
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EFLAConfig) -> None:
        super().__init__(config)
        self.model = EFLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_fla_deltanet(cls, source: Any, attn_mode: str = "delta") -> EFLAForCausalLM:
        """fla's DeltaNetForCausalLM (the model, or a checkpoint directory) as an EFLA model: with attn_mode="delta"
        the same outputs; see ``efla.models.convert``."""
        from efla.models.convert import from_fla_deltanet

        return from_fla_deltanet(source, attn_mode)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """As EFLAModel.forward, plus labels [B, T] (the input ids themselves: shifted here, -100 ignored) for the
        mean next-token cross-entropy, and logits_to_keep (0: all positions; n: the last n). With cu_seqlens the
        first token of each document is not predicted from the previous document's last token."""
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            cache=cache if cache is not None else past_key_values, use_cache=use_cache,
            output_hidden_states=output_hidden_states, cu_seqlens=cu_seqlens,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states)
        loss = None
        if labels is not None:
            if cu_seqlens is not None:  # a document's first token has no context to be predicted from
                labels = labels.clone()
                labels[:, cu_seqlens[1:-1].long()] = -100
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
