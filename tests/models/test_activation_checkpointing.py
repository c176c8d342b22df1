"""Activation checkpointing policies "selective" | "full" (``activation_checkpointing_enable``), against none: the same
loss and gradients, fewer saved bytes; old config.json files that stored the policy still load."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from helpers import kept_for_backward, rel_err, storage_bytes

from efla.layers import EFLAttention
from efla.models import EFLAConfig, EFLAForCausalLM, preset_config
from efla.models.modeling_efla import EFLABlock

MODES = ("none", "selective", "full")
VARIANTS = {
    "efla": dict(),
    "delta-gated-hybrid": dict(attn_mode="delta", use_output_gate=True, num_hidden_layers=3, attn_layers=[1]),
    "decay-gated": dict(use_decay_gate=True),
}


def checkpointed_model(config: EFLAConfig, mode: str) -> EFLAForCausalLM:
    """EFLAForCausalLM(config) in training mode under the policy ``mode`` ("none": no checkpointing)."""
    torch.manual_seed(0)
    model = EFLAForCausalLM(config).train()
    if mode != "none":
        model.activation_checkpointing_enable({"policy": mode})
    return model


def _loss_and_grads(mode: str, overrides: dict, ids: torch.Tensor, mask: torch.Tensor | None, autocast: bool):
    model = checkpointed_model(preset_config("tiny", initializer_range=0.1, chunk_size=4, **overrides), mode)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, attention_mask=mask, labels=ids).loss
    return loss, dict(zip([n for n, _ in model.named_parameters()],
                          torch.autograd.grad(loss, list(model.parameters())), strict=True))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("padded", [False, True])
def test_modes_give_the_same_loss_and_gradients(variant, padded):
    ids = torch.randint(1, 256, (2, 11))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
    reference_loss, reference_grads = _loss_and_grads("none", VARIANTS[variant], ids, mask, autocast=False)
    for mode in MODES[1:]:
        loss, grads = _loss_and_grads(mode, VARIANTS[variant], ids, mask, autocast=False)
        torch.testing.assert_close(loss, reference_loss, atol=0, rtol=1e-6, msg=mode)
        for name, grad in grads.items():  # float32 rounding: the backward sums in another order
            assert rel_err(grad, reference_grads[name]) < 1e-5, f"{mode} {name}"


def test_selective_recomputes_under_the_forwards_autocast():
    """The backward recomputes the element-wise regions in bf16 autocast as the forward ran them: same gradients."""
    ids = torch.randint(1, 256, (2, 9))
    overrides = VARIANTS["delta-gated-hybrid"]
    reference_loss, reference_grads = _loss_and_grads("none", overrides, ids, None, autocast=True)
    loss, grads = _loss_and_grads("selective", overrides, ids, None, autocast=True)
    torch.testing.assert_close(loss, reference_loss, atol=0, rtol=1e-6)
    for name, grad in grads.items():
        assert rel_err(grad, reference_grads[name]) < 1e-5, name


def saved_bytes_per_token(config: EFLAConfig, mode: str, tokens: int = 64) -> float:
    """Bytes one EFLA block keeps for its backward per token (distinct storages, parameters excluded) under the policy
    ``mode``, counted with saved-tensor hooks."""
    model = checkpointed_model(config, mode)
    block = model.model.layers[0]
    assert isinstance(block, EFLABlock)
    x = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
    _, kept = kept_for_backward(lambda: block(x, None, None, None))
    return storage_bytes(kept, {p.untyped_storage().data_ptr() for p in model.parameters()}) / tokens


def test_selective_saves_substantially_fewer_bytes():
    config = preset_config("tiny", chunk_size=16, attn_backend="torch")
    per_token = {mode: saved_bytes_per_token(config, mode) for mode in MODES}
    # the norms and SwiGLU keep only their inputs in every mode; selective also drops, per q/k/v stream, at least one
    # float32 hidden-wide intermediate of the convolution + SiLU + L2 norm
    assert per_token["none"] - per_token["selective"] >= 3 * 64 * 4, per_token
    assert per_token["full"] <= 4 * 64, per_token  # the block's float32 input only


def test_policies_switch_and_disable():
    model = checkpointed_model(preset_config("tiny"), "selective")
    layers = [m for m in model.modules() if isinstance(m, EFLAttention)]
    assert all(layer.recompute for layer in layers) and not model.is_activation_checkpointing
    model.activation_checkpointing_enable()  # transformers' default: full
    assert model.is_activation_checkpointing and not any(layer.recompute for layer in layers)
    with pytest.warns(FutureWarning):  # transformers' older name reaches the same method
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"policy": "selective"})
    assert all(layer.recompute for layer in layers) and not model.is_activation_checkpointing
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing and not any(layer.recompute for layer in layers)


def test_bad_policy_is_named():
    model = EFLAForCausalLM(preset_config("tiny"))
    with pytest.raises(ValueError, match=r"\['policy'\] must be one of"):
        model.activation_checkpointing_enable({"policy": "some"})
    with pytest.raises(ValueError, match="'selective' policy takes no other options"):
        model.activation_checkpointing_enable({"policy": "selective", "use_reentrant": False})


def test_old_configs_with_the_policy_still_load(tmp_path):
    """config.json files written when the policy was a config field load, and the field is dropped."""
    EFLAForCausalLM(preset_config("tiny")).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(config_file.read_text().replace('"attn_mode"', '"activation_checkpointing": "full",\n  '
                                                                          '"attn_mode"', 1))
    assert '"activation_checkpointing": "full"' in config_file.read_text()
    model = EFLAForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(model.config, "activation_checkpointing") and not model.is_activation_checkpointing
    assert "activation_checkpointing" not in model.config.to_dict()
