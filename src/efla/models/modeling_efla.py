"""EFLA language model as transformers classes: ``EFLAModel`` (the backbone) and ``EFLAForCausalLM``.

Pre-norm blocks (RMSNorm -> token mixer -> residual, RMSNorm -> SwiGLU MLP -> residual), the token mixer being
``EFLAttention`` or, at the layers listed in ``config.attn_layers``, softmax attention. Generation uses transformers'
``DynamicCache`` built from the config's ``layer_types``: linear-attention layers keep a convolution state and the
recurrent state, softmax layers keep keys and values. ``efla.models.generation`` holds the static state and the
CUDA-graph decode step.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from efla.layers import EFLAttention, RMSNorm, SoftmaxAttention
from efla.layers.gates import decay_gate_init
from efla.layers.projection import has_hooks, is_plain_linear, project, project_normed
from efla.models.configuration_efla import EFLAConfig
from efla.models.context_parallel import context_parallel_group, global_target_count, sharded_next_token_targets
from efla.models.documents import cu_seqlens_from_collator
from efla.models.generation import (
    CACHE_FIELD,
    EFLAStaticCache,
    decode_step,
    detach_static_state,
    static_generate_call,
)
from efla.models.loss import causal_lm_loss
from efla.modules.elementwise import swiglu, swiglu_linear

CHECKPOINTING_POLICIES = ("full", "selective")
"""What ``activation_checkpointing_enable`` can recompute in the backward (its kwargs' "policy")."""


class EFLAMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up as one matrix product (``project``), keeping
    only their output for the backward."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The MLP of x, or of norm(x) when the block's pre-norm is given (kept as x: ``project_normed``)."""
        linears = (self.gate_proj, self.up_proj)
        gate_up = project(x, linears) if norm is None else project_normed(x, norm, linears)
        if is_plain_linear(self.down_proj):
            return swiglu_linear(gate_up, self.down_proj.weight)  # silu(gate) * up is formed again in the backward
        return self.down_proj(swiglu(gate_up))  # a wrapped down_proj (LoRA, hooks) runs as itself


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
                use_decay_gate=getattr(config, "use_decay_gate", False),
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
        x = self.attn_norm(hidden_states)
        if isinstance(cache, EFLAStaticCache) and _one_token_step(x, attention_mask, cu_seqlens):
            mixed = self.attn.step(x, *cache.decode_state(self.attn.layer_idx))  # the static state advances in place
        else:
            mixed = self.attn(x, attention_mask, cache, cu_seqlens)
        hidden_states = hidden_states + mixed
        if has_hooks(self.mlp):  # its hooks see the normalised input, as they would in any pre-norm block
            return hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states + self.mlp(hidden_states, norm=self.mlp_norm)


class EFLAPreTrainedModel(PreTrainedModel):
    """Weight init (transformers' default: normal(0, initializer_range) for linear/conv/embedding, ones for norms;
    the decay gate's A_log and dt_bias as Gated DeltaNet initialises them) and the transformers plumbing shared by
    the EFLA models."""

    config_class = EFLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["EFLABlock"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, EFLAttention) and module.use_decay_gate:
            A_log, dt_bias = decay_gate_init(module.num_heads, module.A_log.device)
            init.copy_(module.A_log, A_log)  # transformers' init: leaves weights loaded from a checkpoint alone
            init.copy_(module.dt_bias, dt_bias)

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """transformers' activation checkpointing (``gradient_checkpointing_enable`` too), with a choice of what is
        recomputed in the backward, ``activation_checkpointing_kwargs["policy"]``:

        - "full" (the default): transformers' own; each block keeps only its input and is recomputed whole. The other
          kwargs (default ``use_reentrant=False``), every_n_layers and offload are transformers'.
        - "selective": every block keeps its activations, but the EFLA layers keep only the inputs of their
          element-wise work (convolution + SiLU + q/k L2 norm, the beta sigmoid, the decay gate) and recompute it
          (``efla.modules.recompute``): at least three float32 hidden-wide tensors fewer per token and layer, for
          one extra element-wise pass. No other options.

        The RMSNorms, the output norm and SwiGLU keep only their inputs under every policy. The loss and gradients are
        the same under both, and without checkpointing."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        policy = kwargs.pop("policy", "full")
        if policy not in CHECKPOINTING_POLICIES:
            raise ValueError(f"activation_checkpointing_kwargs['policy'] must be one of {CHECKPOINTING_POLICIES} "
                             f"(got {policy!r})")
        self.activation_checkpointing_disable()
        if policy == "full":
            super().activation_checkpointing_enable(kwargs or None, every_n_layers, offload)
            return
        if kwargs or every_n_layers != 1 or offload:
            raise ValueError("the 'selective' policy takes no other options (got "
                             f"{sorted(kwargs) + ['every_n_layers'] * (every_n_layers != 1) + ['offload'] * offload})")
        for module in self.modules():
            if isinstance(module, EFLAttention):
                module.recompute = True

    def activation_checkpointing_disable(self) -> None:
        """Keep every activation again (no policy)."""
        super().activation_checkpointing_disable()
        for module in self.modules():
            if isinstance(module, EFLAttention):
                module.recompute = False


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
        position_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids [B, T] (or inputs_embeds [B, T, hidden_size]); attention_mask [B, past + T] 0/1 (0 = padding,
        any position); cache: the Cache of earlier calls (``past_key_values`` in transformers before the rename);
        cu_seqlens: [N + 1] int cumulative lengths of documents packed along the B * T tokens read row after row
        (training on packed data: no state or attention crosses a document boundary; not with a padding mask or a
        cache). Without cu_seqlens, transformers' padding-free collators (``DataCollatorWithFlattening``) mark the
        documents with ``position_ids`` restarting per document or ``cu_seq_lens_q`` / ``cu_seq_lens_k``; they
        become cu_seqlens when no cache is passed and nothing is padded (``efla.models.documents``). Otherwise
        position_ids and what generate() passes (cache_position, ...) are ignored: the model has no positions.
        return_dict=False returns a tuple of the non-None fields; output_attentions=True warns (there are no
        attention maps) and returns none.

        Under context parallelism (``efla.models.context_parallel.apply_context_parallel``) the inputs are this rank's
        shard along T, cu_seqlens the global offsets (B = 1), and there is no padding mask, cache, position_ids or
        cu_seq_lens_q (a shard's positions cannot mark documents that cross ranks)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        _warn_no_attentions(output_attentions)
        cache = cache if cache is not None else past_key_values
        sharded = context_parallel_group(self) is not None
        attention_mask, cu_seqlens = _padding_or_documents(attention_mask, cache, cu_seqlens, position_ids, kwargs,
                                                           sharded)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        B, T, width = inputs_embeds.shape  # no -1 in the views below: a shard may have no tokens
        if cu_seqlens is not None:
            if attention_mask is not None or cache is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a padding attention_mask or a "
                                 "cache")
            if sharded and B != 1:
                raise ValueError(f"packed documents (cu_seqlens) under context parallelism take one row of input_ids "
                                 f"(got {B}): the rows would not be one contiguous shard")
            inputs_embeds = inputs_embeds.reshape(1, B * T, width)  # the documents, one row after another
            use_cache = False
            _mark_document_count_dynamic(cu_seqlens)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)

        hidden_states = inputs_embeds
        all_hidden_states: tuple[torch.Tensor, ...] = ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states.view(B, T, width),)
            hidden_states = layer(hidden_states, attention_mask, cache if use_cache else None, cu_seqlens)
        hidden_states = self.norm(hidden_states).view(B, T, width)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        outputs = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states if output_hidden_states else None,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return outputs if _wants_dict(return_dict, self.config) else outputs.to_tuple()


class EFLAForCausalLM(EFLAPreTrainedModel, GenerationMixin):
    """EFLAModel with a language-modelling head; supports generate() with the recurrent cache."""

    # tied only when config.tie_word_embeddings
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EFLAConfig) -> None:
        super().__init__(config)
        self.model = EFLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_compiled_call(self, compile_config: Any) -> Any:
        """The decode step transformers' generate runs over a compileable cache on CUDA (the kept static state of a
        plain call, or an EFLAStaticCache passed in): the one-token step captured in a CUDA graph
        (``efla.models.generation.DecodeGraph``). Hybrid models keep transformers' torch.compile."""
        if self.config.attn_layers:
            return super().get_compiled_call(compile_config)
        return decode_step(self)

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 **kwargs: Any) -> Any:
        """transformers' generate. On CUDA, greedy and sampled decoding without a cache of the caller's runs over the
        model's kept static state and its captured decode graph (``efla.models.generation.static_generate_call``):
        the first call for a batch size, dtype and device captures the graph, later calls replay it. Everything else
        (the CPU, beam search, assisted decoding, a cache passed in, hybrid models) is transformers' generate as is.
        A returned cache (return_dict_in_generate) is the caller's own copy."""
        call = static_generate_call(self, inputs, generation_config, kwargs)
        if call is None:
            return super().generate(inputs, generation_config, **kwargs)
        return detach_static_state(super().generate(inputs, call.generation_config, **call.kwargs), call.cache)

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
        position_ids: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """As EFLAModel.forward, plus the language-modelling loss and logits_to_keep (0: all positions; n: the last n).

        In training mode with labels the logits are not computed (logits=None): the loss comes from
        ``efla.models.loss.causal_lm_loss``, chunk by chunk, without float32 logits for every token.

        labels [B, T]: the input ids themselves (shifted here, -100 ignored); the first token of each packed document
        is not predicted from the previous document's last token. shift_labels [B, T]: targets already aligned with
        the positions (-100 ignored), used instead of labels. The loss is the sum of the token cross-entropies over
        num_items_in_batch (what transformers' Trainer passes under gradient accumulation), or over the number of
        counted targets when it is None.

        Under context parallelism labels and shift_labels are this rank's shards: labels are shifted across the rank
        boundaries, and the count when num_items_in_batch is None is that of all ranks, so the ranks' losses add up
        to the loss of the whole sequence (``efla.models.context_parallel``)."""
        cache = cache if cache is not None else past_key_values
        group = context_parallel_group(self)
        attention_mask, cu_seqlens = _padding_or_documents(attention_mask, cache, cu_seqlens, position_ids, kwargs,
                                                           group is not None)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states, cu_seqlens=cu_seqlens, output_attentions=output_attentions,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if shift_labels is None and labels is not None:
            shift_labels = (_next_token_targets(labels, cu_seqlens) if group is None
                            else sharded_next_token_targets(labels, cu_seqlens, group))
        if group is not None and shift_labels is not None and num_items_in_batch is None:
            num_items_in_batch = global_target_count(shift_labels, group)
        loss = logits = None
        if shift_labels is not None and type(self.lm_head) is not nn.Linear:  # a wrapped head (e.g. LoRA): run it
            all_logits = self.lm_head(hidden_states)
            loss = causal_lm_loss(all_logits, None, shift_labels, num_items_in_batch)
            logits = all_logits[:, -logits_to_keep:] if logits_to_keep else all_logits
        elif shift_labels is not None:
            loss = causal_lm_loss(hidden_states, self.lm_head.weight, shift_labels, num_items_in_batch)
        if logits is None and (shift_labels is None or not self.training):  # training with labels needs no logits
            logits = self.lm_head(hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()


def _next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """labels [B, T] -> targets [B, T]: position t predicts label t + 1; a row's last position, and with cu_seqlens
    (over the B * T tokens read row after row) the position before each document's start, predict nothing (-100)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    if cu_seqlens is not None:
        targets = targets.flatten().index_fill(0, cu_seqlens[1:-1].long() - 1, -100).view_as(labels)
    return targets


def _padding_or_documents(
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    cu_seqlens: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    collator_kwargs: dict[str, Any],
    sharded: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(padding mask, cu_seqlens): the 0/1 [B, T] mask only when it pads something (None when absent or all ones:
    the dense path); without padding and without a cache, the documents that cu_seqlens or a padding-free collator's
    position_ids / cu_seq_lens_q mark. An already resolved pair comes back unchanged. ``sharded`` (context
    parallelism): the documents come only as the global cu_seqlens."""
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be a [batch, length] 0/1 padding mask "
                             f"(got shape {tuple(attention_mask.shape)})")
        if not torch.compiler.is_compiling() and bool(attention_mask.all()):  # traced, the mask is kept as it is
            attention_mask = None
    collator_marks = position_ids is not None or any(collator_kwargs.get(name) is not None
                                                     for name in ("cu_seq_lens_q", "cu_seq_lens_k"))
    if sharded and cu_seqlens is None and collator_marks:
        raise ValueError("under context parallelism pass packed documents as the global cu_seqlens, not position_ids "
                         "or cu_seq_lens_q (a shard's cannot mark documents that cross ranks)")
    if cu_seqlens is None and cache is None and attention_mask is None:
        cu_seqlens = cu_seqlens_from_collator(position_ids, collator_kwargs.get("cu_seq_lens_q"),
                                              collator_kwargs.get("cu_seq_lens_k"))
    return attention_mask, cu_seqlens


