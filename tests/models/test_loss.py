"""The chunked linear + cross-entropy: loss and gradients equal the plain all-logits computation; the model uses it."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from efla.models.loss import causal_lm_loss, linear_cross_entropy, linear_cross_entropy_reference


def _inputs(dtype: torch.dtype, N: int = 37, D: int = 24, V: int = 53):
    hidden = (torch.randn(N, D) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, D).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < 0.3] = -100
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets):
    loss = fn(hidden, weight, targets)
    return (loss, *torch.autograd.grad(loss * 1.7, (hidden, weight)))


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_float32_equals_the_plain_computation(chunk_size):
    for _ in range(3):  # fresh inputs each time
        hidden, weight, targets = _inputs(torch.float32)
        ours = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=chunk_size), hidden, weight, targets)
        plain = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
        for name, x, ref in zip(("loss", "grad hidden", "grad weight"), ours, plain, strict=True):
            assert x.dtype == ref.dtype
            assert rel_err(x, ref) < 1e-6, name


def test_bfloat16_is_as_accurate_as_the_plain_computation():
    """bf16 inputs: the same bf16 logits as the plain computation, so the same loss to float32 rounding; the
    gradients are as close to the float64 truth as the plain ones (the weight's is summed in float32)."""
    hidden, weight, targets = _inputs(torch.bfloat16, N=64)
    ours = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=7), hidden, weight, targets)
    plain = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    truth = _loss_and_grads(linear_cross_entropy_reference, h64, w64, targets)
    assert rel_err(ours[0], plain[0]) < 1e-6
    for name, x, p, t in zip(("grad hidden", "grad weight"), ours[1:], plain[1:], truth[1:], strict=True):
        assert x.dtype == torch.bfloat16, name
        assert rel_err(x, t) <= 1.5 * rel_err(p, t) + 1e-3, name


def test_causal_lm_loss_divides_by_num_items_in_batch():
    hidden, weight, targets = _inputs(torch.float32)
    total = linear_cross_entropy_reference(hidden, weight, targets)
    count = (targets != -100).sum()
    torch.testing.assert_close(causal_lm_loss(hidden, weight, targets), total / count, atol=0, rtol=1e-6)
    torch.testing.assert_close(causal_lm_loss(hidden, weight, targets, num_items_in_batch=torch.tensor(100)),
                               total / 100, atol=0, rtol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1])


def test_no_gradient_is_formed_without_grad():
    hidden, weight, targets = _inputs(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, targets).detach(), atol=0,
                               rtol=1e-6)


def test_model_training_loss_skips_logits_and_equals_the_plain_loss():
    """In training mode with labels the model returns no logits and a loss (and gradients) equal to the plain
    cross-entropy of its full logits; in eval mode the logits come back and the loss is the same."""
    pytest.importorskip("transformers")
    from efla.models import EFLAForCausalLM, preset_config

    torch.manual_seed(0)
    V = 320  # not the width of any other activation (the tiny MLP's gate and up side by side are 256 wide)
    model = EFLAForCausalLM(preset_config("tiny", initializer_range=0.1, chunk_size=4, vocab_size=V)).train()
    ids = torch.randint(1, V, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100
    parameters = {p.data_ptr() for p in model.parameters()}
    saved_logits = []

    def keep(tensor):
        vocab_wide = tensor.dim() > 0 and tensor.shape[-1] == V and tensor.numel() >= ids.numel() * V
        if vocab_wide and tensor.data_ptr() not in parameters:
            saved_logits.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = model(ids, labels=labels)
    assert out.logits is None
    assert saved_logits == []  # nothing the size of all tokens' logits is kept for the backward
    grads = torch.autograd.grad(out.loss, list(model.parameters()))

    logits = model(ids).logits
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    torch.testing.assert_close(out.loss, plain, atol=0, rtol=1e-6)
    for (name, _), g, p in zip(model.named_parameters(), grads, plain_grads, strict=True):
        assert rel_err(g, p) < 1e-5, name

    model.eval()
    with torch.no_grad():
        evaluated = model(ids, labels=labels)
    torch.testing.assert_close(evaluated.logits, logits.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(evaluated.loss, plain.detach(), atol=0, rtol=1e-6)
