"""activation_checkpointing "none" | "selective" | "full": the same loss and gradients, fewer saved bytes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from helpers import rel_err

from efla.models import EFLAConfig, EFLAForCausalLM, preset_config
from efla.models.modeling_efla import EFLABlock

MODES = ("none", "selective", "full")
VARIANTS = {
    "efla": dict(),
    "delta-gated-hybrid": dict(attn_mode="delta", use_output_gate=True, num_hidden_layers=3, attn_layers=[1]),
    "decay-gated": dict(use_decay_gate=True),
}


def _loss_and_grads(mode: str, overrides: dict, ids: torch.Tensor, mask: torch.Tensor | None, autocast: bool):
    torch.manual_seed(0)
    config = preset_config("tiny", initializer_range=0.1, chunk_size=4, activation_checkpointing=mode, **overrides)
    model = EFLAForCausalLM(config).train()
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


def saved_bytes_per_token(config: EFLAConfig, tokens: int = 64) -> float:
    """Bytes one EFLA block keeps for its backward per token (distinct storages, parameters excluded), counted with
    saved-tensor hooks; "full" runs the block as the model does (checkpointed)."""
    torch.manual_seed(0)
    model = EFLAForCausalLM(config).train()
    block = model.model.layers[0]
    assert isinstance(block, EFLABlock)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model._run_block(block, x, None, None, None)
    return sum(saved.values()) / tokens


def test_selective_saves_substantially_fewer_bytes():
    per_token = {mode: saved_bytes_per_token(preset_config("tiny", activation_checkpointing=mode, chunk_size=16,
                                                           attn_backend="torch")) for mode in MODES}
    # the norms and SwiGLU keep only their inputs in every mode; selective also drops, per q/k/v stream, at least one
    # float32 hidden-wide intermediate of the convolution + SiLU + L2 norm
    assert per_token["none"] - per_token["selective"] >= 3 * 64 * 4, per_token
    assert per_token["full"] <= 4 * 64, per_token  # the block's float32 input only


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        EFLAConfig(activation_checkpointing="some")