def _wants_dict(return_dict: bool | None, config: EFLAConfig) -> bool:
    return return_dict if return_dict is not None else config.return_dict


def _warn_no_attentions(output_attentions: bool | None) -> None:
    if output_attentions:
        warnings.warn("output_attentions=True: EFLA layers have no attention maps, so `attentions` stays None",
                      stacklevel=3)


def _one_token_step(x: torch.Tensor, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> bool:
    """Whether a block's call over a static cache is a decode step that the layer's in-place ``step`` serves: one
    token per row, no padding mask, no packed documents, no gradients."""
    return x.shape[1] == 1 and attention_mask is None and cu_seqlens is None and not torch.is_grad_enabled()


def _mark_document_count_dynamic(cu_seqlens: Any) -> None:
    """The number of documents changes from batch to batch: blocks compiled on their own (as ``efla train`` compiles
    them) trace it as a symbol from the first batch on instead of recompiling when it first changes. Eager calls
    only (marking is not traceable; a model compiled whole makes the length dynamic once it changes), and only once
    torch._dynamo is loaded: before that nothing has been compiled, and importing it costs a second."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and isinstance(cu_seqlens, torch.Tensor) and not torch.compiler.is_compiling():
        dynamo.maybe_mark_dynamic(cu_seqlens, 0)
