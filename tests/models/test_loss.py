"""The chunked linear + cross-entropy: loss and gradients equal the plain all-logits computation, through PyTorch
and through the fused Triton kernel (what CUDA runs; the interpreter on CPU); the model uses it."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from helpers import rel_err

import efla.models.loss as loss_module
from efla.models.loss import causal_lm_loss, linear_cross_entropy, linear_cross_entropy_reference

PATHS = ["torch", "triton"]


def _use_path(path: str, monkeypatch) -> None:
    """path "triton": the fused kernel (needs triton and a GPU or TRITON_INTERPRET=1), else the PyTorch formulas."""
    if path == "torch":
        monkeypatch.setattr(loss_module, "_fused", lambda x: False)
        return
    if importlib.util.find_spec("triton") is None or (not torch.cuda.is_available()
                                                        and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("the Triton kernel needs triton and a GPU or TRITON_INTERPRET=1")
    monkeypatch.setattr(loss_module, "_fused", lambda x: True)


def _inputs(dtype: torch.dtype, N: int = 37, D: int = 24, V: int = 53):
    hidden = (torch.randn(N, D) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, D).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < 0.3] = -100
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets):
    loss = fn(hidden, weight, targets)
    return (loss, *torch.autograd.grad(loss * 1.7, (hidden, weight)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_float32_equals_the_plain_computation(chunk_size, path, monkeypatch):
    _use_path(path, monkeypatch)
    for _ in range(3):  # fresh inputs each time
        hidden, weight, targets = _inputs(torch.float32)
        ours = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=chunk_size), hidden, weight, targets)
        plain = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
        for name, x, ref in zip(("loss", "grad hidden", "grad weight"), ours, plain, strict=True):
            assert x.dtype == ref.dtype
            assert rel_err(x, ref) < 1e-6, name


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_is_as_accurate_as_the_plain_computation(path, monkeypatch):
    """bf16 inputs: the same bf16 logits as the plain computation, so the same loss to float32 rounding; the
    gradients are as close to the float64 truth as the plain ones (the weight's is summed in float32)."""
    _use_path(path, monkeypatch)
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


@pytest.mark.parametrize("path", PATHS)
def test_no_gradient_is_formed_without_grad(path, monkeypatch):
    _use_path(path, monkeypatch)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel_matches_float64(dtype, monkeypatch):
    """The kernel alone over rows wider than its lane block (5,000 logits, two blocks and a ragged tail), logits up
    to +-3,000 (exp overflows without the running max), ignored rows: loss and gradient against float64."""
    _use_path("triton", monkeypatch)
    from efla.modules.triton.cross_entropy import cross_entropy_rows_

    rows, V = 6, 5000
    logits = (torch.randn(rows, V) * torch.tensor([1.0, 30.0, 3000.0, 1.0, 5.0, 0.1])[:, None]).to(dtype)
    targets = torch.randint(0, V, (rows,))
    targets[3] = -100
    truth = logits.double()
    log_p = truth.log_softmax(-1)
    counted = targets != -100
    want_loss = torch.where(counted, -log_p.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    want_grad = (log_p.exp() - torch.nn.functional.one_hot(targets.clamp(min=0), V)) * counted[:, None]
    loss = torch.empty(rows)
    grad = logits.clone()
    cross_entropy_rows_(grad, targets, loss, ignore_index=-100)
    assert rel_err(loss, want_loss) < 1e-6
    assert loss[3] == 0 and (grad[3] == 0).all()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(grad, want_grad) < tolerance
    loss_only = torch.empty(rows)
    untouched = logits.clone()
    cross_entropy_rows_(untouched, targets, loss_only, ignore_index=-100, write_grad=False)
    assert torch.equal(untouched, logits) and torch.equal(loss_only, loss)


@pytest.mark.parametrize("path", PATHS)
def test_strided_targets_are_read_as_given(path, monkeypatch):
    """Targets as a strided view (every other label), as a caller may slice them."""
    _use_path(path, monkeypatch)
    hidden, weight, _ = _inputs(torch.float32, N=20)
    every_other = torch.randint(0, weight.shape[0], (40,))[::2]
    ours = linear_cross_entropy(hidden, weight, every_other, chunk_size=7)
    torch.testing.assert_close(ours, linear_cross_entropy_reference(hidden, weight, every_other), atol=0, rtol=1e-6)


def test_cross_entropy_kernel_gives_nan_for_a_target_outside_the_vocabulary(monkeypatch):
    _use_path("triton", monkeypatch)
    from efla.modules.triton.cross_entropy import cross_entropy_rows_

    logits = torch.randn(3, 10)
    loss = torch.empty(3)
    cross_entropy_rows_(logits, torch.tensor([2, 10, -100]), loss, ignore_index=-100)
    assert loss[0].isfinite() and loss[1].isnan() and loss[2] == 0
