"""Conversion between fla's DeltaNet language model (``DeltaNetForCausalLM``, model_type "delta_net") and EFLA's, and
between fla's Gated DeltaNet (``GatedDeltaNetForCausalLM``, model_type "gated_deltanet") and EFLA with the decay gate.

EFLA's delta mode is DeltaNet's architecture: a fla DeltaNet checkpoint becomes an ``EFLAForCausalLM`` with
``attn_mode="delta"`` and the same outputs, which can then run (or be fine-tuned) as EFLA with ``attn_mode="efla"``;
an EFLA model in delta mode exports to fla's layout. The weights carry over unchanged: only the embedding's name
differs (fla ``model.embeddings``, efla ``model.embed_tokens``). Config fields:

    fla DeltaNetConfig                     EFLAConfig
    norm_eps                               rms_norm_eps
    use_gate                               use_output_gate
    intermediate_size or hidden_ratio      intermediate_size (fla: 2/3 * ratio * hidden_size up to a multiple of 256)
    vocab_size, hidden_size, num_hidden_layers, num_heads, use_short_conv, conv_size, max_position_embeddings,
    initializer_range, use_cache, tie_word_embeddings, pad/bos/eos_token_id: the same

Gated DeltaNet is EFLA's delta mode with ``use_decay_gate`` (the same names: ``a_proj``, ``A_log``, ``dt_bias``), for
fla models whose heads EFLA can hold: head_dim * num_heads = hidden_size, expand_v = 1, as many value heads as key
heads, silu output gate. Its config.json defaults that differ from ours (hidden_size 2048, num_heads 6, head_dim 256,
expand_v 2, use_gate on, 21 layers) apply where a file leaves them out.

fla settings that choose kernels or training-time fusions (attn_mode, fuse_norm, fuse_swiglu, fuse_cross_entropy,
fuse_linear_cross_entropy, use_l2warp) do not change the model's outputs and are not carried; exports write fla's
defaults. fla models EFLA cannot represent are refused, naming the field. Files are read and written with
safetensors only: converting checkpoints does not need fla installed.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efla.models.configuration_efla import EFLAConfig
from efla.models.modeling_efla import EFLAForCausalLM

FLA_MODEL_TYPE = "delta_net"
FLA_ARCHITECTURE = "DeltaNetForCausalLM"
FLA_GATED_MODEL_TYPE = "gated_deltanet"
FLA_GATED_ARCHITECTURE = "GatedDeltaNetForCausalLM"
EMBEDDING = ("model.embeddings.weight", "model.embed_tokens.weight")  # (fla, efla)

# fla fields that must hold these values for EFLA to represent the model: field -> (required value, why)
_FLA_REQUIREMENTS: dict[str, tuple[Any, str]] = {
    "qk_activation": ("silu", "EFLA's q and k go through SiLU"),
    "qk_norm": ("l2", "EFLA's delta mode L2-normalises q and k"),
    "use_beta": (True, "EFLA learns beta from b_proj"),
    "allow_neg_eigval": (False, "EFLA's beta lies in (0, 1)"),
    "expand_k": (1, "EFLA's key head dim is hidden_size / num_heads"),
    "expand_v": (1, "EFLA's value head dim is hidden_size / num_heads"),
    "hidden_act": ("swish", "EFLA's MLP is SwiGLU"),
    "attn": (None, "fla's softmax-attention layers use rotary embeddings, EFLA's hybrid layers have none"),
    "attnres_block_size": (None, "EFLA has plain residual connections"),
}
# the same for fla Gated DeltaNet (head_dim and num_v_heads are checked against the sizes in config_from_fla)
_FLA_GATED_REQUIREMENTS: dict[str, tuple[Any, str]] = {
    "allow_neg_eigval": (False, "EFLA's beta lies in (0, 1)"),
    "expand_v": (1, "EFLA's value head dim is its key head dim"),
    "hidden_act": ("swish", "EFLA's MLP is SwiGLU"),
    "output_gate_activation": ("swish", "EFLA's output gate is silu"),
    "attn": (None, "fla's softmax-attention layers use rotary embeddings, EFLA's hybrid layers have none"),
    "attnres_block_size": (None, "EFLA has plain residual connections"),
}
# efla field -> fla field, for the fields that only change name (or not even that)
_SHARED_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
    "num_heads": "num_heads", "use_short_conv": "use_short_conv", "conv_size": "conv_size",
    "use_output_gate": "use_gate", "rms_norm_eps": "norm_eps", "initializer_range": "initializer_range",
    "max_position_embeddings": "max_position_embeddings", "use_cache": "use_cache",
    "tie_word_embeddings": "tie_word_embeddings", "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
# fla DeltaNetConfig's defaults that differ from EFLAConfig's, for config.json files that leave them out
_FLA_SIZE_DEFAULTS = {"hidden_size": 2048, "num_heads": 16}
_FLA_GATED_DEFAULTS = {"hidden_size": 2048, "num_heads": 6, "head_dim": 256, "expand_v": 2.0, "use_gate": True,
                       "num_hidden_layers": 21}
# fla DeltaNetConfig's defaults for the fields EFLA does not carry, written on export
_FLA_RUNTIME_DEFAULTS = {
    "attn_mode": "chunk", "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True,
    "fuse_linear_cross_entropy": False, "use_l2warp": False, "use_output_norm": True,
}


def fla_intermediate_size(hidden_size: int, hidden_ratio: float | None) -> int:
    """fla GatedMLP's width when intermediate_size is not given: 2/3 * ratio * hidden_size, up to a multiple of 256."""
    width = int(hidden_size * (4 if hidden_ratio is None else hidden_ratio) * 2 / 3)
    return 256 * math.ceil(width / 256)


