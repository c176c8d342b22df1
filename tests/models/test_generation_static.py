"""Generation from the static inference state: the same tokens as transformers' eager generate, each row's own state
after a left-padded prefill, sampling, eos, and (on a GPU) the CUDA-graph decode step."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import CompileConfig, DynamicCache  # noqa: E402

import efla.models.generation as generation  # noqa: E402
from efla.models import EFLAForCausalLM, preset_config  # noqa: E402
from efla.models.generation import (  # noqa: E402
    KEPT_STATES,
    STOP_CHECK_EVERY,
    DecodeGraph,
    EFLAStaticCache,
    decode_step,
    generate,
)

VARIANTS = {  # small chunks so that prompts span several chunks
    "efla": dict(chunk_size=4),
    "delta": dict(chunk_size=4, attn_mode="delta"),
    "no-conv-gated": dict(chunk_size=4, use_short_conv=False, use_output_gate=True),
    "gated-delta": dict(chunk_size=4, attn_mode="delta", use_decay_gate=True),
}
LENGTHS = [4, 9, 6]  # prompt lengths of one left-padded batch


def _model(device: str = "cpu", **overrides) -> EFLAForCausalLM:
    torch.manual_seed(0)
    config = preset_config("tiny", pad_token_id=0, eos_token_id=None, initializer_range=0.1, **overrides)
    return EFLAForCausalLM(config).to(device).eval()


def _left_padded(lengths: list[int], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n:], mask[b, T - n:] = torch.randint(1, 256, (n,)), 1
    return ids.to(device), mask.to(device)


def _graph_config() -> CompileConfig:
    """A compile config that lets transformers' generate ask for the model's "compiled call" on the CPU too, so the
    DecodeGraph hook (eager here) is what decodes."""
    config = CompileConfig()
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_static_matches_eager_generate_on_left_padded_batch(variant):
    model = _model(**VARIANTS[variant])
    ids, mask = _left_padded(LENGTHS)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=8), eager)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            cache=EFLAStaticCache(model, len(LENGTHS)))
    assert torch.equal(static, eager)


def test_transformers_generate_decodes_through_the_decode_graph():
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    hooked = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            cache=EFLAStaticCache(model, len(LENGTHS)), compile_config=_graph_config())
    assert isinstance(model._decode_graph, DecodeGraph)
    assert torch.equal(hooked, eager)
    # cache_implementation="static" (transformers' own StaticCache of linear-attention layers) decodes the same way
    switched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              cache_implementation="static", compile_config=_graph_config())
    assert torch.equal(switched, eager)
    # generate() and transformers' generate share the model's decode step and its static cache (made in inference
    # mode by the first, updated under no_grad by the second)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=8), eager)
    shared = decode_step(model).static_cache(len(LENGTHS))
    again = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, cache=shared,
                           compile_config=_graph_config())
    assert torch.equal(again, eager)


def test_compiled_decode_step_traces_the_model():
    """torch.compile's graph capture (backend "eager": dynamo only, same numerics) traces the whole step."""
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=6, compile_backend="eager"), eager)
    assert model._decode_graph.compile_backend == "eager"


def test_static_cache_steps_go_through_the_in_place_decode(monkeypatch):
    """After the prefill, one-token steps over EFLAStaticCache advance its buffers directly (EFLAttention.step);
    transformers' default cache keeps the layer's forward."""
    from efla.layers import EFLAttention

    calls = []
    original = EFLAttention.step
    monkeypatch.setattr(EFLAttention, "step", lambda *a: calls.append(1) or original(*a))
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)
    generate(model, ids, mask, max_new_tokens=3)
    assert len(calls) == 2 * model.config.num_hidden_layers  # two decode steps after the prefill's token
    calls.clear()
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache=DynamicCache(config=model.config))
    assert not calls


def test_prefill_leaves_each_rows_own_state_in_place():
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)
    cache = EFLAStaticCache(model, len(LENGTHS))
    addresses = [(layer.conv_states[0].data_ptr(), layer.recurrent_states[0].data_ptr()) for layer in cache.layers]
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
        for b, n in enumerate(LENGTHS):
            alone = DynamicCache(config=model.config)
            model(ids[b:b + 1, -n:], cache=alone, use_cache=True)
            for static_layer, alone_layer in zip(cache.layers, alone.layers, strict=True):
                for state in ("conv_states", "recurrent_states"):
                    got, want = getattr(static_layer, state)[0][b], getattr(alone_layer, state)[0][0]
                    assert want.abs().max() > 0
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"row {b} {state}")
    assert addresses == [(layer.conv_states[0].data_ptr(), layer.recurrent_states[0].data_ptr())
                         for layer in cache.layers]
    cache.reset()
    assert all(buffer.abs().max() == 0 for layer in cache.layers
               for buffer in (layer.conv_states[0], layer.recurrent_states[0]))


