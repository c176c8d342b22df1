"""fla DeltaNet <-> EFLA conversion: same logits as fla's own model (an independent implementation of the delta mode),
exact round trips both ways, refusals naming the field, and the ``efla convert`` command."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from helpers import rel_err

from efla.cli import main
from efla.models import EFLAConfig, EFLAForCausalLM
from efla.models.convert import (
    config_from_fla,
    config_to_fla,
    from_fla_deltanet,
    save_fla_deltanet,
    to_fla_deltanet,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # fla's kernels need CUDA tensors where CUDA exists
needs_fla = pytest.mark.skipif(importlib.util.find_spec("fla") is None,
                               reason="fla not installed (pip install fla-core flash-linear-attention)")
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2)
VARIANTS = {
    "plain": {},
    "gated-tied": dict(use_gate=True, tie_word_embeddings=True),
    "no-conv": dict(use_short_conv=False, conv_size=3),
}


@pytest.fixture
def fla_models(monkeypatch):
    """fla's Triton kernels run in Triton's interpreter without CUDA (TRITON_INTERPRET=1, tests/conftest.py), which
    cannot time autotuning candidates: keep the first candidate of each."""
    if not torch.cuda.is_available():
        from triton.runtime.autotuner import Autotuner

        prune = Autotuner.prune_configs
        monkeypatch.setattr(Autotuner, "prune_configs", lambda self, kwargs: prune(self, kwargs)[:1])
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    return DeltaNetConfig, DeltaNetForCausalLM


def random_fla_model(fla_models, **overrides):
    """A fla DeltaNetForCausalLM on DEVICE with random weights at trained-model scale: unit-variance projections and
    norm gains away from 1. (At fla's 0.02 init the tiny model's q and k have norms ~1e-3, where fla's L2 norm,
    x / sqrt(|x|^2 + 1e-6), and ours, x / max(|x|, 1e-6), differ: test_default_init_... below.)"""
    DeltaNetConfig, DeltaNetForCausalLM = fla_models
    model = DeltaNetForCausalLM(DeltaNetConfig(**{**TINY, **overrides})).to(DEVICE).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif "conv1d" in name:
                param.uniform_(-0.5, 0.5)
            else:
                param.normal_(0, 1 / math.sqrt(param.shape[-1]))
    return model


@needs_fla
@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_fla_model_gives_fla_logits(fla_models, variant):
    torch.manual_seed(0)
    fla_model = random_fla_model(fla_models, **VARIANTS[variant])
    ours = from_fla_deltanet(fla_model)
    assert ours.config.attn_mode == "delta"
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    with torch.no_grad():
        for attention_mask in (None, mask):
            ref = fla_model(ids, attention_mask=attention_mask).logits.double()
            out = ours(ids, attention_mask=attention_mask).logits.double()
            keep = slice(None) if attention_mask is None else mask.bool()
            assert rel_err(out[keep], ref[keep]) < 1e-5


@needs_fla
def test_converted_model_switches_to_efla(fla_models):
    fla_model = random_fla_model(fla_models)
    delta = from_fla_deltanet(fla_model)
    efla = from_fla_deltanet(fla_model, attn_mode="efla")
    assert efla.config.attn_mode == "efla" and all(layer.attn.mode == "efla" for layer in efla.model.layers)
    for (name, a), (_, b) in zip(delta.state_dict().items(), efla.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, TINY["vocab_size"], (1, 12), device=DEVICE)
    with torch.no_grad():  # the exact step with unnormalised keys is another model: its outputs move
        assert rel_err(efla(ids).logits, delta(ids).logits) > 1e-3


@needs_fla
@pytest.mark.parametrize("variant", VARIANTS)
def test_fla_efla_fla_round_trip_is_exact(fla_models, variant):
    fla_model = random_fla_model(fla_models, **VARIANTS[variant])
    back = to_fla_deltanet(from_fla_deltanet(fla_model))
    assert back.config.to_dict() == fla_model.config.to_dict()
    original, returned = fla_model.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype and torch.equal(returned[name], tensor), name
        assert returned[name].data_ptr() != tensor.data_ptr(), f"{name}: the two models share a parameter"


def random_efla_model(**overrides) -> EFLAForCausalLM:
    torch.manual_seed(0)
    config = EFLAConfig(**{**TINY, "attn_mode": "delta", "initializer_range": 0.3, **overrides})
    model = EFLAForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("overrides", [{}, dict(use_output_gate=True, tie_word_embeddings=True, intermediate_size=96)])
def test_efla_fla_efla_round_trip_through_files_is_exact(tmp_path, overrides):
    model = random_efla_model(**overrides)
    save_fla_deltanet(model, tmp_path)
    back = from_fla_deltanet(tmp_path)
    assert back.config.to_dict() == model.config.to_dict()
    original, returned = model.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype and torch.equal(returned[name], tensor), name
    if overrides.get("tie_word_embeddings"):
        assert back.lm_head.weight is back.model.embed_tokens.weight


@needs_fla
def test_fla_loads_the_exported_checkpoint_with_the_same_logits(fla_models, tmp_path):
    _, DeltaNetForCausalLM = fla_models
    model = random_efla_model(use_output_gate=True)
    save_fla_deltanet(model, tmp_path)
    fla_model = DeltaNetForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    model.to(DEVICE)
    ids = torch.randint(0, TINY["vocab_size"], (2, 20), device=DEVICE)
    with torch.no_grad():
        assert rel_err(model(ids).logits, fla_model(ids).logits) < 1e-5


@needs_fla
def test_default_init_fla_model_gives_fla_logits(fla_models):
    DeltaNetConfig, DeltaNetForCausalLM = fla_models
    torch.manual_seed(0)
    fla_model = DeltaNetForCausalLM(DeltaNetConfig(**TINY)).to(DEVICE).eval()
    ours = from_fla_deltanet(fla_model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), device=DEVICE)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, fla_model(ids).logits) < 1e-5


@needs_fla
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fla's chunked kernels)")
def test_converted_model_matches_fla_chunked_kernels_in_bfloat16(fla_models):
    # past 64 tokens fla's layer runs its chunked kernels, which need bfloat16: compare with ours in float32
    fla_model = random_fla_model(fla_models).to(torch.bfloat16)
    ours = from_fla_deltanet(fla_model).float()
    ids = torch.randint(0, TINY["vocab_size"], (2, 200), device=DEVICE)
    with torch.no_grad():
        assert rel_err(fla_model(ids).logits.float(), ours(ids).logits) < 3e-2


FLA_CONFIG = dict(model_type="delta_net", **TINY)


@pytest.mark.parametrize(("field", "value"), [
    ("qk_activation", "relu"), ("qk_norm", "sum"), ("use_beta", False), ("allow_neg_eigval", True),
    ("expand_k", 0.5), ("expand_v", 2), ("hidden_act", "powlu"), ("attnres_block_size", 2),
    ("attn", {"layers": [1], "num_heads": 2}), ("model_type", "mamba2"),
])
def test_unrepresentable_fla_configs_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        config_from_fla({**FLA_CONFIG, field: value})


def test_fla_config_fields_map_to_ours():
    config = config_from_fla({**FLA_CONFIG, "norm_eps": 1e-5, "use_gate": True, "hidden_ratio": 2, "conv_size": 3,
                              "use_short_conv": False, "tie_word_embeddings": True, "fuse_norm": False})
    assert (config.rms_norm_eps, config.use_output_gate, config.conv_size, config.use_short_conv,
            config.tie_word_embeddings) == (1e-5, True, 3, False, True)
    assert config.intermediate_size == 256  # fla: 2/3 * 2 * 32 rounded up to a multiple of 256
    assert config_from_fla({**FLA_CONFIG, "intermediate_size": 80}).intermediate_size == 80
    defaults = config_from_fla({"model_type": "delta_net"})  # fla's own defaults where ours differ
    assert (defaults.hidden_size, defaults.num_heads, defaults.intermediate_size) == (2048, 16, 5632)


@pytest.mark.parametrize(("overrides", "field"), [(dict(attn_mode="efla"), "attn_mode"),
                                                  (dict(attn_layers=[1]), "attn_layers")])
def test_efla_models_fla_cannot_hold_are_refused(overrides, field):
    with pytest.raises(ValueError, match=field):
        config_to_fla(EFLAConfig(**{**TINY, "attn_mode": "delta", **overrides}))


def test_convert_command_round_trip(tmp_path):
    model = random_efla_model()
    model.save_pretrained(tmp_path / "efla")
    main(["convert", "--to-fla", str(tmp_path / "efla"), "--out", str(tmp_path / "fla")])
    assert json.loads((tmp_path / "fla" / "config.json").read_text())["model_type"] == "delta_net"
    main(["convert", "--from-fla", str(tmp_path / "fla"), "--out", str(tmp_path / "back")])
    back = EFLAForCausalLM.from_pretrained(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    main(["convert", "--from-fla", str(tmp_path / "fla"), "--out", str(tmp_path / "as-efla"), "--attn-mode", "efla"])
    assert EFLAForCausalLM.from_pretrained(tmp_path / "as-efla").config.attn_mode == "efla"


def test_convert_command_refuses_bad_input_without_touching_files(tmp_path, capsys):
    model = random_efla_model(attn_mode="efla")
    model.save_pretrained(tmp_path / "efla-mode")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("finished work")
    capsys.readouterr()
    cases = [
        (["--to-fla", str(tmp_path / "efla-mode"), "--out", str(tmp_path / "taken")], "--out"),
        (["--to-fla", str(tmp_path / "efla-mode"), "--out", str(tmp_path / "new")], "attn_mode"),
        (["--from-fla", str(tmp_path / "efla-mode"), "--out", str(tmp_path / "new")], "model_type"),
        (["--from-fla", str(tmp_path / "missing"), "--out", str(tmp_path / "new")], "config.json"),
    ]
    for argv, named in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", *argv])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars, if any
        assert error.startswith("efla convert: error: ") and named in error, error
    assert (tmp_path / "taken" / "keep.txt").read_text() == "finished work"
    assert not (tmp_path / "new").exists()


# ---- fla Gated DeltaNet <-> EFLA with the decay gate ------------------------------------------------------------

GATED_TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16, expand_v=1)


def random_fla_gated_model(**overrides):
    """A fla GatedDeltaNetForCausalLM on DEVICE at trained-model scale (as random_fla_model); A_log and dt_bias keep
    fla's Gated DeltaNet initialisation."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**{**GATED_TINY, **overrides})).to(DEVICE).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif "conv1d" in name:
                param.uniform_(-0.5, 0.5)
            elif not name.endswith(("A_log", "dt_bias")):
                param.normal_(0, 1 / math.sqrt(param.shape[-1]))
    return model