def config_from_fla(fla_config: Mapping[str, Any], attn_mode: str = "delta") -> EFLAConfig:
    """The EFLAConfig of a fla DeltaNetConfig or GatedDeltaNetConfig (given as its dict, e.g. config.json);
    ValueError naming the field when EFLA cannot represent the model."""
    model_type = fla_config.get("model_type")
    if model_type not in (FLA_MODEL_TYPE, FLA_GATED_MODEL_TYPE):
        raise ValueError(f"model_type is {model_type!r}, not fla DeltaNet's {FLA_MODEL_TYPE!r} or Gated DeltaNet's "
                         f"{FLA_GATED_MODEL_TYPE!r}")
    gated = model_type == FLA_GATED_MODEL_TYPE
    fla_config = {**(_FLA_GATED_DEFAULTS if gated else _FLA_SIZE_DEFAULTS), **fla_config}
    for field, (required, why) in (_FLA_GATED_REQUIREMENTS if gated else _FLA_REQUIREMENTS).items():
        value = fla_config.get(field, required)
        if value != required:
            raise ValueError(f"fla config field {field}={value!r} is not supported (needs {required!r}: {why})")
    if gated:
        heads, width = fla_config["num_heads"], fla_config["hidden_size"]
        if fla_config["head_dim"] * heads != width:
            raise ValueError(f"fla config field head_dim={fla_config['head_dim']} is not supported (needs "
                             f"hidden_size / num_heads = {width / heads:g}: EFLA's heads split hidden_size)")
        if fla_config.get("num_v_heads") not in (None, heads):
            raise ValueError(f"fla config field num_v_heads={fla_config['num_v_heads']} is not supported (needs "
                             f"num_heads = {heads}: EFLA has as many value heads as key heads)")
    intermediate_size = fla_config.get("intermediate_size")
    if intermediate_size is None:
        intermediate_size = fla_intermediate_size(fla_config["hidden_size"], fla_config.get("hidden_ratio"))
    shared = {ours: fla_config[theirs] for ours, theirs in _SHARED_FIELDS.items() if theirs in fla_config}
    return EFLAConfig(**shared, intermediate_size=intermediate_size, attn_mode=attn_mode, use_decay_gate=gated)


def config_to_fla(config: EFLAConfig) -> dict[str, Any]:
    """The fla DeltaNetConfig (GatedDeltaNetConfig with the decay gate), as the dict of its config.json, of an EFLA
    config in delta mode."""
    if config.attn_mode != "delta":
        raise ValueError(f"attn_mode is {config.attn_mode!r}: fla's DeltaNet is EFLA's 'delta' mode, whose outputs "
                         "differ; convert a model with attn_mode='delta'")
    if config.attn_layers:
        raise ValueError(f"attn_layers={config.attn_layers}: EFLA's softmax-attention layers (no rotary embeddings) "
                         "have no fla DeltaNet counterpart")
    fla_config = {theirs: getattr(config, ours) for ours, theirs in _SHARED_FIELDS.items()}
    default_width = fla_intermediate_size(config.hidden_size, 4)
    fla_config.update(hidden_ratio=4,
                      intermediate_size=None if config.intermediate_size == default_width else config.intermediate_size)
    if getattr(config, "use_decay_gate", False):
        runtime = {name: value for name, value in _FLA_RUNTIME_DEFAULTS.items() if name != "use_output_norm"}
        fla_config.update(model_type=FLA_GATED_MODEL_TYPE, head_dim=config.hidden_size // config.num_heads,
                          num_v_heads=None, **{field: required for field, (required, _) in
                                               _FLA_GATED_REQUIREMENTS.items()}, **runtime)
        return fla_config
    fla_config.update(model_type=FLA_MODEL_TYPE, **{field: required for field, (required, _) in
                                                    _FLA_REQUIREMENTS.items()}, **_FLA_RUNTIME_DEFAULTS)
    return fla_config


