"""EFLA language model: cached generation, padding, parameters, gradients, save/load and the Auto classes."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from efla.models import PRESETS, EFLAConfig, EFLAForCausalLM, EFLAModel, preset_config  # noqa: E402

ATOL = 1e-5
VARIANTS = {  # small chunks so that prompts span several chunks
    "efla": dict(chunk_size=4),
    "delta": dict(chunk_size=4, attn_mode="delta"),
    "hybrid-gated": dict(chunk_size=4, num_hidden_layers=3, attn_layers=[1], use_output_gate=True),
    "gated-efla": dict(chunk_size=4, use_decay_gate=True),
    "gated-delta": dict(chunk_size=4, attn_mode="delta", use_decay_gate=True),
}


def _model(**overrides) -> EFLAForCausalLM:
    torch.manual_seed(0)
    config = preset_config("tiny", pad_token_id=0, eos_token_id=None, initializer_range=0.1, **overrides)
    return EFLAForCausalLM(config).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_matches_full_recompute(variant):
    model = _model(**VARIANTS[variant])
    prompt = torch.randint(1, 256, (2, 9))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ids = prompt
    with torch.no_grad():
        for step, cached_logits in enumerate(out.logits):
            logits = model(ids, use_cache=False).logits[:, -1]
            torch.testing.assert_close(cached_logits, logits, atol=ATOL, rtol=0, msg=f"step {step}")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, ids)


@pytest.mark.parametrize("variant", ["efla", "hybrid-gated"])
def test_left_padded_batch_matches_each_sequence_alone(variant):
    model = _model(**VARIANTS[variant])
    lengths, T = [4, 9, 6], 9
    prompts = [torch.randint(1, 256, (n,)) for n in lengths]
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for b, p in enumerate(prompts):
        with torch.no_grad():
            alone_logits = model(p[None]).logits[0]
        torch.testing.assert_close(logits[b, T - len(p):], alone_logits, atol=ATOL, rtol=0)
        alone = model.generate(p[None], max_new_tokens=5, do_sample=False)
        assert torch.equal(batch[b, T:], alone[0, len(p):])


def test_right_padded_training_batch_matches_each_sequence_alone():
    model = _model(**VARIANTS["hybrid-gated"])
    ids = torch.randint(1, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, :6]).logits
    torch.testing.assert_close(logits[0, :6], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_efla_and_delta_have_equal_parameter_counts(preset, gated):
    """The four modes: DeltaNet = EFLA, and Gated DeltaNet = gated EFLA (the gate adds a_proj, A_log, dt_bias)."""
    counts = []
    for mode in ("efla", "delta"):
        with torch.device("meta"):
            model = EFLAForCausalLM(preset_config(preset, attn_mode=mode, use_decay_gate=gated))
        counts.append({name: p.shape for name, p in model.named_parameters()})
    assert counts[0] == counts[1]
    config = preset_config(preset)
    gate = config.num_hidden_layers * (config.hidden_size + 2) * config.num_heads
    with torch.device("meta"):
        ungated = EFLAForCausalLM(config).num_parameters()
    assert sum(shape.numel() for shape in counts[0].values()) == ungated + gated * gate


def test_preset_parameter_counts():
    """The numbers the README quotes (embeddings and head included, untied)."""
    expected = {"340M": 374_362_112, "1.3B": 1_365_677_056, "tiny": 116_864}
    for preset, count in expected.items():
        with torch.device("meta"):
            model = EFLAForCausalLM(preset_config(preset))
        assert model.num_parameters() == count, preset


@pytest.mark.parametrize("tie", [False, True])
def test_every_parameter_gets_a_gradient(tie):
    model = _model(**VARIANTS["hybrid-gated"], tie_word_embeddings=tie).train()
    ids = torch.randint(1, 256, (2, 10))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and p.grad.isfinite().all(), name
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_mlp_with_its_norm_equals_the_modules_own_calls():
    """The MLP reading the pre-norm's input (``project_normed``, which keeps x instead of the normalised x) gives the
    loss and every gradient of the plain path, which a forward hook on the MLP selects (and whose hook then sees the
    normalised input)."""
    model = _model().train()
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(3))

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused_loss, fused_grads = loss_and_grads()
    seen = []
    hooks = [block.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0])) for block in model.model.layers]
    plain_loss, plain_grads = loss_and_grads()
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(model.model.layers)
    assert torch.allclose(fused_loss, plain_loss, rtol=1e-6, atol=0)
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-5, atol=1e-7), name
    rms = seen[0].float().square().mean(-1).sqrt()  # the normalised input (the norms' weights start at one)
    assert torch.allclose(rms, torch.ones_like(rms), rtol=1e-3)


@pytest.mark.parametrize(("variant", "tie"), [("hybrid-gated", False), ("hybrid-gated", True),
                                             ("gated-efla", False)])
def test_save_load_round_trip_is_exact(tmp_path, variant, tie):
    """Everything, the decay gate's A_log and dt_bias included (loading must not initialise them again)."""
    model = _model(**VARIANTS[variant], tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, EFLAForCausalLM)
    assert {**loaded.config.to_dict(), "_name_or_path": ""} == model.config.to_dict()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, loaded_state[name]), name
    ids = torch.randint(1, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_decay_gate_initialised_as_gated_deltanet():
    """post_init gives every layer Gated DeltaNet's A in [1, 16] and dt in [1e-3, 1e-1], different per head."""
    model = _model(**VARIANTS["gated-efla"], num_heads=8)
    for layer in model.model.layers:
        A, dt = layer.attn.A_log.exp(), torch.nn.functional.softplus(layer.attn.dt_bias)
        assert (A >= 1).all() and (A <= 16).all() and len(A.unique()) == 8
        assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all() and len(dt.unique()) == 8


@pytest.mark.parametrize("variant", ["gated-efla", "gated-delta"])
def test_gated_modes_train(variant):
    """A few AdamW steps on one batch lower the loss, and every parameter (the gate's too) gets a gradient."""
    model = _model(**VARIANTS[variant]).train()
    ids = torch.randint(1, 256, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        if not losses:
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0 and p.grad.isfinite().all(), name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_auto_classes_build_from_config():
    config = transformers.AutoConfig.for_model("efla", **PRESETS["tiny"])
    assert isinstance(config, EFLAConfig)
    assert isinstance(transformers.AutoModelForCausalLM.from_config(config), EFLAForCausalLM)
    assert isinstance(transformers.AutoModel.from_config(config), EFLAModel)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="attn_mode"):
        EFLAConfig(attn_mode="euler")
    with pytest.raises(ValueError, match="attn_layers"):
        EFLAConfig(num_hidden_layers=2, attn_layers=[2])
    with pytest.raises(ValueError, match="num_heads"):
        EFLAConfig(hidden_size=100, num_heads=8)
    with pytest.raises(ValueError, match="preset"):
        preset_config("7B")
    with pytest.raises(ValueError, match="attention_mask"):
        _model()(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3))


