"""Generation at recurrent speed: a static inference state, a prefill into it, and a one-token decode step that a CUDA
graph captures once and replays for every token.

An EFLA layer's whole past is its convolution window (the last W - 1 inputs, [B, C, W - 1]) and its recurrent state
([B, H, K, V], float32), whatever the length so far. ``EFLAStaticCache`` has each layer allocate them once
(``EFLAttention.allocate_inference_cache``), for a fixed batch size, dtype and device; a prefill copies the new states
into them and each decode step advances them in place (``EFLAttention.step``), so their addresses never change. A
decode step (one token per row, no mask) is then a fixed sequence of kernels over fixed buffers, which
``DecodeGraph`` captures in a ``torch.cuda.CUDAGraph`` and replays, removing the hundreds of kernel launches from
Python that dominate a step of a small model. On the CPU the same step runs eagerly.

The prompt is prefilled by the model's normal forward with the cache (the chunk kernels); a left-padded batch is
packed into one sequence per row, so each row of the static state holds that row's own state and the decode steps
need no mask at all.

Two ways in:

- transformers: the plain ``model.generate(ids, max_new_tokens=...)``. On CUDA, greedy and sampled decoding without
  a cache of the caller's go over the model's kept static state (``static_generate_call``), so generate sees a
  compileable cache and asks the model for its "compiled call", which ``EFLAForCausalLM.get_compiled_call`` answers
  with the model's ``DecodeGraph``. The state and its captured graph are kept per (batch size, dtype, device) and
  reused by later calls; the state's size does not depend on the sequence length, so no length bucket is needed.
  Pass ``disable_compile=True`` to decode eagerly over the same state; beam search, assisted decoding, hybrid models
  and the CPU keep transformers' default cache.
- directly: ``generate(model, input_ids, attention_mask, max_new_tokens, ...)`` below, with no per-token host sync.

Hybrid models (``config.attn_layers``) are not served: their softmax layers need the padding mask and a key/value
buffer growing with the sequence. ``EFLAStaticCache`` rejects them with an error; generate them with the default
cache (eager).
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from efla.layers import EFLAttention

# transformers renamed the `past_key_values` argument and output field to `cache` (5.2x); speak whichever it uses
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
"""The name of the cache field of transformers' model outputs in the installed version."""

STOP_CHECK_EVERY = 16
"""generate() reads "have all rows reached eos?" back from the device once every this many tokens, not per token."""

KEPT_STATES = 4
"""How many static states (one per batch size, dtype and device), each with its captured decode graph, a model keeps
for later generate calls; the least recently used one goes first."""


class _StaticStateLayer(LinearAttentionCacheLayerMixin):
    """One EFLA layer's decode state (``EFLAttention.allocate_inference_cache``) as a transformers cache layer: the
    convolution window and the recurrent state in preallocated buffers, overwritten in place."""

    def __init__(self, conv_state: torch.Tensor | None, recurrent_state: torch.Tensor) -> None:
        super().__init__(number_of_states=1)
        self.batch_size = recurrent_state.shape[0]
        self.dtype, self.device = recurrent_state.dtype, recurrent_state.device
        if conv_state is not None:
            self.conv_states[0], self.is_conv_states_initialized[0] = conv_state, True
            self.conv_kernel_size[0] = conv_state.shape[-1]
        self.recurrent_states[0], self.is_recurrent_states_initialized[0] = recurrent_state, True

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        """Nothing to do: the buffers exist from the start."""

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        buffer = self.conv_states[state_idx]
        if buffer is None or conv_states.shape != buffer.shape:
            raise ValueError(f"conv state {state_idx} has shape {tuple(conv_states.shape)}, but the static cache holds "
                             f"{None if buffer is None else tuple(buffer.shape)}: build it for this model and batch")
        self.has_previous_state[state_idx] = True
        return buffer.copy_(conv_states)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        buffer = self.recurrent_states[state_idx]
        if recurrent_states.shape != buffer.shape:
            raise ValueError(f"recurrent state has shape {tuple(recurrent_states.shape)}, but the static cache holds "
                             f"{tuple(buffer.shape)}: build it with the batch size of the input")
        self.has_previous_state[state_idx] = True
        return buffer.copy_(recurrent_states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: permute the rows in place (the buffers keep their addresses)."""
        for buffer in (*self.conv_states.values(), *self.recurrent_states.values()):
            if buffer is not None:
                buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))


class EFLAStaticCache(Cache):
    """The static inference state of an EFLA model: per layer the convolution windows [B, C, W - 1] (model dtype) and
    the recurrent state [B, H, K, V] (float32), allocated once for ``batch_size`` rows and updated in place.

    A transformers Cache: pass it to ``model.generate(..., cache=...)`` or to the model's forward, which advances
    it with each layer's in-place ``step`` for one-token calls without a mask (``decode_state``). ``reset()`` zeros it
    for a new batch of prompts of the same size."""

    def __init__(self, model: nn.Module, batch_size: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        config = model.config
        if getattr(config, "attn_layers", None):
            raise ValueError(f"EFLAStaticCache serves EFLA layers only, but layers {config.attn_layers} use softmax "
                             "attention (config.attn_layers): generate this hybrid model with the default cache")
        parameter = next(model.parameters())
        dtype = dtype or parameter.dtype
        device = torch.device(device) if device is not None else parameter.device
        layers = []
        # plain tensors even when built inside inference mode: transformers' generate updates them under no_grad
        with torch.inference_mode(False):
            for attention in _efla_layers(model):
                layers.append(_StaticStateLayer(*attention.allocate_inference_cache(batch_size, dtype, device)))
        super().__init__(layers=layers)

    def decode_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Layer ``layer_idx``'s (convolution window or None, recurrent state), as ``EFLAttention.step`` takes them."""
        layer = self.layers[layer_idx]
        return layer.conv_states[0], layer.recurrent_states[0]


def _state_buffers(cache: Cache) -> list[torch.Tensor]:
    """Every state tensor of a cache of linear-attention layers, in a fixed order; a TypeError for other caches (a
    key/value layer grows, so its step cannot be captured)."""
    buffers = []
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, LinearAttentionCacheLayerMixin) or getattr(layer, "record_past", False):
            raise TypeError(f"cache layer {i} is a {type(layer).__name__}: a decode step can be captured only over "
                            "fixed linear-attention states (EFLAStaticCache)")
        buffers += [b for b in (*layer.conv_states.values(), *layer.recurrent_states.values()) if b is not None]
    return buffers