def test_sampling_is_reproducible_and_filters_apply():
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)

    def sample(seed: int, **options) -> torch.Tensor:
        torch.manual_seed(seed)
        return generate(model, ids, mask, max_new_tokens=12, temperature=1.0, **options)

    first = sample(1)
    assert torch.equal(sample(1), first)
    assert not torch.equal(sample(2), first)
    greedy = generate(model, ids, mask, max_new_tokens=12)
    assert not torch.equal(first, greedy)
    assert torch.equal(sample(3, top_k=1), greedy)  # only the most likely token survives
    assert torch.equal(sample(4, top_p=1e-6), greedy)
    top_k = sample(5, top_k=3)
    with torch.no_grad():  # every sampled token is among the 3 most likely at its step
        logits = model(top_k, attention_mask=torch.cat([mask, torch.ones_like(top_k[:, ids.shape[1]:])], 1)).logits
    allowed = logits[:, ids.shape[1] - 1:-1].topk(3, dim=-1).indices
    assert (allowed == top_k[:, ids.shape[1]:, None]).any(-1).all()


def test_stops_at_eos_like_transformers():
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)
    greedy = generate(model, ids, mask, max_new_tokens=STOP_CHECK_EVERY + 8)
    new = greedy[:, ids.shape[1]:]
    # eos = the token row 0 produces at step 2 (and not before), so row 0 stops there
    eos = next(int(new[0, i]) for i in range(2, new.shape[1]) if int(new[0, i]) not in new[0, :i].tolist())
    ours = generate(model, ids, mask, max_new_tokens=STOP_CHECK_EVERY + 8, eos_token_id=eos, pad_token_id=0)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=STOP_CHECK_EVERY + 8, do_sample=False,
                            eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, theirs)
    # one row alone ends right after its eos, well before max_new_tokens
    alone = generate(model, ids[:1], mask[:1], max_new_tokens=STOP_CHECK_EVERY + 8, eos_token_id=eos)
    assert alone.shape[1] < ids.shape[1] + STOP_CHECK_EVERY + 8
    assert int(alone[0, -1]) == eos and eos not in alone[0, ids.shape[1]:-1].tolist()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="attn_layers"):
        EFLAStaticCache(_model(num_hidden_layers=3, attn_layers=[1]), 2)
    model = _model()
    ids, mask = _left_padded(LENGTHS)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask.flip(1))
    with pytest.raises(ValueError, match="batch size 2"):
        DecodeGraph(model)(ids[:, -1:], EFLAStaticCache(model, 2))
    with pytest.raises(ValueError, match="one new token"):
        DecodeGraph(model)(ids, EFLAStaticCache(model, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
@pytest.mark.parametrize("variant", ["efla", "gated-delta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_matches_eager(dtype, variant):
    model = _model("cuda", **VARIANTS[variant]).to(dtype)
    ids, mask = _left_padded(LENGTHS, "cuda")
    # the graph replays the eager static step's kernels (the in-place decode kernels of EFLAttention.step)
    eager = generate(model, ids, mask, max_new_tokens=20, use_cuda_graph=False)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=20, use_cuda_graph=True), eager)
    # transformers' default cache runs the layer's forward per token, which sums and rounds in another order (three
    # projections instead of one, no bfloat16 round trip between convolution, SiLU and norm in the fused kernel):
    # the first decode step's logits agree to the dtype's rounding
    kwargs = dict(attention_mask=mask, max_new_tokens=2, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    default = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs).logits[1].float()
    fused = model.generate(ids, cache=EFLAStaticCache(model, len(LENGTHS)), **kwargs).logits[1].float()
    assert ((fused - default).norm() / default.norm()).item() < (1e-5 if dtype == torch.float32 else 2e-2)
    # transformers' generate with the static cache asks for the compiled call: the captured graph
    hooked = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                            cache=EFLAStaticCache(model, len(LENGTHS)))
    step = decode_step(model)
    assert step.use_cuda_graph and step.captures >= 1
    assert torch.equal(hooked, eager)
    # the eager step makes no host-device sync (the capture above would have failed too)
    cache = EFLAStaticCache(model, len(LENGTHS))
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        DecodeGraph(model, use_cuda_graph=False)(ids[:, -1:], cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # another cache (another batch size) is captured anew
    captures = step.captures
    again = model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=20, do_sample=False,
                           cache=EFLAStaticCache(model, 2))
    assert step.captures == captures + 1
    assert torch.equal(again, generate(model, ids[:2], mask[:2], max_new_tokens=20, use_cuda_graph=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_generate_captures_once_per_batch_size_and_replays_after(dtype):
    model = _model("cuda", **VARIANTS["efla"]).to(dtype)
    ids, mask = _left_padded(LENGTHS, "cuda")
    reference = generate(model, ids, mask, max_new_tokens=20, use_cuda_graph=False)
    plain = dict(max_new_tokens=20, do_sample=False)
    first = model.generate(ids, attention_mask=mask, **plain)
    step = decode_step(model)
    assert step.use_cuda_graph and step.captures == 1
    assert torch.equal(model.generate(ids, attention_mask=mask, **plain), reference)
    assert torch.equal(first, reference)
    assert step.captures == 1  # the second call replayed the first one's graph
    model.generate(ids[:2], attention_mask=mask[:2], **plain)
    model.generate(ids, attention_mask=mask, **plain)
    assert step.captures == 2  # batch 2 captured its own graph; batch 3's was kept


def _served_on_this_device(monkeypatch, served: bool = True) -> list[int]:
    """With ``served``, make transformers' plain generate decode over the kept static state on the CPU too (eagerly:
    the path CUDA takes, minus the graph); returns a list that grows by one batch size per static state allocated."""
    if served:
        monkeypatch.setattr(generation, "generates_over_static_state", lambda device: True)
    allocated = []
    original = EFLAStaticCache.__init__

    def counting(self, model, batch_size, *args, **kwargs):
        allocated.append(batch_size)
        original(self, model, batch_size, *args, **kwargs)

    monkeypatch.setattr(EFLAStaticCache, "__init__", counting)
    return allocated


def test_plain_generate_keeps_one_static_state_per_batch_size(monkeypatch):
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)
    default = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    allocated = _served_on_this_device(monkeypatch)
    for _ in range(2):
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), default)
        # through the decode step that CUDA captures (transformers asks for it on CUDA only; here by compile_config)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                          compile_config=_graph_config()), default)
        # transformers' static cache asked for by name is served by the kept state too
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                          cache_implementation="static"), default)
    assert allocated == [len(LENGTHS)]
    model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert allocated == [len(LENGTHS), 1]
    for batch in range(4, 4 + KEPT_STATES):  # the least recently used state (batch 3) is let go
        model.generate(ids[:1].expand(batch, -1), max_new_tokens=2, do_sample=False)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert allocated[-1] == len(LENGTHS) and len(allocated) == 4 + KEPT_STATES - 1
    decode_step(model).clear()
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert len(allocated) == 4 + KEPT_STATES