def state_dict_from_fla(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fla DeltaNetForCausalLM parameter names -> EFLAForCausalLM's (the tensors themselves are kept)."""
    return {EMBEDDING[1] if name == EMBEDDING[0] else name: tensor for name, tensor in state_dict.items()}


def state_dict_to_fla(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EFLAForCausalLM parameter names -> fla DeltaNetForCausalLM's (the tensors themselves are kept)."""
    return {EMBEDDING[0] if name == EMBEDDING[1] else name: tensor for name, tensor in state_dict.items()}


def from_fla_deltanet(source: str | Path | nn.Module, attn_mode: str = "delta") -> EFLAForCausalLM:
    """An EFLAForCausalLM holding the weights of a fla DeltaNetForCausalLM or GatedDeltaNetForCausalLM: the model
    itself, or a checkpoint directory (config.json and safetensors). With attn_mode="delta" it gives fla's outputs;
    "efla" runs the same weights with the exact step (gated EFLA for Gated DeltaNet)."""
    if isinstance(source, nn.Module):  # copies: the two models must not share parameters
        fla_config, fla_state = source.config.to_dict(), _copied(source.state_dict())
    else:
        fla_config, fla_state = _read_checkpoint(Path(source))
    config = config_from_fla(fla_config, attn_mode)
    return _model_with_weights(config, state_dict_from_fla(fla_state))


def to_fla_deltanet(model: EFLAForCausalLM) -> nn.Module:
    """A fla DeltaNetForCausalLM (GatedDeltaNetForCausalLM with the decay gate; needs fla installed) holding the
    weights of an EFLA model in delta mode."""
    with torch.device("meta"):
        fla_model = _fla_model(config_to_fla(model.config))
    _load_all(fla_model, state_dict_to_fla(_copied(model.state_dict())))
    return fla_model


def fla_model_like(config: EFLAConfig) -> nn.Module:
    """A randomly initialised fla DeltaNetForCausalLM (GatedDeltaNetForCausalLM with the decay gate; needs fla) of
    the architecture of ``config`` taken in delta mode, fla's fused kernels and loss at their defaults: the model a
    benchmark sets beside ours."""
    delta = copy.deepcopy(config)
    delta.attn_mode = "delta"
    return _fla_model(config_to_fla(delta))


def _fla_model(fla_config: dict[str, Any]) -> nn.Module:
    """fla's causal LM for the dict of a fla config.json (DeltaNet or Gated DeltaNet)."""
    from fla import models

    gated = fla_config["model_type"] == FLA_GATED_MODEL_TYPE
    config_class = models.GatedDeltaNetConfig if gated else models.DeltaNetConfig
    model_class = models.GatedDeltaNetForCausalLM if gated else models.DeltaNetForCausalLM
    return model_class(config_class(**fla_config))


def save_fla_deltanet(model: EFLAForCausalLM, out_dir: str | Path) -> None:
    """Write an EFLA model in delta mode as a fla DeltaNet (or Gated DeltaNet) checkpoint: config.json and
    model.safetensors."""
    fla_config = config_to_fla(model.config)
    gated = fla_config["model_type"] == FLA_GATED_MODEL_TYPE
    fla_config["architectures"] = [FLA_GATED_ARCHITECTURE if gated else FLA_ARCHITECTURE]
    state = state_dict_to_fla(model.state_dict())
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # tied to the embedding; fla ties it back on load
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(fla_config, indent=2, sort_keys=True) + "\n")


def _copied(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in state_dict.items()}


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and every safetensors file of a checkpoint directory (single file or shards)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a checkpoint directory: it has no config.json")
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise ValueError(f"{path} has no *.safetensors weights (save the fla model with save_pretrained)")
    state: dict[str, torch.Tensor] = {}
    for file in weight_files:
        state.update(load_file(file))
    return json.loads(config_file.read_text()), state


def _model_with_weights(config: EFLAConfig, state_dict: dict[str, torch.Tensor]) -> EFLAForCausalLM:
    """EFLAForCausalLM(config) whose parameters are exactly ``state_dict``'s tensors (no random init)."""
    with torch.device("meta"):
        model = EFLAForCausalLM(config)
    _load_all(model, state_dict)
    return model.eval()


def _load_all(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Assign every parameter of a meta-device model from state_dict; the output embedding may be left out when
    tied. Raises ValueError naming missing or unexpected weights."""
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = model.config.tie_word_embeddings
    missing = [name for name in result.missing_keys if not (tied and name == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not match the config: missing {missing}, unexpected {result.unexpected_keys}")
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