@pytest.mark.parametrize("backend", ["torch", "recurrent"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_position_sees_a_later_token(variant, backend):
    """Causality: the logits of every prefix equal the first positions of the whole sequence's logits (prefixes
    ending inside a chunk and on its boundary), and changing one token changes nothing before it. A future-token
    leak would make held-out perplexity look better than the model is."""
    model = _model(**VARIANTS[variant], attn_backend=backend)
    ids = torch.randint(1, 256, (2, 13))
    with torch.no_grad():
        whole = model(ids).logits
        for t in (1, 4, 5, 11):
            torch.testing.assert_close(model(ids[:, :t]).logits, whole[:, :t], atol=ATOL, rtol=0, msg=f"prefix {t}")
            changed = ids.clone()
            changed[:, t] = changed[:, t] % 255 + 1
            after = model(changed).logits
            torch.testing.assert_close(after[:, :t], whole[:, :t], atol=ATOL, rtol=0, msg=f"token {t} changed")
            assert (after[:, t] - whole[:, t]).abs().max() > 1e-4  # the changed token itself is seen


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_documents_match_each_document_alone(variant):
    model = _model(**VARIANTS[variant])
    documents = [torch.randint(1, 256, (n,)) for n in (5, 11, 1, 7)]
    packed = torch.cat(documents)[None]
    cu_seqlens = torch.tensor([0, 5, 16, 17, 24])
    with torch.no_grad():
        out = model(packed, labels=packed, cu_seqlens=cu_seqlens)
        alone = [model(d[None], labels=d[None]) for d in documents]
    torch.testing.assert_close(out.logits[0], torch.cat([a.logits[0] for a in alone]), atol=ATOL, rtol=0)
    # the loss averages the within-document predictions only: 4 + 10 + 0 + 6 of them
    expected = sum(a.loss * (len(d) - 1) for a, d in zip(alone, documents, strict=True) if len(d) > 1) / 20
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)



def _fused_qkv_state(model: EFLAForCausalLM) -> dict[str, torch.Tensor]:
    """The model's state dict in the layout saved before q, k, v were separated: per EFLA layer one qkv_proj and one
    conv over 3 * hidden_size channels (q's, then k's, then v's)."""
    state = dict(model.state_dict())
    for i in range(model.config.num_hidden_layers):
        if i in model.config.attn_layers:
            continue
        for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")),
                             ("conv", ("q_conv1d", "k_conv1d", "v_conv1d"))):
            prefix = f"model.layers.{i}.attn."
            state[f"{prefix}{fused}.weight"] = torch.cat([state.pop(f"{prefix}{p}.weight") for p in parts])
    return state


def test_checkpoint_with_fused_qkv_loads_with_from_pretrained(tmp_path):
    """Checkpoints saved before q, k, v were separated (attn.qkv_proj, attn.conv) load with from_pretrained into the
    same model, and saving it again writes the separate names."""
    from safetensors.torch import load_file, save_file

    model = _model(**VARIANTS["hybrid-gated"])
    old = _fused_qkv_state(model)
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert loaded_state.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, loaded_state[name]), name
    loaded.save_pretrained(tmp_path / "again")
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == state.keys()

    torch.manual_seed(1)
    fresh = EFLAForCausalLM(model.config)
    fresh.load_state_dict(old)  # the layer's own load hook, used by the trainer's checkpoints
    for name, tensor in state.items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