def test_plain_sampling_over_the_kept_state_draws_the_default_paths_tokens(monkeypatch):
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, num_return_sequences=2)
    torch.manual_seed(3)
    default = model.generate(ids, **kwargs)
    allocated = _served_on_this_device(monkeypatch)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, **kwargs), default)
    assert allocated == [2 * len(LENGTHS)]  # one row per returned sequence


def test_what_the_kept_state_cannot_serve_keeps_transformers_generate(monkeypatch):
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)
    beams = dict(attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
    default = model.generate(ids, **beams)
    allocated = _served_on_this_device(monkeypatch)
    assert torch.equal(model.generate(ids, **beams), default)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, use_cache=False)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, cache=DynamicCache(config=model.config))
    # assisted decoding (transformers before 5.25 cannot crop a linear-attention cache to run it at all)
    assert generation.static_generate_call(model, ids[:1], None, {"prompt_lookup_num_tokens": 2}) is None
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1}  # spread over two GPUs by device_map
    assert generation.static_generate_call(model, ids, None, {}) is None
    assert allocated == []
    del model.hf_device_map
    assert generation.static_generate_call(model, ids, None, {}) is not None  # on one device it serves the call
    assert allocated == [len(LENGTHS)]


def test_the_cpu_keeps_transformers_default_cache(monkeypatch):
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)
    allocated = _served_on_this_device(monkeypatch, served=False)
    model.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert allocated == []


def test_a_returned_cache_is_the_callers_copy(monkeypatch):
    model = _model(**VARIANTS["efla"])
    ids, mask = _left_padded(LENGTHS)
    _served_on_this_device(monkeypatch)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    returned = out.cache if hasattr(out, "cache") else out.past_key_values
    kept = decode_step(model).static_cache(len(LENGTHS))
    assert isinstance(returned, EFLAStaticCache) and returned is not kept
    state = returned.decode_state(0)[1].clone()
    assert state.abs().sum() > 0
    model.generate(ids[:, 2:], max_new_tokens=4, do_sample=False)  # the next call overwrites the kept state
    assert torch.equal(returned.decode_state(0)[1], state)


def test_pipeline_generates_over_the_kept_state(monkeypatch, tmp_path):
    from transformers import pipeline

    from efla.train.tokenizer import load_tokenizer, train_tokenizer

    texts = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(200)]
    train_tokenizer(iter(texts), tmp_path, vocab_size=300)
    tokenizer = load_tokenizer(tmp_path)
    model = _model(**VARIANTS["efla"], vocab_size=len(tokenizer))
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    default = generator("the quick brown", max_new_tokens=6, do_sample=False)
    allocated = _served_on_this_device(monkeypatch)
    assert generator("the quick brown", max_new_tokens=6, do_sample=False) == default
    assert allocated == [1]
