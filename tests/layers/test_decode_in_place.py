"""The layer's in-place one-token step (``EFLAttention.step``): its Triton kernels against float64 references, and the
layer's kernel path against its PyTorch path (on CPU the kernels run in Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err, require_triton_kernels

from efla import efla_attention
from efla.layers import EFLAttention
from efla.layers import attention as attention_module
from efla.modules.triton.decode_step import conv_step_in_place, conv_step_op, recurrent_step, recurrent_step_op

DEVICE = require_triton_kernels()


def _conv_step_reference(proj, weight, window, H, l2_k, eps=1e-6):
    """float64: silu(taps . [window, x]) per channel, L2 norm per head of q (and k), sigmoid of beta's logits."""
    C3 = weight.shape[0]
    x = proj[:, :C3].double()
    full = torch.cat([window.double(), x[..., None]], -1)  # [B, 3C, W]
    y = F.silu((full * weight.double()).sum(-1)).unflatten(-1, (3, H, C3 // (3 * H)))
    normed = y * torch.rsqrt(y.square().sum(-1, keepdim=True) + eps)
    y = torch.stack([normed[:, 0], normed[:, 1] if l2_k else y[:, 1], y[:, 2]], 1)
    return y.flatten(1), proj[:, C3:].double().sigmoid(), full[..., 1:]


@pytest.mark.parametrize("step", [conv_step_in_place, conv_step_op], ids=["eager", "custom-op"])
@pytest.mark.parametrize("D,W,l2_k", [(16, 4, False), (32, 2, True), (16, 3, True)])
def test_conv_step_matches_float64(D, W, l2_k, step):
    torch.manual_seed(D + W)
    B, H = 3, 2
    C = H * D
    proj = torch.randn(B, 3 * C + H, device=DEVICE)
    weight = torch.randn(3 * C, W, device=DEVICE) * 0.5
    window = torch.randn(B, 3 * C, W - 1, device=DEVICE)
    act_ref, beta_ref, window_ref = _conv_step_reference(proj, weight, window, H, l2_k)
    act, beta = step(proj, weight, window, H, l2_k)
    assert rel_err(act, act_ref) < 1e-6 and rel_err(beta, beta_ref) < 1e-6
    assert rel_err(window, window_ref) == 0  # the inputs themselves, moved


@pytest.mark.parametrize("step", [recurrent_step, recurrent_step_op], ids=["eager", "custom-op"])
@pytest.mark.parametrize("mode,gated", [("efla", False), ("delta", False), ("efla", True)])
def test_recurrent_step_advances_the_state_in_place(mode, gated, step):
    torch.manual_seed(7)
    B, H, K = 3, 2, 16
    q, k, v = (torch.randn(B, 1, H, K) for _ in range(3))
    if mode == "delta":
        k = F.normalize(k, dim=-1)
    beta, g = torch.rand(B, 1, H), -torch.rand(B, 1, H) if gated else None
    state = torch.randn(B, H, K, K)
    o_ref, state_ref = efla_attention(*(x.double() for x in (q, k, v, beta)), initial_state=state.double(),
                                      output_final_state=True, mode=mode, backend="torch",
                                      g=None if g is None else g.double())
    buffer = state.to(DEVICE)
    args = [x[:, 0].to(DEVICE) for x in (q, k, v)]
    o = step(*args, beta[:, 0].to(DEVICE), buffer, K ** -0.5, mode == "efla", None if g is None else g[:, 0].to(DEVICE))
    assert rel_err(o, o_ref[:, 0]) < 1e-5 and rel_err(buffer, state_ref) < 1e-5


@pytest.mark.parametrize("options", [dict(mode="efla"), dict(mode="delta", use_output_gate=True),
                                     dict(mode="efla", use_decay_gate=True)], ids=["efla", "delta-gate", "decay"])
@torch.no_grad()
def test_layer_kernel_step_equals_its_pytorch_step(options, monkeypatch):
    """The same layer and states through step's kernel path and its PyTorch path, three tokens on."""
    torch.manual_seed(3)
    layer = EFLAttention(64, 4, layer_idx=0, **options).to(DEVICE)
    B = 2
    conv = torch.randn(B, 3 * 64, 3, device=DEVICE)
    state = torch.randn(B, 4, 16, 16, device=DEVICE) * 0.1
    states = {True: (conv.clone(), state.clone()), False: (conv.clone(), state.clone())}
    for _ in range(3):
        x = torch.randn(B, 1, 64, device=DEVICE)
        outputs = {}
        for kernels in (True, False):
            monkeypatch.setattr(attention_module, "uses_decode_kernels", lambda x, backend, kernels=kernels: kernels)
            outputs[kernels] = layer.step(x, *states[kernels])
        assert rel_err(outputs[True], outputs[False]) < 1e-5
        for a, b in zip(states[True], states[False], strict=True):
            assert rel_err(a, b) < 1e-5


def test_kernel_step_follows_a_changed_weight(monkeypatch):
    """The kernels' stacked weights are built once, kept while no weight changes, and rebuilt after one does."""
    torch.manual_seed(4)
    layer = EFLAttention(32, 2, layer_idx=0).to(DEVICE)
    x = torch.randn(2, 1, 32, device=DEVICE)

    def step(kernels: bool) -> torch.Tensor:
        monkeypatch.setattr(attention_module, "uses_decode_kernels", lambda x, backend: kernels)
        return layer.step(x, *layer.allocate_inference_cache(2))

    step(True)
    before = layer._stacked_decode_weights()[0]
    assert layer._stacked_decode_weights()[0] is before  # kept while nothing changes
    with torch.no_grad():
        layer.k_proj.weight.mul_(2)
    assert rel_err(step(True), step(False)) < 1e-5
    after = layer._stacked_decode_weights()[0]
    assert torch.equal(after[32:64], layer.k_proj.weight) and not torch.equal(after, before)