@needs_fla
@pytest.mark.parametrize("use_gate", [True, False])
def test_converted_fla_gated_deltanet_gives_fla_logits(fla_models, use_gate):
    """fla's Gated DeltaNet becomes EFLA's delta mode with the decay gate, with fla's logits (also left-padded);
    the way back gives fla's config and tensors exactly."""
    fla_model = random_fla_gated_model(use_gate=use_gate)
    ours = from_fla_deltanet(fla_model)
    assert (ours.config.attn_mode, ours.config.use_decay_gate, ours.config.use_output_gate) == ("delta", True, use_gate)
    ids = torch.randint(0, GATED_TINY["vocab_size"], (2, 24), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        for attention_mask in (None, mask):
            ref = fla_model(ids, attention_mask=attention_mask).logits.double()
            out = ours(ids, attention_mask=attention_mask).logits.double()
            keep = slice(None) if attention_mask is None else mask.bool()
            assert rel_err(out[keep], ref[keep]) < 1e-5
    back = to_fla_deltanet(ours)
    assert back.config.to_dict() == fla_model.config.to_dict()
    for name, tensor in fla_model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_gated_efla_fla_efla_round_trip_through_files_is_exact(tmp_path):
    model = random_efla_model(use_decay_gate=True, use_output_gate=True)
    save_fla_deltanet(model, tmp_path)
    fla_config = json.loads((tmp_path / "config.json").read_text())
    assert (fla_config["model_type"], fla_config["architectures"], fla_config["head_dim"], fla_config["expand_v"]) \
        == ("gated_deltanet", ["GatedDeltaNetForCausalLM"], 16, 1)
    back = from_fla_deltanet(tmp_path)
    assert back.config.to_dict() == model.config.to_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize(("field", "value"), [
    ("head_dim", 8), ("expand_v", 2), ("num_v_heads", 4), ("output_gate_activation", "sigmoid"),
    ("allow_neg_eigval", True),
])
def test_unrepresentable_fla_gated_configs_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        config_from_fla({"model_type": "gated_deltanet", **GATED_TINY, field: value})


def test_fla_gated_defaults_apply_where_the_file_leaves_them_out():
    """A config.json without expand_v means fla's default 2 (refused); fla's other Gated DeltaNet defaults are its."""
    with pytest.raises(ValueError, match="expand_v"):
        config_from_fla({"model_type": "gated_deltanet"})
    config = config_from_fla({"model_type": "gated_deltanet", "expand_v": 1, "hidden_size": 1536})
    assert (config.num_heads, config.num_hidden_layers, config.use_output_gate, config.use_decay_gate) == \
        (6, 21, True, True)