def _efla_layers(model: nn.Module) -> list[EFLAttention]:
    """The model's EFLAttention modules in layer order, checked against their layer_idx (the cache's index)."""
    layers = [m for m in model.modules() if isinstance(m, EFLAttention)]
    if [m.layer_idx for m in layers] != list(range(len(layers))):
        raise ValueError("EFLAStaticCache needs the model's EFLAttention layers numbered 0, 1, ... in order "
                         f"(got layer_idx {[m.layer_idx for m in layers]})")
    return layers


@dataclasses.dataclass
class _CapturedStep:
    """One decode step captured over one cache: the graph and the static input and output buffers it replays on."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    logits: torch.Tensor


class DecodeGraph:
    """The model's one-token step over a static cache: logits [B, 1, vocab] of ``input_ids`` [B, 1], the cache
    advanced in place. With ``use_cuda_graph`` (default: the model is on CUDA) the step is captured in a CUDA graph
    the first time it meets a cache, and replayed for that cache after; otherwise it runs eagerly.
    ``compile_backend`` (e.g. "inductor"; default None: off) compiles the step with torch.compile first.

    Callable like the model's forward as transformers' generate calls it during decoding (other keywords, such as
    attention_mask, are ignored: after the prefill the static state already holds each row's own past). The returned
    logits are a static buffer, overwritten by the next call. ``captures`` counts the graphs captured so far."""

    def __init__(self, model: nn.Module, use_cuda_graph: bool | None = None, compile_backend: str | None = None
                 ) -> None:
        self.model = model
        self.compile_backend = compile_backend
        # torch.compile fuses the step's small elementwise kernels (norms, activations, casts) before the capture;
        # fused kernels round differently, so greedy tokens may differ from the eager path's
        self._forward = model if compile_backend is None else torch.compile(model, backend=compile_backend,
                                                                            dynamic=False)
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        if use_cuda_graph and not on_cuda:
            raise ValueError("use_cuda_graph=True needs the model on a CUDA device")
        self.use_cuda_graph = on_cuda if use_cuda_graph is None else use_cuda_graph
        self.captures = 0
        # a graph reads and writes its cache's buffers, so it lives exactly as long as that cache
        self._graphs: weakref.WeakKeyDictionary[Cache, _CapturedStep] = weakref.WeakKeyDictionary()
        self._states: OrderedDict[tuple, EFLAStaticCache] = OrderedDict()

    def static_cache(self, batch_size: int) -> EFLAStaticCache:
        """A zeroed EFLAStaticCache for ``batch_size`` rows: the kept one for this batch size, dtype and device when
        there is one (so its captured graph is replayed, not captured again), else a new one, kept for later calls
        (the least recently used of more than KEPT_STATES is let go)."""
        parameter = next(self.model.parameters())
        key = (batch_size, parameter.dtype, parameter.device)
        cache = self._states.pop(key, None)
        if cache is None:
            while len(self._states) >= KEPT_STATES:  # free the oldest state (and its graph) before allocating
                self._states.popitem(last=False)
            cache = EFLAStaticCache(self.model, batch_size)
        self._states[key] = cache
        cache.reset()
        return cache

    def clear(self) -> None:
        """Let go of the kept static states and every captured graph (their memory returns to torch's allocator)."""
        self._states.clear()
        self._graphs.clear()

    def __call__(self, input_ids: torch.Tensor, cache: Cache | None = None, past_key_values: Cache | None = None,
                 **ignored: Any) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if cache is None:
            raise ValueError("DecodeGraph needs the cache that the prompt was prefilled into")
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"input_ids must be [batch, 1], one new token per row (got {tuple(input_ids.shape)})")
        if isinstance(cache, EFLAStaticCache) and cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but the cache was built for batch size "
                             f"{cache.batch_size}")
        if not self.use_cuda_graph:
            logits = self._step(input_ids, cache)
        else:
            captured = self._graphs.get(cache)
            if captured is None or captured.input_ids.shape != input_ids.shape:
                captured = self._capture(input_ids, cache)
            captured.input_ids.copy_(input_ids)
            captured.graph.replay()
            logits = captured.logits
        return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})

    @torch.inference_mode()
    def _step(self, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        return self._forward(input_ids=input_ids, cache=cache, use_cache=True).logits

    def _capture(self, input_ids: torch.Tensor, cache: Cache) -> _CapturedStep:
        """Warm up on a side stream (compiles the Triton kernels), capture one step, then put back the state that the
        warm-up steps advanced."""
        saved = [b.clone() for b in _state_buffers(cache)]
        self._graphs.pop(cache, None)  # free this cache's previous graph first
        with torch.inference_mode(False):  # a plain tensor, written by later calls in or out of inference mode
            static_ids = input_ids.clone()
        try:
            stream = torch.cuda.Stream(device=input_ids.device)
            stream.wait_stream(torch.cuda.current_stream(input_ids.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(static_ids, cache)
            torch.cuda.current_stream(input_ids.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._step(static_ids, cache)
        finally:
            for buffer, value in zip(_state_buffers(cache), saved, strict=True):
                buffer.copy_(value)
        self._graphs[cache] = captured = _CapturedStep(graph, static_ids, logits)
        self.captures += 1
        return captured


def decode_step(model: nn.Module, use_cuda_graph: bool | None = None, compile_backend: str | None = None
                ) -> DecodeGraph:
    """The model's DecodeGraph, kept on the model so that its static states and captured graphs are reused by later
    calls (as transformers keeps its compiled call); a new one when the model moved to another device or the
    arguments ask for another kind (``use_cuda_graph=None``: a graph on CUDA)."""
    device = next(model.parameters()).device
    graphed = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
    step = getattr(model, "_decode_graph", None)
    if (step is None or step.device != device or step.use_cuda_graph != graphed
            or step.compile_backend != compile_backend):
        step = DecodeGraph(model, graphed, compile_backend)
        model._decode_graph = step
    return step


def generates_over_static_state(device: torch.device) -> bool:
    """Whether transformers' generate on ``device`` decodes over the kept static state by default: on CUDA, where the
    decode step is a captured graph. On the CPU the eager step over the static state is no faster than transformers'
    default cache (tiny preset, 128 new tokens: 0.42 s against 0.36 s), so the CPU keeps the default."""
    return device.type == "cuda"


@dataclasses.dataclass(frozen=True)
class StaticGenerateCall:
    """A transformers generate call rewritten to decode over the model's kept static state: the same arguments, with
    ``cache`` passed and any request for transformers' own static cache taken out."""

    generation_config: GenerationConfig | None
    kwargs: dict[str, Any]
    cache: EFLAStaticCache


def static_generate_call(model: nn.Module, inputs: torch.Tensor | None, generation_config: GenerationConfig | None,
                         kwargs: dict[str, Any]) -> StaticGenerateCall | None:
    """How ``model.generate(inputs, generation_config, **kwargs)`` runs over the model's kept static state (and so, on
    CUDA, through its captured decode graph), or None when that state cannot serve the call: a cache of the
    caller's, use_cache=False, another cache_implementation than "static", beam search, assisted or contrastive
    decoding, a custom generate, softmax layers in the model, a model spread over several devices (``device_map``),
    or a device where it does not pay (``generates_over_static_state``)."""
    if getattr(model.config, "attn_layers", None) or not generates_over_static_state(next(model.parameters()).device):
        return None
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:  # the state is allocated on one device
        return None
    if any(kwargs.get(name) is not None for name in ("cache", "past_key_values", "custom_generate")):
        return None
    settings = _call_settings(model, generation_config, kwargs)
    modes = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
    if (settings.use_cache is False or settings.cache_implementation not in (None, "static")
            or settings.get_generation_mode(kwargs.get("assistant_model")) not in modes):
        return None
    if settings.cache_implementation == "static":  # asked for by name: served by the kept state instead
        if kwargs.get("cache_implementation") == "static":
            kwargs = {**kwargs, "cache_implementation": None}
        elif generation_config is not None and generation_config.cache_implementation == "static":
            generation_config = copy.deepcopy(generation_config)
            generation_config.cache_implementation = None
        elif generation_config is None:  # the model's own generation config asks for it
            kwargs = {**kwargs, "cache_implementation": None}
        else:  # transformers would fill the passed config's None from the model's "static" and then refuse a cache
            return None
    prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if not isinstance(prompt, torch.Tensor) or prompt.dim() < 2:
        return None
    cache = decode_step(model).static_cache(prompt.shape[0] * (settings.num_return_sequences or 1))
    return StaticGenerateCall(generation_config, {**kwargs, CACHE_FIELD: cache}, cache)


def _call_settings(model: nn.Module, generation_config: GenerationConfig | None,
                   kwargs: dict[str, Any]) -> GenerationConfig:
    """The generation settings a generate call resolves to, read with transformers' priority (keyword arguments,
    then the passed config's values that are set, then the model's generation config), without validating them
    (generate itself does, and warns once)."""
    settings = copy.deepcopy(model.generation_config)
    passed = {k: v for k, v in generation_config.to_dict().items() if v is not None} if generation_config else {}
    for key, value in {**passed, **kwargs}.items():
        if hasattr(settings, key):
            setattr(settings, key, value)
    return settings


def detach_static_state(output: Any, cache: EFLAStaticCache) -> Any:
    """A generate output that returns the model's kept static state (return_dict_in_generate) gets a copy of it
    instead, so that the model's next generate call does not overwrite what the caller holds."""
    if isinstance(output, ModelOutput) and output.get(CACHE_FIELD) is cache:
        output[CACHE_FIELD] = copy.deepcopy(cache)
    return output


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    use_cuda_graph: bool | None = None,
    compile_backend: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens with the static state (prefill, then CUDA-graph decode
    steps on CUDA unless ``use_cuda_graph=False``).

    Args:
        model: an EFLAForCausalLM without softmax layers, in eval mode.
        input_ids: [B, T] prompts, left-padded to a common length.
        attention_mask: [B, T] 0/1 (0 = padding, on the left) or None.
        temperature: 0 picks the most likely token (greedy); > 0 samples from softmax(logits / temperature), keeping
            the ``top_k`` most likely tokens and/or the smallest set whose probability reaches ``top_p``.
        eos_token_id: a row stops after it emits this token; later positions hold ``pad_token_id`` (default: eos).
            Generation ends when every row has stopped (checked every STOP_CHECK_EVERY tokens; the output is cut at
            the step where the last row stopped, as transformers' generate does).
        use_cuda_graph, compile_backend: as in DecodeGraph.
        generator: the random generator for sampling (default: torch's global one, so torch.manual_seed fixes it).

    Returns:
        [B, T + n] int64: the prompts followed by n <= max_new_tokens generated tokens.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length] (got shape {tuple(input_ids.shape)})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask: prompts must be left-padded (the last column holds padding)")
    B, T = input_ids.shape
    step = decode_step(model, use_cuda_graph, compile_backend)
    cache = step.static_cache(B)
    pad = pad_token_id if pad_token_id is not None else eos_token_id

    logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True,
                   logits_to_keep=1).logits
    out = input_ids.new_empty(B, T + max_new_tokens)
    out[:, :T] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    all_finished = torch.zeros(max_new_tokens, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = _next_token(logits[:, -1], temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(finished, pad, token)
            finished |= token == eos_token_id
            all_finished[i] = finished.all()
        out[:, T + i] = token
        if i + 1 == max_new_tokens:
            break
        if eos_token_id is not None and (i + 1) % STOP_CHECK_EVERY == 0 and bool(all_finished[i]):
            break
        logits = step(token[:, None], cache).logits
    n = max_new_tokens
    if eos_token_id is not None and bool(all_finished.any()):
        n = int(all_finished.int().argmax()) + 1
    return out[:, :T + n]


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """[B, vocab] logits -> [B] token ids: greedy at temperature 0, else a sample after top-k / top-p filtering."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
